"""A small sampling host for the toy model that speaks the WebUI's denoiser contract.

It lays out every model call as the WebUI's CFG denoiser does (prompt rows, then one uncond
row per image), hands the same parameter objects to the same three callbacks (before the
model call, after it, after CFG) and hands the sampler x0 (k-diffusion) or eps (DDIM). With
guidance, the callbacks are the methods of ldg_core.webui_adapter.PassGuidance, the very code
that runs inside the WebUI, and the samplers are k-diffusion's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch

from ..config import GuidanceConfig
from ..clock import step_clock
from ..passes import GuidancePass
from ..webui_adapter import PassGuidance, WebUIFunctions

# name: (k-diffusion function or None for DDIM, the WebUI's label, second order)
SAMPLERS = {
    "euler": ("sample_euler", "Euler", False),
    "euler_a": ("sample_euler_ancestral", "Euler a", False),
    "dpmpp_2m": ("sample_dpmpp_2m", "DPM++ 2M", False),
    "heun": ("sample_heun", "Heun", True),
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


def attach_guidance(denoiser: CFGDenoiser, config: GuidanceConfig, sampler: str, images: int,
                    concepts: List[torch.Tensor], empty: torch.Tensor, steps: int,
                    observer: Optional[Callable] = None) -> PassGuidance:
    """Guidance for one pass, set up as the WebUI extension sets it up for a txt2img pass."""
    _, label, second_order = SAMPLERS[sampler]
    timesteps = sampler == "ddim"
    count = len(range(0, 1000, 1000 // steps)) if timesteps else None  # the DDIM loop's timesteps
    clock = step_clock(label, second_order=second_order, steps=steps, timestep_count=count)
    guidance = PassGuidance(
        GuidancePass(config, clock=clock, eps_outputs=timesteps, observer=observer),
        owner=denoiser, concept_schedules=concepts, first_prompt_rows=list(range(images)),
        webui=toy_functions(empty))
    denoiser.p, denoiser.callbacks = denoiser, guidance
    return guidance
