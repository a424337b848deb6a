"""A double of lllyasviel Forge's sampling contract (dfdcbab6), on top of the WebUI double.

Forge keeps the WebUI's samplers, processing and scripts, and replaces what sits under the CFG
denoiser. Our own code, following these places of Forge's source:
- `CFGDenoiser.forward` (modules/sd_samplers_cfg_denoiser.py L156-226): fires on_cfg_denoiser
  with the images' rows only (no cond/uncond doubling), compiles the prompt and negative into
  entries and calls the sampling function; never fires on_cfg_denoised; blends the inpainting
  mask after; counts its calls in `step`.
- `compile_conditions` (backend/sampling/condition.py L91-119): one entry, its text (and SDXL's
  pooled vector as `y`) in `model_conds`; each condition is repeated to the call's rows
  (`repeat_to_batch_size`, L5-25).
- `calc_cond_uncond_batch` (backend/sampling/sampling_function.py L154-289): the entries of a
  slot are evaluated and their outputs averaged, weighted by `strength` (L276-288); a missing
  slot gives zeros (L158).
- `sampling_function_inner` (L292-322): the CFG-1 skip (L295-298), CFG, then the post-CFG
  functions chained with the args of L314-317, everything in x0.
- `UnetPatcher` (backend/patcher/unet.py L26-35, base.py L37-41, L140-141): clone deep-copies
  model_options; a post-CFG function is appended; `disable_cfg1_optimization` is patcher-wide.
- processing (modules/processing.py L1373, L1510-1526, L1851, L499-501): the UNet is reset
  before each pass's process_before_every_sampling, which runs twice before the hires pass,
  the first time before the reset; at CFG 1 the negative is None.
The model is the test double's TinySD behind k-diffusion's x0 wrapper, as Forge's KModel
returns x0 (backend/modules/k_model.py L46). Timestep samplers' inputs are turned into
k-diffusion's space first and their eps computed from the x0 after (L163-169, L224-226).
"""
import copy
import math

import k_diffusion.external
import torch

from modules import prompt_parser, script_callbacks, shared
from modules.script_callbacks import CFGDenoiserParams


def repeat_to_batch_size(tensor, batch_size):
    if tensor.shape[0] > batch_size:
        return tensor[:batch_size]
    if tensor.shape[0] < batch_size:
        repeats = [math.ceil(batch_size / tensor.shape[0])] + [1] * (tensor.dim() - 1)
        return tensor.repeat(repeats)[:batch_size]
    return tensor


class Condition:
    def __init__(self, cond):
        self.cond = cond

    def process_cond(self, batch_size):
        return repeat_to_batch_size(self.cond, batch_size)


class ConditionCrossAttn(Condition):
    pass


def compile_conditions(cond, strength=None):
    if cond is None:
        return None
    if isinstance(cond, dict):
        entry = {"cross_attn": cond["crossattn"], "pooled_output": cond["vector"],
                 "model_conds": {"c_crossattn": ConditionCrossAttn(cond["crossattn"]),
                                 "y": Condition(cond["vector"])}}
    else:
        entry = {"cross_attn": cond, "model_conds": {"c_crossattn": ConditionCrossAttn(cond)}}
    if strength is not None:
        entry["strength"] = strength
    return [entry]


def compile_weighted_conditions(cond, weights):
    """condition.py L122-142: one entry per sub-prompt position, its rows across the images,
    the weight as its strength (images share their AND structure)."""
    entries = []
    for position in map(list, zip(*weights)):
        rows = [index for index, _ in position]
        feed = ({k: v[rows] for k, v in cond.items()} if isinstance(cond, dict) else cond[rows])
        entry = compile_conditions(feed)[0]
        entry["strength"] = position[-1][1]
        entries.append(entry)
    return entries


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    def slot(entries):
        if not entries:
            return torch.zeros_like(x_in)
        total, weights = torch.zeros_like(x_in), 0.0
        for entry in entries:
            conds = {k: v.process_cond(x_in.shape[0]) for k, v in entry["model_conds"].items()}
            model_cond = {"c_crossattn": [conds["c_crossattn"]]}
            if "y" in conds:
                model_cond["vector"] = conds["y"]
            model.calls.append(x_in.shape[0])
            total = total + model(x_in, timestep, cond=model_cond) * entry.get("strength", 1.0)
            weights += entry.get("strength", 1.0)
        return total / weights
    return slot(cond), slot(uncond)


NEO = {"on": False}  # Forge Neo's differences, when on (Neo v3.5, files cited where used)


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options):
    edit_strength = sum(item.get("strength", 1) for item in cond)
    skip = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
    uncond_ = None if skip else uncond
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    if not math.isclose(edit_strength, 1.0):
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond, "model": model,
                "uncond_denoised": uncond_pred, "cond_denoised": cond_pred,
                "sigma": timestep, "model_options": model_options, "input": x}
        if NEO["on"]:  # Neo's post-CFG arguments also carry the scale (L316-318)
            args["cond_scale"] = cond_scale
        cfg_result = fn(args)
    return cfg_result


