"""A small sampling host for the toy model that speaks the WebUI's denoiser contract.

It lays out every model call as the WebUI's CFG denoiser does (prompt rows, then one uncond
row per image), hands the same parameter objects to the same three callbacks (before the
model call, after it, after CFG) and hands the sampler x0 (k-diffusion) or eps (DDIM). With
guidance, the callbacks are the methods of ldg_core.webui_adapter.PassGuidance, the very code
that runs inside the WebUI, and the samplers are k-diffusion's own. Safe Latent Diffusion
(SLD) runs through the same callbacks: PassSafety adds the safety concept's row as PassGuidance
adds concept rows, and both edits add to the combined result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch

from ..config import GuidanceConfig
from ..clock import StepClock, step_clock
from ..guidance import SemanticGuidance
from ..passes import GuidancePass
from ..safety import SafetyGuidance
from ..safety_config import SafetyConfig
from ..spaces import eps_from_output, output_change
from ..webui_adapter import PassGuidance, WebUIFunctions, _insert_before_last

# name: (k-diffusion function or None for DDIM, the WebUI's label, second order)
SAMPLERS = {
    "euler": ("sample_euler", "Euler", False),
    "euler_a": ("sample_euler_ancestral", "Euler a", False),
    "dpmpp_2m": ("sample_dpmpp_2m", "DPM++ 2M", False),
    "heun": ("sample_heun", "Heun", True),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", "DPM++ 2M SDE", False),
    "ddim": (None, "DDIM", False),
}


# The parameter objects of modules/script_callbacks.py (v1.10.1), field for field.
@dataclass
class DenoiserParams:
    x: torch.Tensor
    image_cond: torch.Tensor
    sigma: torch.Tensor
    sampling_step: int
    total_sampling_steps: int
    text_cond: torch.Tensor
    text_uncond: torch.Tensor
    denoiser: Any = None


@dataclass
class DenoisedParams:
    x: torch.Tensor
    sampling_step: int
    total_sampling_steps: int
    inner_model: Any


@dataclass
class AfterCFGParams:
    x: torch.Tensor
    sampling_step: int
    total_sampling_steps: int


class CFGDenoiser:
    """Rows [prompt rows, uncond rows] per call, callbacks around the model call, CFG."""

    def __init__(self, inner_model: Callable, steps: int, callbacks: Optional[Any] = None):
        self.inner_model = inner_model  # (x, sigma or timestep, cond=context) -> x0 or eps
        self.total_steps = steps
        self.callbacks = callbacks
        self.step = 0  # model calls so far, as the WebUI's denoiser counts them
        self.p = None  # the owner the callbacks look for
        self.mask = None  # no inpainting here
        self.init_latent = None  # img2img: the image's latents

    def __call__(self, x, sigma, *, cond, uncond, cond_scale):
        images = x.shape[0]
        rows = DenoiserParams(torch.cat([x, x]), x.new_zeros(2 * images, 1),
                              torch.cat([sigma, sigma]), self.step, self.total_steps, cond,
                              uncond, self)
        self._call("on_cfg_denoiser", rows)
        out = self.inner_model(rows.x, rows.sigma,
                               cond=torch.cat([rows.text_cond, rows.text_uncond]))
        denoised = DenoisedParams(out, self.step, self.total_steps, self.inner_model)
        self._call("on_cfg_denoised", denoised)
        out = denoised.x
        uncond_out = out[-images:]
        result = AfterCFGParams(uncond_out + (out[:images] - uncond_out) * cond_scale,
                                self.step, self.total_steps)
        self._call("on_cfg_after_cfg", result)
        self.step += 1
        return result.x

    def _call(self, name: str, params) -> None:
        if self.callbacks is not None:
            getattr(self.callbacks, name)(params)


def toy_functions(empty: torch.Tensor) -> WebUIFunctions:
    """The WebUI functions the adapter needs, for plain-tensor conditioning of fixed length."""
    def pad_cond(cond, repeats, empty_row):
        return torch.cat([cond, empty_row.repeat(cond.shape[0], repeats, 1)], dim=1)

    return WebUIFunctions(
        reconstruct_cond_batch=lambda schedules, step: schedules[0],  # no prompt schedules
        catenate_conds=torch.cat, pad_cond=pad_cond, empty_cond=lambda: empty,
        skips_uncond=lambda denoiser, sigma: False, condition=lambda cond, image_cond: cond)


def pass_clock(sampler: str, steps: int, t_enc: Optional[int] = None) -> StepClock:
    """The step clock of a pass of `steps` steps, as the WebUI extension makes it: txt2img, or
    img2img running the last `t_enc` + 1 sigmas of the schedule (k-diffusion samplers)."""
    _, label, second_order = SAMPLERS[sampler]
    count = len(range(0, 1000, 1000 // steps)) if sampler == "ddim" else None  # DDIM timesteps
    return step_clock(label, second_order=second_order, steps=steps, timestep_count=count,
                      img2img_schedule=None if t_enc is None else (steps, t_enc))


def attach_guidance(denoiser: CFGDenoiser, config: GuidanceConfig, sampler: str, images: int,
                    concepts: List[torch.Tensor], empty: torch.Tensor, steps: int,
                    observer: Optional[Callable] = None, t_enc: Optional[int] = None,
                    engine: Callable = SemanticGuidance) -> PassGuidance:
    """Guidance for one pass, set up as the WebUI extension sets it up (`t_enc`: img2img's;
    `engine`: inversion.LeditsGuidance for LEDITS++'s edit)."""
    guidance = PassGuidance(
        GuidancePass(config, clock=pass_clock(sampler, steps, t_enc),
                     eps_outputs=sampler == "ddim", observer=observer, engine=engine),
        owner=denoiser, concept_schedules=concepts, first_prompt_rows=list(range(images)),
        webui=toy_functions(empty))
    _add_callbacks(denoiser, guidance)
    return guidance


def attach_safety(denoiser: CFGDenoiser, config: SafetyConfig, sampler: str,
                  safety_cond: torch.Tensor, steps: int, cfg_scale: float) -> "PassSafety":
    """SLD for one pass; attached after guidance, its row goes after the concept rows."""
    safety = PassSafety(config, clock=pass_clock(sampler, steps), safety_cond=safety_cond,
                        cfg_scale=cfg_scale, eps_outputs=sampler == "ddim")
    _add_callbacks(denoiser, safety)
    return safety


def _add_callbacks(denoiser: CFGDenoiser, callbacks) -> None:
    denoiser.p = denoiser
    if denoiser.callbacks is None:
        denoiser.callbacks = callbacks
    elif isinstance(denoiser.callbacks, Callbacks):
        denoiser.callbacks.parts.append(callbacks)
    else:
        denoiser.callbacks = Callbacks([denoiser.callbacks, callbacks])


class Callbacks:
    """Several callback objects, called in the order they were attached (the WebUI calls every
    extension's callbacks in turn)."""

    def __init__(self, parts: list):
        self.parts = parts

    def on_cfg_denoiser(self, params) -> None:
        for part in self.parts:
            part.on_cfg_denoiser(params)

    def on_cfg_denoised(self, params) -> None:
        for part in self.parts:
            part.on_cfg_denoised(params)

    def on_cfg_after_cfg(self, params) -> None:
        for part in self.parts:
            part.on_cfg_after_cfg(params)


class PassSafety:
    """SLD for one sampling pass of the toy host, through the denoiser's three callbacks.

    Where SafetyGuidance.needed(step, cfg_scale), the safety concept gets one row per image with
    the uncond rows' inputs, just before the uncond rows (after any concept rows); its estimate,
    the first prompt row's and the uncond rows' go to SafetyGuidance.step, whose eps edit is
    added to the combined result in the sampler's space. Where it is not needed, the model call
    is left exactly as it was and nothing is added.
    """

    def __init__(self, config: SafetyConfig, *, clock: StepClock, safety_cond: torch.Tensor,
                 cfg_scale: float, eps_outputs: bool):
        self.engine = SafetyGuidance(config, end_step=clock.end_step)
        self.clock = clock
        self.safety_cond = safety_cond  # [1, tokens, dim]
        self.cfg_scale = cfg_scale
        self.eps_outputs = eps_outputs
        self._call: Optional[_SafetyCall] = None

    def on_cfg_denoiser(self, params) -> None:
        images = params.text_uncond.shape[0]
        step = self.clock.index(params.denoiser.step)
        self._call = None
        if not self.engine.needed(step, self.cfg_scale):
            return
        self._call = _SafetyCall(step, images, params.x[-images:], params.sigma[-images:])
        rows = self.safety_cond.expand(images, *self.safety_cond.shape[1:])
        params.text_cond = torch.cat([params.text_cond, rows])
        params.x = _insert_before_last(params.x, images, 1)
        params.sigma = _insert_before_last(params.sigma, images, 1)
        params.image_cond = _insert_before_last(params.image_cond, images, 1)

    def on_cfg_denoised(self, params) -> None:
        call, out = self._call, params.x
        if call is None:
            return
        b = call.images
        uncond, cond, safety = (eps_from_output(rows, call.x, call.sigma, self.eps_outputs)
                                for rows in (out[-b:], out[:b], out[-2 * b:-b]))
        call.edit = self.engine.step(step=call.step, uncond=uncond, cond=cond, safety=safety,
                                     guidance_scale=self.cfg_scale)

    def on_cfg_after_cfg(self, params) -> None:
        call, self._call = self._call, None
        if call is not None and call.edit is not None:
            params.x = params.x + output_change(call.edit, call.sigma, self.eps_outputs)


@dataclass
class _SafetyCall:
    step: int
    images: int
    x: torch.Tensor  # the images' x and sigma (the uncond rows' inputs)
    sigma: torch.Tensor
    edit: Optional[torch.Tensor] = None
