"""The independent oracle for inversion: diffusers' LEditsPPPipelineStableDiffusion.

diffusers/pipelines/ledits_pp/pipeline_leditspp_stable_diffusion.py, on the tiny random offline
model of tests/reference_pipeline.py (same tokenizer, text encoder, UNet and VAE; nothing is
downloaded), with DDIMScheduler (edit-friendly DDPM inversion, compute_noise_ddim) or
DPMSolverMultistepScheduler "sde-dpmsolver++" order 2 (compute_noise_sde_dpm_pp_2nd).

`run_ledits` calls the pipeline's own `invert()` once, then its `__call__` edit loop once per
set of concepts, with one of the masks of ldg_core.cross_attention.MASKS ("noise":
use_cross_attn_mask=False, use_intersect_mask=False; "attention": True, False; "both": True,
True), and keeps what they computed: the encoded image x0, the start latents
(`init_latents`), the noise maps (`zs`), every step's latents (callback_on_step_end), every
step's edit (`sem_guidance`) and the schedule numbers that drive our rules with the same steps.

The one change to the reference: DDIMScheduler.add_noise is given the timestep as an integer
(see _ddim_scheduler); in diffusers 0.42.1 invert() with DDIM raises IndexError otherwise.
Quirks kept as they are: the edit loop counts every concept as 75 tokens (num_edit_tokens is
the tokenizer's `length` after padding to 77, minus 2), so its attention map sums tokens 1..75,
not the concept's own tokens; with a batch of more than one image its attention store groups
rows by `attn.split(batch_size)`, which mixes the images' heads, so attention masks are
compared on one image; with DPM-Solver++ the inversion's last step (to sigma 0) uses the
second-order formula with h = inf, so its z is 0 and its corrected latent is inf (stored in the
slot of x0 and never read), and the edit loop's last step returns the denoised estimate, so
the reference does not reconstruct the image there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from ldg_core import Concept

BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             steps_offset=1)  # LEdits forces steps_offset 1 (its __init__): say it up front


def _ddim_scheduler():
    from diffusers import DDIMScheduler

    class DDIMIntAddNoise(DDIMScheduler):
        # invert() calls scheduler.add_noise(x0, noise, torch.Tensor([t])): a float tensor, which
        # DDIMScheduler.add_noise uses as an index (alphas_cumprod[timesteps]) and torch refuses
        # (IndexError in diffusers 0.42.1). t is a whole number, so .long() is exact; the
        # subclass still passes the pipeline's isinstance(DDIMScheduler) dispatch.
        def add_noise(self, original_samples, noise, timesteps):
            return super().add_noise(original_samples, noise, timesteps.long())

    return DDIMIntAddNoise(clip_sample=False, set_alpha_to_one=False, **BETAS)


def _dpm_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2, **BETAS)


def attention_unet():
    """A tiny UNet laid out like SD 1.x's where the attention mask looks: cross-attention at
    the latents' resolution, / 2 and / 4, in the middle block too (which the mask leaves out).
    The tiny model of tests/reference_pipeline.py has none at / 4."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16, 16), norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3).eval()


