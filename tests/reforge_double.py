"""A double of reForge's sampling contract (Panchovix/stable-diffusion-webui-reForge main,
3b56b268), on top of the WebUI double and the Forge double's model and patcher.

reForge keeps the WebUI's samplers and processing and runs the model through ComfyUI's
sampling code. Our own code, following these places of reForge's source:
- `CFGDenoiser.forward` (modules/sd_samplers_cfg_denoiser.py L113-272): fires on_cfg_denoiser
  with the images' rows; lays model options a sampler passes in over the UNet's (L211-213);
  skips the negative itself (NGMS at even calls, L178-186; skip early CFG, L189-195) and then
  calls the sampling function without it at a scale of 1 (L241-243); uses the Hires CFG Scale
  in the hires pass (L176-177); blends the inpainting mask after (L259-260); counts its calls
  in `step`.
- `cond_from_a1111_to_patched_ldm(_weighted)` (modules_forge/forge_sampler.py L8-53): one entry
  per prompt, its text (and SDXL's pooled vector as `y`) in `model_conds`, `strength` for the
  prompt's.
- `sampling_function` (ldm_patched/modules/samplers.py L413-432): the CFG-1 skip unless
  `disable_cfg1_optimization` (L414-417); `sampler_calc_cond_batch_function`, when set, gets
  the two lists and returns their two outputs (L419-424); then `cfg_function` (L372-399):
  CFG, the prompt strengths' sum, the post-CFG chain with the negative as handed in (None when
  skipped), in x0.
- `_calc_cond_batch` (L213-355): one output per list (a missing list gives zeros); entries
  whose conditioning can be concatenated share one model call (L263-300; here: same rows and
  token length), taken in reverse order (L270, measured: cond_or_uncond [2, 1, 0]); each
  output is the strength-weighted average of its list's entries (L334-353).
- `ModelPatcher.set_model_sampler_calc_cond_batch_function` (model_patcher.py L382-383): one
  slot, plain assignment.
- processing (modules/processing.py L1458, L1568, L1913): the UNet is reset before each pass's
  process_before_every_sampling, once per pass (L1462, L1573, L1917); the negative is always
  handed over (no CFG-1 case there).
"""
import math

import torch

from modules import prompt_parser, script_callbacks, shared
from modules.script_callbacks import CFGDenoiserParams

from tests import forge_double

CONDCrossAttn = forge_double.ConditionCrossAttn
CONDRegular = forge_double.Condition


def cond_from_a1111_to_patched_ldm(cond, strength=None):
    return forge_double.compile_conditions(cond, strength)


def calc_cond_batch(model, conds, x_in, timestep, model_options):
    outputs = [torch.zeros_like(x_in) for _ in conds]
    counts = [torch.ones_like(x_in) * 1e-37 for _ in conds]
    to_run = [(entry, index) for index, entries in enumerate(conds) if entries is not None
              for entry in entries]
    while to_run:
        first = to_run[0][0]["model_conds"]["c_crossattn"].cond.shape
        fits = [item[0]["model_conds"]["c_crossattn"].cond.shape == first for item in to_run]
        batch = [item for item, fit in zip(to_run, fits) if fit][::-1]
        to_run = [item for item, fit in zip(to_run, fits) if not fit]
        rows = x_in.shape[0]
        processed = [{k: v.process_cond(rows) for k, v in entry["model_conds"].items()}
                     for entry, _ in batch]
        model_cond = {"c_crossattn": [torch.cat([c["c_crossattn"] for c in processed])]}
        if "y" in processed[0]:
            model_cond["vector"] = torch.cat([c["y"] for c in processed])
        model.calls.append(rows * len(batch))
        model.slots.append([index for _, index in batch])
        out = model(torch.cat([x_in] * len(batch)), torch.cat([timestep] * len(batch)),
                    cond=model_cond).chunk(len(batch))
        for (entry, index), output in zip(batch, out):
            strength = entry.get("strength", 1.0)
            outputs[index] += output * strength
            counts[index] += strength
    return [output / count for output, count in zip(outputs, counts)]


