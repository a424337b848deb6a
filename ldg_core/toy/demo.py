"""The demo: semantic guidance on the toy model next to what users do today instead.

`python -m ldg_core.toy.demo [--out PATH] [--seeds N]` draws a captioned PNG grid of the method
authors' example applications (add, remove, boost, suppress, several concepts at once),
sweeps of scale, threshold and warmup, our "Safety" presets next to Safe Latent Diffusion's
configurations (a colour stands in for the concept to remove), editing a picture in img2img
with "Keep the image" (LEDITS++ inversion) next to plain img2img, prints a table of the measured
effects over several seeds, and prints the PNG's path as its last line.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ..config import Concept, GuidanceConfig
from ..presets import BUILTIN_PRESETS
from ..safety_config import PRESETS as SLD_PRESETS
from ..safety_config import SafetyConfig
from . import data, load
from .measure import colour_share, layout_overlap

DEFAULT_OUT = "ldg_toy_demo.png"
CELL, ZOOM, TEXT_ROWS = 32, 4, 3


@dataclass
class Cell:
    caption: str  # under the image
    prompt: str
    guidance: Optional[GuidanceConfig] = None
    negative_prompt: str = ""
    safety: Optional[SafetyConfig] = None
    image: Optional[np.ndarray] = None  # img2img's input (strength 0: the input itself)
    strength: float = 0.0
    keep_image: bool = False  # LEDITS++ inversion


@dataclass
class Row:
    title: str
    cells: List[Cell]
    colour: str  # the colour whose share measures the effect
    measured: Sequence[int] = field(default_factory=list)  # cells reported in the table


def concept(prompt, **settings) -> Concept:
    return Concept(prompt, **{"scale": 8.0, "threshold": 0.8, "warmup": 2, **settings})


def guided(*concepts: Concept, momentum: float = 0.0) -> GuidanceConfig:
    return GuidanceConfig(concepts=list(concepts), momentum_scale=momentum)


def sega_safety(level: str, colour: str) -> GuidanceConfig:
    """Our preset "Safety: <level>" with its concept prompt replaced by `colour` (removed)."""
    config = BUILTIN_PRESETS[f"Safety: {level}"].config
    return replace(config, concepts=[replace(c, prompt=colour) for c in config.concepts])


def safety_rows(colour: str = "red") -> List[Row]:
    """Our SEGA "Safety" presets and SLD's configurations, both removing `colour` from a
    prompt that asks for it: the colour stands in for unsafe content."""
    prompt = f"a {colour} circle on a white background"
    levels = list(SLD_PRESETS)  # weak, medium, strong, max
    return [
        Row(f'SEGA Safety presets, "{colour}"', [Cell("plain", prompt)] + [
            Cell(f"SEGA Safety {level}", prompt, sega_safety(level, colour)) for level in levels
        ], colour, range(1, 5)),
        Row(f'SLD configurations, "{colour}"', [Cell("plain", prompt)] + [
            Cell(f"SLD {level}", prompt, safety=SafetyConfig.preset(level, colour))
            for level in levels
        ], colour, range(1, 5)),
    ]


def edit_rows(colour: str = "red") -> List[Row]:
    """img2img of a rendered picture at strength 0.75 (DPM++ 2M SDE): plain, and keeping the
    image (LEDITS++), each without and with "remove <colour>"."""
    picture = data.render(data.Scene("circle", colour, "large", "white", (16.0, 16.0), 10.0))
    prompt = f"a {colour} circle"
    remove = guided(concept(colour, reverse=True))
    return [Row(f'img2img: remove "{colour}"', [
        Cell("input picture", prompt, image=picture),
        Cell("img2img 0.75", prompt, image=picture, strength=0.75),
        Cell(f'img2img 0.75, LDG remove "{colour}"', prompt, remove, image=picture,
             strength=0.75),
        Cell("keep the image (LEDITS++), no concept", prompt, image=picture, strength=0.75,
             keep_image=True),
        Cell(f'keep the image, remove "{colour}"', prompt, remove, image=picture, strength=0.75,
             keep_image=True),
    ], colour, range(1, 5))]


def rows() -> List[Row]:
    """The applications; prompts with no colour ("a large circle") leave colour to concepts."""
    free, red = "a large circle", "a red circle on a white background"
    purple = "a purple square on a yellow background"
    return [
        Row("Add a concept", [
            Cell("plain", free),
            Cell('LDG: add "blue"', free, guided(concept("blue"))),
            Cell('prompt "a large blue circle"', "a large blue circle"),
        ], "blue", (1, 2)),
        Row("Remove a concept", [
            Cell("plain", red),
            Cell('LDG: remove "red"', red, guided(concept("red", reverse=True))),
            Cell('negative prompt "red"', red, negative_prompt="red"),
        ], "red", (1, 2)),
        Row("Boost (add what the prompt has)", [
            Cell("plain", "a blue circle"),
            Cell('LDG: add "blue", scale 4', "a blue circle", guided(concept("blue", scale=4.0))),
            Cell('prompt "a blue circle blue"', "a blue circle blue"),
        ], "blue", (1, 2)),
        Row("Suppress (remove a little)", [
            Cell("plain", purple),
            Cell('LDG: remove "purple", scale 4', purple,
                 guided(concept("purple", reverse=True, scale=4.0))),
            Cell('negative prompt "purple"', purple, negative_prompt="purple"),
        ], "purple", (1, 2)),
        Row("Several concepts at once", [
            Cell("plain", free),
            Cell('LDG: add "blue", remove "red"', free,
                 guided(concept("blue"), concept("red", reverse=True))),
            Cell('prompt "a large blue circle", negative "red"', "a large blue circle",
                 negative_prompt="red"),
        ], "blue", (1, 2)),
        Row('Scale sweep: add "blue"', [Cell("plain", free)] + [
            Cell(f"scale {s:g}", free, guided(concept("blue", scale=s)))
            for s in (2, 4, 8, 12, 16)
        ], "blue", range(1, 6)),
        Row('Threshold sweep: add "blue"', [Cell("plain", free)] + [
            Cell(f"threshold {t:g}", free, guided(concept("blue", threshold=t)))
            for t in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
        ], "blue", range(1, 7)),
        Row('Warmup sweep: add "blue"', [Cell("plain", free)] + [
            Cell(f"warmup {w}", free, guided(concept("blue", warmup=w)))
            for w in (0, 2, 4, 6, 10, 15)
        ], "blue", range(1, 7)),
    ] + safety_rows() + edit_rows()


def measure_rows(pipe, table: List[Row], seeds: int, progress) -> dict:
    """images[(row, cell, seed)] for every cell, and the effects over seeds."""
    images = {}
    for r, row in enumerate(table):
        for c, cell in enumerate(row.cells):
            for seed in range(seeds):
                images[r, c, seed] = make(pipe, cell, seed)
                progress.update()
    return images


def make(pipe, cell: Cell, seed: int) -> np.ndarray:
    if cell.image is None:
        return pipe.generate(cell.prompt, seed=seed, guidance=cell.guidance,
                             negative_prompt=cell.negative_prompt, safety=cell.safety)
    if not cell.strength:
        return cell.image
    return pipe.edit(cell.image, cell.prompt, seed=seed, strength=cell.strength,
                     keep_image=cell.keep_image, guidance=cell.guidance,
                     negative_prompt=cell.negative_prompt)


def effects(table: List[Row], images: dict, seeds: int) -> List[tuple]:
    """(row, cell, colour share before, after, layout kept) averaged over seeds; "before" is
    the row's first image: the same prompt, unguided."""
    lines = []
    for r, row in enumerate(table):
        for c in row.measured:
            before = [images[r, 0, s] for s in range(seeds)]
            after = [images[r, c, s] for s in range(seeds)]
            lines.append((row.title, row.cells[c].caption,
                          np.mean([colour_share(i, row.colour) for i in before]),
                          np.mean([colour_share(i, row.colour) for i in after]),
                          np.mean([layout_overlap(a, b) for a, b in zip(before, after)]),
                          row.colour))
    return lines