def build_ledits(kind: str, attention_levels: bool = False):
    """LEditsPPPipelineStableDiffusion around a fresh copy of the tiny model ("ddim" or "dpm");
    attention_levels: with attention_unet() as its UNet."""
    from diffusers import LEditsPPPipelineStableDiffusion

    from tests.reference_pipeline import build_pipeline

    tiny = build_pipeline()  # a fresh instance: invert() resets the UNet's attention processors
    unet = attention_unet() if attention_levels else tiny.unet
    scheduler = {"ddim": _ddim_scheduler, "dpm": _dpm_scheduler}[kind]()
    pipe = LEditsPPPipelineStableDiffusion(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_images(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    """Smooth random RGB images in [0, 1] (the image processor maps them to [-1, 1])."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, height // 8, width // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear",
                                           align_corners=False)


@dataclass
class LeditsRun:
    x0: torch.Tensor                 # [B, C, h, w]: the encoded image (encode_image)
    timesteps: List[int]             # the inverted timesteps, in sampling order
    num_inference_steps: int         # the scheduler's step count: int(steps * (1 + skip))
    start_index: int                 # where `timesteps` starts in the scheduler's timesteps
    alphas_cumprod: torch.Tensor     # the scheduler's, float32
    final_alpha_cumprod: Optional[float]  # DDIM only
    sigmas: Optional[torch.Tensor]   # DPM only: the scheduler's VE sigmas from start_index on
    init_latents: torch.Tensor       # [B, C, h, w]: the reference's first latents
    zs: torch.Tensor                 # [steps, B, C, h, w]: its noise maps, in sampling order
    latents: torch.Tensor            # [steps, B, C, h, w]: its latents after every step
    edits: Optional[torch.Tensor]    # [steps, B, C, h, w]: its sem_guidance (None: no concepts)
    output: torch.Tensor             # its output latents
    masks: Optional[torch.Tensor] = None  # [steps, N, B, C, h, w]: its activation_mask (a
    # 0/1 float per concept and step; zeros where a concept did not act); attention masks only
    edit_tokens: Optional[List[int]] = None  # its num_edit_tokens, per concept


def run_ledits(pipe, images: torch.Tensor, concept_sets: Mapping[str, Sequence[Concept]], *,
               steps: int, skip: float, seed: int, mask: str = "noise") -> Dict[str, LeditsRun]:
    """Inverts `images` once, then edits with each set of concepts (an empty set: no edit), all
    in the reference's code. Each __call__ starts again from the inversion's init_latents and
    zs, which it does not modify ("edits are always performed for the last inverted image")."""
    pipe.invert(images, source_prompt="", num_inversion_steps=steps, skip=skip,
                generator=torch.Generator().manual_seed(seed))
    timesteps = [int(t) for t in pipe.inversion_steps]
    x0, _ = pipe.encode_image(images, dtype=pipe.text_encoder.dtype)  # what invert() encodes
    init_latents, zs = pipe.init_latents.clone(), pipe.zs.clone()
    return {name: _edit(pipe, concepts, steps, timesteps, x0, init_latents, zs, mask)
            for name, concepts in concept_sets.items()}


MASK_ARGUMENTS = {"noise": dict(use_cross_attn_mask=False, use_intersect_mask=False),
                  "attention": dict(use_cross_attn_mask=True, use_intersect_mask=False),
                  "both": dict(use_cross_attn_mask=True, use_intersect_mask=True)}


def schedule_numbers(scheduler, steps: int) -> dict:
    """LeditsRun's schedule fields, from the scheduler an edit loop of `steps` steps ran."""
    start_index = len(scheduler.timesteps) - steps
    is_dpm = not hasattr(scheduler, "final_alpha_cumprod")
    return dict(num_inference_steps=scheduler.num_inference_steps, start_index=start_index,
                alphas_cumprod=scheduler.alphas_cumprod.clone(),
                final_alpha_cumprod=None if is_dpm else float(scheduler.final_alpha_cumprod),
                sigmas=scheduler.sigmas[start_index:].clone() if is_dpm else None)


def edit_arguments(concepts: Sequence[Concept], steps: int) -> dict:
    """The edit loop's arguments for `concepts` (LEdits++ SD and SDXL __call__ alike)."""
    if not concepts:
        return {}
    return dict(
        editing_prompt=[c.prompt for c in concepts],
        reverse_editing_direction=[c.reverse for c in concepts],
        edit_guidance_scale=[c.scale for c in concepts],
        edit_threshold=[c.threshold for c in concepts],
        edit_warmup_steps=[c.warmup for c in concepts],
        # a list entry of None would be compared with ints: steps + 1 is "never"
        edit_cooldown_steps=[steps + 1 if c.cooldown is None else c.cooldown for c in concepts])


def latents_recorder(recorded: list):
    """A callback_on_step_end that keeps every step's latents in `recorded`."""
    def record(_pipe, _i, _t, tensors):
        recorded.append(tensors["latents"].detach().clone())
        return {}
    return record


def _edit(pipe, concepts, steps, timesteps, x0, init_latents, zs, mask) -> LeditsRun:
    recorded = []
    record = latents_recorder(recorded)
    edit_args = edit_arguments(concepts, steps)
    tokens = []
    encode_prompt = pipe.encode_prompt

    def encode_and_count(*args, **kwargs):  # its num_edit_tokens, which __call__ keeps local
        result = encode_prompt(*args, **kwargs)
        tokens.append(result[2])
        return result
    pipe.encode_prompt = encode_and_count
    try:
        result = pipe(**edit_args, **MASK_ARGUMENTS[mask], output_type="latent",
                      callback_on_step_end=record,
                      callback_on_step_end_tensor_inputs=["latents"])
    finally:
        del pipe.encode_prompt
    return LeditsRun(
        x0=x0, timesteps=timesteps, **schedule_numbers(pipe.scheduler, steps),
        init_latents=init_latents, zs=zs, latents=torch.stack(recorded),
        edits=None if pipe.sem_guidance is None else pipe.sem_guidance.clone(),
        output=result.images,
        masks=None if mask == "noise" or not concepts else pipe.activation_mask.clone(),
        edit_tokens=None if tokens[0] is None else tokens[0][::len(x0)].tolist())


def text_embeddings(pipe, prompts: Sequence[str], batch: int) -> torch.Tensor:
    """[B * (1 + len(prompts)), 77, 32]: the empty prompt for each image, then each prompt for
    each image, as encode_prompt builds them (one text encoder call for the empty prompts, one
    for all the editing prompts), so that a UNet call on them matches __call__'s bit for bit."""
    def encode(texts):
        ids = pipe.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0]

    parts = [encode([""] * batch)]
    if prompts:
        parts.append(encode([p for p in prompts for _ in range(batch)]))
    return torch.cat(parts)