class KModel(torch.nn.Module):
    """x0 from the double's model, whatever the caller's conditioning; counts its row counts."""
    def __init__(self, sd_model):
        super().__init__()
        wrapper = (k_diffusion.external.CompVisVDenoiser if sd_model.parameterization == "v"
                   else k_diffusion.external.CompVisDenoiser)
        self.denoiser = wrapper(sd_model)
        self.calls = []

    def forward(self, x, sigma, cond):
        return self.denoiser(x, sigma, cond=cond)


class UnetPatcher:
    def __init__(self, model, model_options=None):
        self.model = model
        self.model_options = model_options if model_options is not None else {"transformer_options": {}}

    def clone(self):
        return UnetPatcher(self.model, copy.deepcopy(self.model_options))

    def set_model_sampler_post_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = (
            self.model_options.get("sampler_post_cfg_function", []) + [fn])
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True


class ForgeObjects:
    def __init__(self, unet):
        self.unet = unet


def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
    """Forge's CFGDenoiser.forward (L156-226), for every sampler and AND prompts."""
    from modules import sd_samplers_timesteps
    state = shared.state
    if state.interrupted or state.skipped:
        from modules.sd_samplers_common import InterruptedException
        raise InterruptedException
    # Timestep samplers (DDIM, PLMS, UniPC) hand over timesteps and take eps back: Forge turns
    # both into k-diffusion's sigma space around the call (sd_samplers_timesteps.py L41,
    # sd_samplers_cfg_denoiser.py L163-169, L224-226).
    timesteps = isinstance(self, sd_samplers_timesteps.CFGDenoiserTimesteps)
    if timesteps:
        alphas = shared.sd_model.alphas_cumprod
        sigma = (((1 - alphas) / alphas) ** 0.5)[sigma.round().long().clip(0, alphas.shape[0])]
        x = x * ((sigma ** 2 + 1) ** 0.5)[:, None, None, None]
    conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
    uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step) if uncond is not None else None
    params = CFGDenoiserParams(x, image_cond, sigma, state.sampling_step, state.sampling_steps,
                               tensor, uncond, self)
    script_callbacks.cfg_denoiser_callback(params)
    early = shared.opts.skip_early_cond
    if NEO["on"] and 0 < self.step / self.total_steps <= early:  # Neo L142: never call 0
        cond_scale = 1.0
    elif not NEO["on"] and early != 0 and self.step / self.total_steps <= early:
        cond_scale = 1.0
    elif (self.step % 2 or shared.opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
        cond_scale = 1.0
    unet = self.p.sd_model.forge_objects.unet
    denoised = sampling_function_inner(unet.model, x, sigma, compile_conditions(uncond),
                                       compile_weighted_conditions(tensor, conds_list),
                                       cond_scale, unet.model_options)
    if self.mask is not None:
        denoised = denoised * self.nmask + self.init_latent * self.mask
    self.step += 1
    if timesteps:
        return (x - denoised) / sigma[:, None, None, None]
    return denoised


def install(monkeypatch, sd_model):
    """Turns the WebUI double into Forge's: the denoiser, the model's patcher, the pass hooks."""
    base = UnetPatcher(KModel(sd_model))

    def before_every_sampling(hook, runner, p, kwargs):
        if p.cfg_scale == 1:
            kwargs["uc"] = None  # processing.py L499-501
        if p.is_hr_pass:
            hook(runner, p, **kwargs)  # L1510: before the reset, so whatever it sets is lost
        sd_model.forge_objects = ForgeObjects(base)  # L1373, L1518, L1851
        hook(runner, p, **kwargs)
    install_host(monkeypatch, sd_model, base, forward, before_every_sampling)
    return base


def install_host(monkeypatch, sd_model, base, denoiser_forward, before_every_sampling):
    """What Forge's and reForge's doubles share: their CFG denoiser, `p.sd_model`, the UNet
    patcher `base`, and `before_every_sampling(hook, runner, p, kwargs)` around the scripts'
    process_before_every_sampling (where each host resets its model objects)."""
    from modules import processing, scripts, sd_samplers_cfg_denoiser
    sd_model.forge_objects = ForgeObjects(base)
    monkeypatch.setattr(sd_samplers_cfg_denoiser.CFGDenoiser, "forward", denoiser_forward)
    monkeypatch.setattr(processing.Processing, "sd_model", property(lambda p: shared.sd_model),
                        raising=False)
    hook = scripts.ScriptRunner.process_before_every_sampling
    monkeypatch.setattr(scripts.ScriptRunner, "process_before_every_sampling",
                        lambda runner, p, **kwargs: before_every_sampling(hook, runner, p, kwargs))