def draw_grid(table: List[Row], images: dict, path: str) -> None:
    font = ImageFont.load_default()
    width = CELL * ZOOM
    columns = max(len(row.cells) for row in table)
    title_h, text_h = 16, 12 * TEXT_ROWS
    row_h = title_h + width + text_h
    grid = Image.new("RGB", (columns * (width + 8) + 8, len(table) * row_h + 8), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(table):
        top = r * row_h + 4
        draw.text((8, top), f"{row.title}   prompt: {row.cells[0].prompt}", fill="black", font=font)
        for c, cell in enumerate(row.cells):
            left = 8 + c * (width + 8)
            picture = Image.fromarray(images[r, c, 0]).resize((width, width), Image.NEAREST)
            grid.paste(picture, (left, top + title_h))
            for line, text in enumerate(_wrap(cell.caption, 21)[:TEXT_ROWS]):
                draw.text((left, top + title_h + width + 2 + 12 * line), text, fill="black",
                          font=font)
    grid.save(path)


def _wrap(text: str, width: int) -> List[str]:
    lines, current = [], ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return lines + [current]


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--seeds", type=int, default=4, help="seeds per cell for the table")
    parser.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    start = time.time()
    pipe = load(args.weights) if args.weights else load()
    table = rows()
    total = sum(len(row.cells) for row in table) * args.seeds
    with tqdm(total=total, desc="generating", unit="image") as progress:
        images = measure_rows(pipe, table, args.seeds, progress)
    draw_grid(table, images, args.out)
    print(f"\nMeasured effects, mean of {args.seeds} seeds (20 Euler steps, CFG 7; img2img: "
          "20 DPM++ 2M SDE steps, before = the input picture). "
          "Layout kept: overlap of the shape with the plain image's (1 = same place and form).")
    print(f"{'application':32} {'edit':46} {'colour':7} {'before':>6} {'after':>6} "
          f"{'layout kept':>11}")
    for title, caption, before, after, kept, colour in effects(table, images, args.seeds):
        print(f"{title:32} {caption:46} {colour:7} {before:6.2f} {after:6.2f} {kept:11.2f}")
    print(f"{total} images in {time.time() - start:.0f} s")
    path = os.path.abspath(args.out)
    print(path)
    return path


if __name__ == "__main__":
    main()
