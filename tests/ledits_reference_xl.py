"""The independent oracle for inversion on SDXL: diffusers' LEditsPPPipelineStableDiffusionXL.

diffusers/pipelines/ledits_pp/pipeline_leditspp_stable_diffusion_xl.py, on a tiny random
SDXL-shaped model built here offline (nothing is downloaded): two CLIP text encoders
(CLIPTextModel, CLIPTextModelWithProjection) over tests/reference_pipeline.py's tokenizer, a
UNet2DConditionModel with SDXL's "text_time" added conditioning, and a small VAE; with
DDIMScheduler (edit-friendly DDPM inversion, compute_noise_ddim) or DPMSolverMultistepScheduler
"sde-dpmsolver++" order 2 (compute_noise_sde_dpm_pp_2nd), as tests/ledits_reference.py does
for LEditsPPPipelineStableDiffusion.

`run_ledits_xl` calls the pipeline's own `invert()` once, then its `__call__` edit loop once per
set of concepts (use_cross_attn_mask=False, use_intersect_mask=False), and keeps what
tests/ledits_reference.py keeps (x0, init_latents, zs, every step's latents and sem_guidance,
the schedule numbers), plus every UNet call's inputs, recorded by a forward pre-hook on the
UNet: the latents, the timestep, the prompt embeddings and the added conditioning (pooled
"text_embeds" and "time_ids") that invert() and __call__ built. Our side calls the UNet with
exactly those, instead of re-deriving SDXL's conditioning.

Nothing in the reference is changed. Unlike the SD pipeline's, the XL invert() passes its
timestep to add_noise as an int64 tensor (t.unsqueeze(0)), so DDIMScheduler runs as it is (no
DDIMIntAddNoise). What the reference does, as found in diffusers 0.42.1:
  - invert() zeroes the last `num_zero_noise_steps` noise maps (default 3, "against noise
    artifacts"), so by default its edit loop does not reproduce the image: that is not
    edit-friendly inversion. We pass num_zero_noise_steps=0, the SD pipeline's behaviour.
  - invert() swaps height and width: width = x0.shape[2] * vae_scale_factor (the latent
    height), height = x0.shape[3] * ..., self.size = (height, width); SDXL's add_time_ids
    (original size, crop, target size) want (height, width) (StableDiffusionXLPipeline), so a
    non-square image is conditioned on its transposed size ([64, 32, 0, 0, 64, 32] for 32 x 64
    pixels here). Recorded as it is; our side uses the recorded time_ids.
  - __call__ with editing prompts works for one image only: encode_prompt does not repeat the
    editing prompts per image (the SD pipeline's repeat is commented out there), so with 2
    images the UNet gets 2 + N prompt and pooled embeddings for 2 * (1 + N) latents and time
    ids and fails (RuntimeError in its add_embedding). We use one image.
  - the empty prompt's embeddings are zeros (force_zeros_for_empty_prompt, the default), in
    invert() and in __call__'s unconditional half.
  - its __init__ does not force the scheduler's steps_offset to 1 as the SD pipeline's does;
    both schedulers get tests/ledits_reference.py BETAS, which say steps_offset=1.
  - with DPM-Solver++ the quirks of the SD pipeline carry over (the same copied
    compute_noise_sde_dpm_pp_2nd): the inversion's last step (to sigma 0) is second order with
    h = inf, so its z is 0, and the edit loop's last step returns the denoised estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence

import torch

from ldg_core import Concept
from tests.ledits_reference import (BETAS, LeditsRun, _dpm_scheduler, edit_arguments,
                                     latents_recorder, schedule_numbers)

TEXT_WIDTH = 32      # each text encoder's hidden size; the UNet attends to both, concatenated
POOLED_WIDTH = 32    # text_encoder_2's projection_dim: the pooled "text_embeds"
TIME_ID_WIDTH = 8    # addition_time_embed_dim: each of the 6 add_time_ids is embedded to this


def _ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **BETAS)


def _text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tests.reference_pipeline import _tokenizer

    (tokenizer, vocab_size), (tokenizer_2, _) = _tokenizer(), _tokenizer()
    config = dict(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=37,
                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                  bos_token_id=0, eos_token_id=1, pad_token_id=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config))
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**config, projection_dim=POOLED_WIDTH))
    return tokenizer, tokenizer_2, text_encoder, text_encoder_2


def build_ledits_xl(kind: str):
    """LEditsPPPipelineStableDiffusionXL around a fresh tiny random model ("ddim" or "dpm")."""
    from diffusers import AutoencoderKL, LEditsPPPipelineStableDiffusionXL, UNet2DConditionModel

    torch.manual_seed(0)
    tokenizer, tokenizer_2, text_encoder, text_encoder_2 = _text_encoders()
    # SDXL's layout, shrunk: a plain block first, cross-attention (linear projections, more
    # transformer layers deeper) after; the added conditioning is the pooled text embedding
    # and the 6 time ids, each embedded to TIME_ID_WIDTH (LEditsPPPipelineStableDiffusionXL
    # ._get_add_time_ids checks this sum against add_embedding.linear_1.in_features).
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), cross_attention_dim=2 * TEXT_WIDTH,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_ID_WIDTH,
        projection_class_embeddings_input_dim=6 * TIME_ID_WIDTH + POOLED_WIDTH)
    # sample_size 64: the image size invert() compares against before warning
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64)
    scheduler = {"ddim": _ddim_scheduler, "dpm": _dpm_scheduler}[kind]()
    pipe = LEditsPPPipelineStableDiffusionXL(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class UnetCall:
    """One call of the UNet, as the reference made it."""
    sample: torch.Tensor                 # the latents it got (after scale_model_input)
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor  # [rows, 77, 2 * TEXT_WIDTH]
    text_embeds: torch.Tensor            # [rows, POOLED_WIDTH]: added_cond_kwargs
    time_ids: torch.Tensor               # [rows, 6]: added_cond_kwargs


@dataclass
class LeditsXLRun(LeditsRun):
    """What tests/ledits_reference.py LeditsRun keeps (so the SD test's rule helpers read it),
    plus the UNet calls."""
    inversion_calls: List[UnetCall] = field(default_factory=list)  # invert()'s, one per step
    calls: List[UnetCall] = field(default_factory=list)  # __call__'s, one per step


class _RecordUnetCalls:
    """A forward pre-hook on the UNet that keeps each call's inputs, while in a `with`."""

    def __init__(self, unet):
        self.unet, self.calls = unet, []

    def __enter__(self):
        self.handle = self.unet.register_forward_pre_hook(self._record, with_kwargs=True)
        return self.calls

    def __exit__(self, *exc):
        self.handle.remove()

    def _record(self, _module, args, kwargs):
        sample, timestep = args  # invert() and __call__ pass both by position
        added = kwargs["added_cond_kwargs"]
        assert set(added) == {"text_embeds", "time_ids"}, set(added)
        assert kwargs.get("cross_attention_kwargs") is None
        self.calls.append(UnetCall(
            sample=sample.detach().clone(), timestep=timestep.detach().clone(),
            encoder_hidden_states=kwargs["encoder_hidden_states"].detach().clone(),
            text_embeds=added["text_embeds"].detach().clone(),
            time_ids=added["time_ids"].detach().clone()))


def run_ledits_xl(pipe, images: torch.Tensor, concept_sets: Mapping[str, Sequence[Concept]], *,
                  steps: int, skip: float, seed: int) -> Dict[str, LeditsXLRun]:
    """Inverts `images` once (no noise map zeroed), then edits with each set of concepts (an
    empty set: no edit), all in the reference's code; each edit starts again from the
    inversion's init_latents and zs (tests/ledits_reference.py run_ledits)."""
    with _RecordUnetCalls(pipe.unet) as inversion_calls:
        pipe.invert(images, source_prompt="", num_inversion_steps=steps, skip=skip,
                    generator=torch.Generator().manual_seed(seed), num_zero_noise_steps=0)
    assert len(inversion_calls) == steps
    timesteps = [int(t) for t in pipe.inversion_steps]
    x0, _ = pipe.encode_image(images, dtype=pipe.text_encoder_2.dtype)  # what invert() encodes
    init_latents, zs = pipe.init_latents.clone(), pipe.zs.clone()
    return {name: _edit_xl(pipe, concepts, steps, timesteps, x0, init_latents, zs,
                           list(inversion_calls))
            for name, concepts in concept_sets.items()}


def _edit_xl(pipe, concepts, steps, timesteps, x0, init_latents, zs,
             inversion_calls) -> LeditsXLRun:
    """One __call__, as tests/ledits_reference.py _edit makes it (whose encode_prompt wrapper
    reads the SD pipeline's return layout, hence this XL version)."""
    recorded = []
    record = latents_recorder(recorded)
    edit_args = edit_arguments(concepts, steps)
    with _RecordUnetCalls(pipe.unet) as calls:
        result = pipe(**edit_args, use_cross_attn_mask=False, use_intersect_mask=False,
                      output_type="latent", callback_on_step_end=record,
                      callback_on_step_end_tensor_inputs=["latents"])
    assert len(calls) == len(recorded) == steps
    return LeditsXLRun(
        x0=x0, timesteps=timesteps, **schedule_numbers(pipe.scheduler, steps),
        init_latents=init_latents, zs=zs, latents=torch.stack(recorded),
        edits=None if pipe.sem_guidance is None else pipe.sem_guidance.clone(),
        output=result.images, inversion_calls=inversion_calls, calls=calls)