def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options, cond,
                 uncond):
    edit_strength = sum(item.get("strength", 1) for item in cond)
    if uncond_pred is None:
        cfg_result = cond_pred
    elif not math.isclose(edit_strength, 1.0):
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        cfg_result = fn({"denoised": cfg_result, "cond": cond, "uncond": uncond,
                         "cond_scale": cond_scale, "model": model, "uncond_denoised": uncond_pred,
                         "cond_denoised": cond_pred, "sigma": timestep,
                         "model_options": model_options, "input": x})
    return cfg_result


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options):
    skip = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
    uncond_ = None if skip else uncond
    conds = [cond, uncond_]
    if "sampler_calc_cond_batch_function" in model_options:
        out = model_options["sampler_calc_cond_batch_function"](
            {"conds": conds, "input": x, "sigma": timestep, "model": model,
             "model_options": model_options})
    else:
        out = calc_cond_batch(model, conds, x, timestep, model_options)
    return cfg_function(model, out[0], out[1], cond_scale, x, timestep, model_options,
                        cond=cond, uncond=uncond_)


class ModelPatcher(forge_double.UnetPatcher):
    def clone(self):
        return ModelPatcher(self.model, forge_double.copy.deepcopy(self.model_options))

    def set_model_sampler_calc_cond_batch_function(self, fn):
        self.model_options["sampler_calc_cond_batch_function"] = fn


def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond, **kwargs):
    """reForge's CFGDenoiser.forward for k-diffusion samplers."""
    state, opts = shared.state, shared.opts
    if state.interrupted or state.skipped:
        from modules.sd_samplers_common import InterruptedException
        raise InterruptedException
    conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
    uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
    params = CFGDenoiserParams(x, image_cond, sigma, state.sampling_step, state.sampling_steps,
                               tensor, uncond, self)
    script_callbacks.cfg_denoiser_callback(params)
    if self.p.is_hr_pass:
        cond_scale = self.p.hr_cfg
    skip_uncond = False
    s_min = getattr(opts, "s_min_uncond", 0.0) or 0.0
    if s_min > 0 and sigma[0] < s_min and (self.step % 2 == 0 or opts.s_min_uncond_all):
        skip_uncond = True
    if not skip_uncond and (self.step < opts.skip_early_cond or (
            opts.skip_early_cond != 0 and self.step / self.total_steps <= opts.skip_early_cond)):
        skip_uncond = True
    unet = self.p.sd_model.forge_objects.unet
    model_options = unet.model_options
    if kwargs.get("model_options"):  # a sampler's own options, laid over the UNet's
        model_options = dict(model_options, **kwargs["model_options"])
    cond_entries = cond_from_a1111_to_patched_ldm(tensor, strength=1.0)
    if skip_uncond:
        denoised = sampling_function(unet.model, x, sigma, None, cond_entries, 1.0, model_options)
    else:
        denoised = sampling_function(unet.model, x, sigma, cond_from_a1111_to_patched_ldm(uncond),
                                     cond_entries, cond_scale, model_options)
    if self.mask is not None:
        denoised = denoised * self.nmask + self.init_latent * self.mask
    self.step += 1
    return denoised


def install(monkeypatch, sd_model):
    """Turns the WebUI double into reForge's: the denoiser, the model's patcher, the pass hook."""
    model = forge_double.KModel(sd_model)
    model.slots = []
    base = ModelPatcher(model)

    def before_every_sampling(hook, runner, p, kwargs):
        sd_model.forge_objects = forge_double.ForgeObjects(base)  # L1458, L1568, L1913
        hook(runner, p, **kwargs)
    forge_double.install_host(monkeypatch, sd_model, base, forward, before_every_sampling)
    return base
