"""The sampler's space and the engine's: model outputs to noise estimates, edits back.

Samplers hand the CFG step either noise estimates (eps: the WebUI's DDIM, PLMS and UniPC) or
denoised predictions (x0: k-diffusion samplers, Forge and ComfyUI; for v-prediction models the
wrapper has already turned v into x0). The engine works in eps. With x = x0 + sigma * eps,
eps = (x - x0) / sigma, and an eps change d is an x0 change -sigma * d.
"""

from __future__ import annotations

import torch


def per_image(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`sigma` [B] shaped to broadcast over `like` [..., B, C, H, W]."""
    return sigma.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def eps_from_output(out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
                    eps_outputs: bool) -> torch.Tensor:
    """eps of model outputs [..., B, C, H, W] whose inputs were the images' x and sigma."""
    if eps_outputs:
        return out
    return (x - out) / per_image(sigma, x)


def output_change(edit: torch.Tensor, sigma: torch.Tensor, eps_outputs: bool) -> torch.Tensor:
    """The change of the sampler's combined output that makes the eps change `edit`."""
    return edit if eps_outputs else edit * -per_image(sigma, edit)
