"""How often the toy model draws what its caption says, by our pixel classifier:
`python -m ldg_core.toy.evaluate [--weights PATH] [--count N]`."""

from __future__ import annotations

import argparse
import random

from . import data
from .measure import describe
from .pipeline import WEIGHTS, load


def caption_accuracy(pipe, count: int = 60, seed: int = 0) -> dict:
    """Shares of full-caption generations whose shape, colour, background (and all three)
    the classifier reads as the caption says (20 Euler steps, CFG 7, seeds 0..count-1)."""
    rng = random.Random(seed)
    hits = {"shape": 0, "colour": 0, "background": 0, "all": 0}
    for index in range(count):
        scene = data.random_scene(rng)
        prompt = f"a {scene.size} {scene.colour} {scene.shape} on a {scene.background} background"
        got = describe(pipe.generate(prompt, seed=index))
        match = (got[0] == scene.shape, got[1] == scene.colour, got[2] == scene.background)
        for key, ok in zip(("shape", "colour", "background"), match):
            hits[key] += ok
        hits["all"] += all(match)
    return {key: value / count for key, value in hits.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=WEIGHTS)
    parser.add_argument("--count", type=int, default=60)
    args = parser.parse_args(argv)
    scores = caption_accuracy(load(args.weights), args.count)
    print("  ".join(f"{key} {value:.0%}" for key, value in scores.items()))


if __name__ == "__main__":
    main()
