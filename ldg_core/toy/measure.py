"""A simple pixel classifier of ours for the toy model's images, and the measures the demo,
the training figures and the semantic tests use. Everything works on uint8 [H, W, 3] arrays.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .data import COLOURS

NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[n] for n in NAMES], dtype=np.float32)


def colour_map(image: np.ndarray) -> np.ndarray:
    """[H, W] index into NAMES of each pixel's nearest named colour."""
    distance = ((image[..., None, :].astype(np.float32) - PALETTE) ** 2).sum(-1)
    return distance.argmin(-1)


def colour_share(image: np.ndarray, colour: str) -> float:
    """The fraction of pixels whose nearest named colour is `colour`."""
    return float((colour_map(image) == NAMES.index(colour)).mean())


def background_index(labels: np.ndarray) -> int:
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return int(np.bincount(border, minlength=len(NAMES)).argmax())


def foreground(image: np.ndarray) -> np.ndarray:
    """Boolean [H, W]: pixels not of the background's colour (the most common on the border)."""
    labels = colour_map(image)
    return labels != background_index(labels)


def layout_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two images' foregrounds: 1 means the same layout."""
    fa, fb = foreground(a), foreground(b)
    union = (fa | fb).sum()
    return float((fa & fb).sum() / union) if union else 1.0


def shape_of(mask: np.ndarray) -> Optional[str]:
    """circle, square or triangle by how much of its bounding box the mask fills
    (pi/4 for a circle, 1 for a square, 1/2 for a triangle); None if there is no shape."""
    if mask.sum() < 12:
        return None
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    if fill > 0.9:
        return "square"
    return "circle" if fill > 0.64 else "triangle"


def describe(image: np.ndarray) -> Tuple[Optional[str], Optional[str], str]:
    """(shape, colour, background) as the classifier sees them."""
    labels = colour_map(image)
    back = background_index(labels)
    counts = np.bincount(labels[labels != back], minlength=len(NAMES))
    if counts.sum() == 0:
        return None, None, NAMES[back]
    colour = int(counts.argmax())
    return shape_of(labels == colour), NAMES[colour], NAMES[back]


def changed_pixels(a: np.ndarray, b: np.ndarray, tolerance: int = 24) -> float:
    """The fraction of pixels that differ by more than `tolerance` in any channel."""
    return float((np.abs(a.astype(np.int16) - b.astype(np.int16)).max(-1) > tolerance).mean())
