"""Procedural training data for the toy model: one coloured shape on a coloured background.

Every image is drawn from a few named attributes. Its caption names all of them ("a small
blue square on a yellow background") or only some ("blue", "a square", "red on white"), so the
one- or two-word prompts people use as concepts are in the model's distribution.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

SIZE = 32
COLOURS = {
    "red": (215, 35, 35), "green": (35, 165, 55), "blue": (35, 65, 215),
    "yellow": (235, 210, 35), "purple": (135, 45, 175), "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (5.0, 7.0), "large": (9.0, 11.0)}  # radius range in pixels
JITTER = 3.0  # how far (pixels) a shape's centre may be from the image's


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    background: str
    centre: Tuple[float, float]
    radius: float


def random_scene(rng: random.Random) -> Scene:
    colour = rng.choice(list(COLOURS))
    background = rng.choice([c for c in COLOURS if c != colour])
    size = rng.choice(list(SIZES))
    radius = rng.uniform(*SIZES[size])
    # Near the middle: a tiny model learns shapes much sooner when they do not roam far.
    centre = (SIZE / 2 + rng.uniform(-JITTER, JITTER), SIZE / 2 + rng.uniform(-JITTER, JITTER))
    return Scene(rng.choice(SHAPES), colour, size, background, centre, radius)


def shape_mask(scene: Scene) -> np.ndarray:
    """Boolean [SIZE, SIZE]: where the shape is. All three shapes have about the same area."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    cx, cy = scene.centre
    r = scene.radius
    if scene.shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if scene.shape == "square":
        half = r * math.sqrt(math.pi) / 2
        return (abs(xs - cx) <= half) & (abs(ys - cy) <= half)
    # An upright equilateral triangle whose circumradius is 1.3 r.
    big = r * 1.3
    top, bottom = cy - big, cy + big / 2
    half_width = (ys - top) / (bottom - top) * big * math.sqrt(3) / 2
    return (ys >= top) & (ys <= bottom) & (abs(xs - cx) <= half_width)


def render(scene: Scene) -> np.ndarray:
    """uint8 [SIZE, SIZE, 3]."""
    image = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    image[:] = COLOURS[scene.background]
    image[shape_mask(scene)] = COLOURS[scene.colour]
    return image


def caption(scene: Scene, rng: random.Random) -> str:
    """A full caption half of the time, otherwise one that names only some attributes."""
    s, c, z, b = scene.shape, scene.colour, scene.size, scene.background
    forms = [
        (10, f"a {z} {c} {s} on a {b} background"),
        (3, f"a {c} {s} on a {b} background"),
        (3, f"a {c} {s}"),
        (1, f"a {z} {c} {s}"),
        (1, f"a {s} on a {b} background"),
        (2, f"a {s}"),
        (1, f"a {z} {s}"),
        (2, c),
        (1, s),
        (2, f"{c} on {b}"),
        (1, f"{b} background"),
    ]
    return rng.choices([text for _, text in forms], weights=[w for w, _ in forms])[0]


def batch(rng: random.Random, count: int) -> Tuple[np.ndarray, List[str]]:
    scenes = [random_scene(rng) for _ in range(count)]
    return np.stack([render(s) for s in scenes]), [caption(s, rng) for s in scenes]
