"""The independent oracle: diffusers' SemanticStableDiffusionPipeline on a tiny random model.

Everything is built offline from configs (no weights, no tokenizer files are downloaded): a
CLIP text encoder and tokenizer over a vocabulary written here, a small UNet with
cross-attention and a small VAE (unused: latents are returned). The pipeline records every
step's estimates and the edit it applied, which the tests replay through our engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ldg_core import GuidanceConfig


@dataclass
class ReferenceRun:
    uncond: torch.Tensor    # [steps, B, C, H, W]
    cond: torch.Tensor      # [steps, B, C, H, W]
    concepts: torch.Tensor  # [steps, N, B, C, H, W]
    edits: torch.Tensor     # [steps, B, C, H, W]: what the reference added at each step


def _tokenizer():
    from transformers.models.clip.tokenization_clip import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789,.!?'()[]:":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77), len(vocab)


def semantic_pipeline(unet, text_encoder, tokenizer):
    """diffusers' SEGA pipeline around `unet`, with DDIM and a small unused VAE (latents are
    returned), no safety checker, no progress bar."""
    from diffusers import AutoencoderKL, DDIMScheduler, SemanticStableDiffusionPipeline

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2).to(unet.device)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False)
    pipe = SemanticStableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer, vocab_size = _tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return semantic_pipeline(unet, text_encoder, tokenizer).to(dtype=dtype)


def run_reference(pipe, config: GuidanceConfig, *, steps: int, batch: int = 1,
                  height: int = 16, width: int = 16, seed: int = 0,
                  prompt: str = "a cat, smiling", guidance_scale: float = 7.5) -> ReferenceRun:
    """Runs the reference with `config`'s concepts and returns what it recorded per step."""
    concepts = config.concepts
    never = steps + 1  # the reference takes per-concept cooldowns as a list of ints only
    dtype = pipe.unet.dtype
    previous_default = torch.get_default_dtype()
    # The pipeline records its estimates in tensors of the default dtype: make that exact.
    torch.set_default_dtype(torch.float64 if dtype == torch.float64 else torch.float32)
    try:
        pipe(
            prompt=[prompt] * batch, height=height, width=width, num_inference_steps=steps,
            guidance_scale=guidance_scale, output_type="latent",
            generator=torch.Generator().manual_seed(seed),
            editing_prompt=[c.prompt for c in concepts],
            reverse_editing_direction=[c.reverse for c in concepts],
            edit_guidance_scale=[c.scale for c in concepts],
            edit_threshold=[c.threshold for c in concepts],
            edit_warmup_steps=[c.warmup for c in concepts],
            edit_cooldown_steps=[never if c.cooldown is None else c.cooldown for c in concepts],
            edit_weights=[c.weight for c in concepts],
            edit_momentum_scale=config.momentum_scale, edit_mom_beta=config.momentum_beta)
    finally:
        torch.set_default_dtype(previous_default)
    return ReferenceRun(uncond=pipe.uncond_estimates[:steps], cond=pipe.text_estimates[:steps],
                        concepts=pipe.edit_estimates[:steps], edits=pipe.sem_guidance[:steps])


def replay(config: GuidanceConfig, run: ReferenceRun, dtype: Optional[torch.dtype] = None,
           subset: bool = False) -> List[torch.Tensor]:
    """Our engine over the reference's recorded estimates: one edit per step.

    With subset=True only the estimates that SemanticGuidance.needed() asks for are passed.
    """
    from ldg_core import SemanticGuidance

    dtype = dtype or run.uncond.dtype
    guidance = SemanticGuidance(config)
    edits = []
    for i in range(run.uncond.shape[0]):
        estimates = run.concepts[i].to(dtype)
        if subset:
            estimates = estimates[list(guidance.needed(i))]
        edits.append(guidance.step(step=i, uncond=run.uncond[i].to(dtype),
                                   cond=run.cond[i].to(dtype), concepts=estimates))
    return edits
