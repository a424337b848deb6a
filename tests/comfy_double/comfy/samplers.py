"""comfy/samplers.py (a125cd84), the parts the nodes use:
- calc_cond_batch (L203-358): one x0 per conditioning list; entries whose conditioning can be
  concatenated share one model call (L263-300; here: same cross-attention shape and control),
  the lists' positions in transformer_options["cond_or_uncond"] (L318-321),
  each list's output the strength-weighted average of its entries (L334-353); a missing list
  gives zeros.
- cfg_function (L360-375): sampler_cfg_function in eps terms or plain CFG, then the post-CFG
  chain with these args; sampling_function (L377-398): the CFG-1 skip unless
  disable_cfg1_optimization, the calc_cond_batch hook, the pre-CFG functions.
- KSAMPLER.sample (L742-768): noise scaled to the first sigma plus the latent, the k-diffusion
  function called with the guider as model and the step callback; ksampler() and
  sampler_object() (L771-790, L1086-1095): "ddim" is Euler.
- process_conds (L792-): the entries' model conditions from their keys (here c_crossattn, and
  SDXL's y from pooled_output).
- CFGGuider (L942-1044): conds converted at set_conds, copied at sample(); OUTER_SAMPLE wrappers
  around outer_sample; inner_sample puts the schedule in transformer_options["sample_sigmas"]
  (L979).
"""
import math

import k_diffusion.sampling
import torch

from comfy import patcher_extension, sampler_helpers


def _can_share_a_call(a, b):
    return (a["model_conds"]["c_crossattn"].shape == b["model_conds"]["c_crossattn"].shape
            and a.get("control") is b.get("control"))


def calc_cond_batch(model, conds, x_in, timestep, model_options):
    outputs = [torch.zeros_like(x_in) for _ in conds]
    counts = [torch.ones_like(x_in) * 1e-37 for _ in conds]
    to_run = [(entry, index) for index, entries in enumerate(conds) if entries is not None
              for entry in entries]
    while to_run:
        first = to_run[0][0]
        batch = [item for item in to_run if _can_share_a_call(item[0], first)]
        to_run = [item for item in to_run if not _can_share_a_call(item[0], first)]
        rows = x_in.shape[0]
        crossattn = torch.cat([e["model_conds"]["c_crossattn"].expand(rows, -1, -1) for e, _ in batch])
        y = None
        if "y" in first["model_conds"]:
            y = torch.cat([e["model_conds"]["y"].expand(rows, -1) for e, _ in batch])
        model.calls.append([index for _, index in batch])
        # L318-321: the lists' positions, for attention patches
        options = dict(model_options.get("transformer_options", {}),
                       cond_or_uncond=[index for _, index in batch])
        out = model.apply_model(torch.cat([x_in] * len(batch)), torch.cat([timestep] * len(batch)),
                                c_crossattn=crossattn, y=y, control=first.get("control"),
                                transformer_options=options).chunk(len(batch))
        for (entry, index), output in zip(batch, out):
            strength = entry.get("strength", 1.0)
            outputs[index] += output * strength
            counts[index] += strength
    return [output / count for output, count in zip(outputs, counts)]


def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options={},
                 cond=None, uncond=None):
    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale,
                "timestep": timestep, "input": x, "sigma": timestep, "cond_denoised": cond_pred,
                "uncond_denoised": uncond_pred, "model": model, "model_options": model_options,
                "input_cond": cond, "input_uncond": uncond}
        cfg_result = x - model_options["sampler_cfg_function"](args)
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        cfg_result = fn({"denoised": cfg_result, "cond": cond, "uncond": uncond,
                         "cond_scale": cond_scale, "model": model, "uncond_denoised": uncond_pred,
                         "cond_denoised": cond_pred, "sigma": timestep,
                         "model_options": model_options, "input": x})
    return cfg_result


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
    skip = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
    uncond_ = None if skip else uncond
    conds = [cond, uncond_]
    if "sampler_calc_cond_batch_function" in model_options:
        out = model_options["sampler_calc_cond_batch_function"](
            {"conds": conds, "input": x, "sigma": timestep, "model": model,
             "model_options": model_options})
    else:
        out = calc_cond_batch(model, conds, x, timestep, model_options)
    for fn in model_options.get("sampler_pre_cfg_function", []):
        out = fn({"conds": conds, "conds_out": out, "cond_scale": cond_scale,
                  "timestep": timestep, "input": x, "sigma": timestep, "model": model,
                  "model_options": model_options})
    return cfg_function(model, out[0], out[1], cond_scale, x, timestep,
                        model_options=model_options, cond=cond, uncond=uncond_)


