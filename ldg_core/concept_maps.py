"""Concept maps: where each concept acted, as a heatmap over the finished image.

While sampling, `ConceptMapRecorder.observe` (the engine's observer) adds up, per concept, image
and latent position, the share of channels whose value passed the concept's threshold, at each
model call where the concept acted (past its warmup, not cooled). The sum stays on the
estimates' device, so recording never waits for the accelerator. A map is that sum divided by
the number of those calls: 1 where the concept acted at every call in every channel, 0 where it
never did. Passes of one image (the first pass and the hires pass) are upscaled to the image's
size and combined, each weighted by its number of calls.

Nothing is recorded, and nothing is allocated, unless the option is on.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F


class ConceptMapRecorder:
    """The counts of one sampling pass (one batch of images)."""

    def __init__(self) -> None:
        self.hits: Dict[int, torch.Tensor] = {}  # concept -> [B, H, W] float32, on device
        self.calls: Dict[int, int] = {}

    def observe(self, index: int, mask: torch.Tensor) -> None:
        share = mask.to(torch.float32).mean(dim=1)  # [B, H, W]: the share of channels
        if index in self.hits:
            self.hits[index] += share
        else:
            self.hits[index] = share.clone()
        self.calls[index] = self.calls.get(index, 0) + 1


def combine(passes: Sequence[ConceptMapRecorder], size: Tuple[int, int]) -> Dict[int, np.ndarray]:
    """Per concept, [B, height, width] float32 maps in [0, 1] at `size` = (height, width),
    combining the passes of one batch. Concepts that never acted are left out."""
    maps: Dict[int, np.ndarray] = {}
    indices = sorted({i for p in passes for i in p.hits})
    for index in indices:
        total, calls = None, 0
        for recorder in passes:
            if index not in recorder.hits:
                continue
            hits = recorder.hits[index].detach().to("cpu", torch.float32)[:, None]
            hits = F.interpolate(hits, size=size, mode="bilinear", align_corners=False)[:, 0]
            total = hits if total is None else total + hits
            calls += recorder.calls[index]
        maps[index] = (total / calls).clamp(0, 1).numpy()
    return maps


# A colour ramp of our own: transparent-ish dark blue (never) through green to red (always).
_STOPS = np.array([[0.0, 0.0, 0.5], [0.0, 0.6, 1.0], [0.2, 0.9, 0.2], [1.0, 0.9, 0.0],
                   [1.0, 0.1, 0.0]], dtype=np.float32)


def colour(heat: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] float in [0, 1] along _STOPS."""
    position = np.clip(heat, 0, 1) * (len(_STOPS) - 1)
    low = np.floor(position).astype(int).clip(0, len(_STOPS) - 2)
    t = (position - low)[..., None]
    return _STOPS[low] * (1 - t) + _STOPS[low + 1] * t


def overlay(image: np.ndarray, heat: np.ndarray, strength: float = 0.65) -> np.ndarray:
    """The heatmap over an RGB uint8 image [H, W, 3] of the same size: where the concept never
    acted the image shows through almost unchanged, where it always acted the colour covers
    `strength` of it."""
    if image.shape[:2] != heat.shape:
        raise ValueError(f"image {image.shape[:2]} and heatmap {heat.shape} differ in size")
    alpha = (0.15 + (strength - 0.15) * np.clip(heat, 0, 1))[..., None]
    mixed = image.astype(np.float32) / 255 * (1 - alpha) + colour(heat) * alpha
    return (mixed * 255 + 0.5).clip(0, 255).astype(np.uint8)


def batch_overlays(passes: Sequence[ConceptMapRecorder], images: Sequence[np.ndarray]
                   ) -> List[Tuple[int, int, np.ndarray]]:
    """(image index in the batch, concept index, overlay) for each image and concept that
    acted. `images` are the batch's finished RGB uint8 images, in order."""
    if not images or not passes:
        return []
    size = images[0].shape[:2]
    maps = combine(passes, size)
    result = []
    for b, image in enumerate(images):
        for index, heat in maps.items():
            if b < heat.shape[0]:
                result.append((b, index, overlay(image, heat[b])))
    return result
