"""The independent oracle for SLD: diffusers' StableDiffusionPipelineSafe on the tiny random model.

The pipeline is assembled from the components of tests/reference_pipeline.py's model (offline,
random weights, no safety checker). A run records, at every step, what its UNet returned
(split into the uncond, text and safety estimates) and the noise prediction the loop handed
to the scheduler: the guided estimate our engine must reproduce.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Union

import torch

from ldg_core import SafetyConfig

# Our field name -> the reference's __call__ argument (and SafetyConfig preset key).
REFERENCE_NAMES = {"scale": "sld_guidance_scale", "threshold": "sld_threshold",
                   "warmup": "sld_warmup_steps", "momentum_scale": "sld_momentum_scale",
                   "momentum_beta": "sld_mom_beta"}


@dataclass
class SafetyRun:
    guidance_scale: float
    uncond: Optional[torch.Tensor]  # [steps, B, C, H, W]; None when the reference ran no CFG
    cond: torch.Tensor              # [steps, B, C, H, W]
    safety: Optional[torch.Tensor]  # [steps, B, C, H, W]; None when SLD was off
    noise_pred: torch.Tensor        # [steps, B, C, H, W]: the guided estimate of each step


def safe_pipeline(semantic_pipe):
    """StableDiffusionPipelineSafe over the same tiny model as the SEGA reference pipeline."""
    from diffusers import DDIMScheduler, StableDiffusionPipelineSafe

    pipe = StableDiffusionPipelineSafe(
        vae=semantic_pipe.vae, text_encoder=semantic_pipe.text_encoder,
        tokenizer=semantic_pipe.tokenizer, unet=semantic_pipe.unet,
        scheduler=DDIMScheduler.from_config(semantic_pipe.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_kwargs(config: SafetyConfig) -> dict:
    return {REFERENCE_NAMES[name]: getattr(config, name) for name in REFERENCE_NAMES}


def run_safe_reference(pipe, config: Union[SafetyConfig, dict], *, steps: int,
                       prompt: Union[str, List[str]] = "a cat, smiling",
                       num_images_per_prompt: int = 1, guidance_scale: float = 7.5,
                       height: int = 16, width: int = 16, seed: int = 0) -> SafetyRun:
    """Runs the reference with `config` (a SafetyConfig, or the reference's own keyword dict,
    e.g. diffusers' SafetyConfig.MEDIUM with the default concept) and records every step."""
    if isinstance(config, SafetyConfig):
        pipe.safety_concept = config.concept
        kwargs = reference_kwargs(config)
    else:
        pipe.safety_concept = SafetyConfig().concept
        kwargs = dict(config)
    outputs, noise_preds = [], []
    hook = pipe.unet.register_forward_hook(
        lambda module, args, output: outputs.append(output.sample.detach().clone()))
    scheduler_step = pipe.scheduler.step

    def recording_step(model_output, *args, **kw):
        noise_preds.append(model_output.detach().clone())
        return scheduler_step(model_output, *args, **kw)

    pipe.scheduler.step = recording_step
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Safety checker disabled")
            pipe(prompt=prompt, height=height, width=width, num_inference_steps=steps,
                 guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
                 generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    finally:
        hook.remove()
        del pipe.scheduler.step
    assert len(outputs) == len(noise_preds) == steps
    batch = noise_preds[0].shape[0]
    rows = outputs[0].shape[0] // batch  # 1: no CFG, 2: CFG, 3: CFG and SLD
    chunks = [torch.stack([o.chunk(rows)[k] for o in outputs]) for k in range(rows)]
    return SafetyRun(guidance_scale=guidance_scale,
                     uncond=chunks[0] if rows > 1 else None,
                     cond=chunks[1] if rows > 1 else chunks[0],
                     safety=chunks[2] if rows == 3 else None,
                     noise_pred=torch.stack(noise_preds))