class KSAMPLER:
    def __init__(self, sampler_function, extra_options={}):
        self.sampler_function = sampler_function
        self.extra_options = extra_options

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
               denoise_mask=None, disable_pbar=False):
        def model_k(x, sigma, **kwargs):
            return model_wrap(x, sigma, **kwargs)
        x = noise * sigmas[0] + latent_image
        k_callback = None if callback is None else (
            lambda info: callback(info["i"], info["denoised"], info["x"], len(sigmas) - 1))
        return self.sampler_function(model_k, x, sigmas, extra_args=extra_args,
                                     callback=k_callback, disable=True, **self.extra_options)


def ksampler(name, extra_options={}):
    if name in ("dpm_fast", "dpm_adaptive"):
        def function(model, x, sigmas, extra_args, callback, disable):
            raise AssertionError("not run in these tests")
        function.__name__ = f"{name}_function"
        return KSAMPLER(function)
    return KSAMPLER(getattr(k_diffusion.sampling, f"sample_{name}"), extra_options)


def sampler_object(name):
    return ksampler("euler" if name == "ddim" else name)


def process_conds(model, noise, conds):
    for key in conds:
        processed = []
        for entry in conds[key]:
            entry = entry.copy()
            model_conds = dict(entry["model_conds"])
            model_conds["c_crossattn"] = entry["cross_attn"]
            if model.is_sdxl:
                model_conds["y"] = entry["pooled_output"]
            entry["model_conds"] = model_conds
            processed.append(entry)
        conds[key] = processed
    return conds


class CFGGuider:
    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.original_conds = {}
        self.cfg = 1.0

    def set_conds(self, positive, negative):
        self.inner_set_conds({"positive": positive, "negative": negative})

    def set_cfg(self, cfg):
        self.cfg = cfg

    def inner_set_conds(self, conds):
        for key in conds:
            self.original_conds[key] = sampler_helpers.convert_cond(conds[key])

    def __call__(self, x, timestep, model_options={}, seed=None):
        return self.predict_noise(x, timestep, model_options, seed)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        return sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                 self.conds.get("positive"), self.cfg,
                                 model_options=model_options, seed=seed)

    def inner_sample(self, noise, latent_image, sampler, sigmas, denoise_mask, callback, seed):
        self.conds = process_conds(self.inner_model, noise, self.conds)
        options = dict(self.model_options)
        options["transformer_options"] = dict(options.get("transformer_options", {}),
                                              sample_sigmas=sigmas)
        extra_args = {"model_options": options, "seed": seed}
        return sampler.sample(self, sigmas, extra_args, callback, noise, latent_image, denoise_mask)

    def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                     disable_pbar=False, seed=None):
        self.inner_model = self.model_patcher.model
        try:
            return self.inner_sample(noise, latent_image, sampler, sigmas, denoise_mask, callback,
                                     seed)
        finally:
            del self.inner_model

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
               disable_pbar=False, seed=None):
        if sigmas.shape[-1] == 0:
            return latent_image
        self.conds = {key: [entry.copy() for entry in entries]
                      for key, entries in self.original_conds.items()}
        original_options = self.model_options
        self.model_options = dict(self.model_options)
        try:
            executor = patcher_extension.WrapperExecutor.new_class_executor(
                self.outer_sample, self, patcher_extension.get_all_wrappers(
                    patcher_extension.WrappersMP.OUTER_SAMPLE, self.model_options,
                    is_model_options=True))
            return executor.execute(noise, latent_image, sampler, sigmas, denoise_mask, callback,
                                    disable_pbar, seed)
        finally:
            self.model_options = original_options
            del self.conds


def sample(model, noise, positive, negative, cfg, sampler, sigmas, latent_image=None,
           callback=None, seed=None):
    """comfy/samplers.py sample() (L1047-1051): KSampler's way, a plain CFGGuider."""
    guider = CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider.sample(noise, latent_image, sampler, sigmas, callback=callback, seed=seed)
