"""SemanticGuidance.step against diffusers' SemanticStableDiffusionPipeline, step by step.

The reference runs its own denoising loop on a tiny random model and records every step's
estimates and the edit it added; we replay the estimates through our engine and compare.
"""

import random

import pytest
import torch

from ldg_core import Concept, GuidanceConfig
from tests.reference_pipeline import replay, run_reference

C = Concept
PROMPTS = ["smiling", "glasses", "oil painting", "a red hat", "snow", "dark, moody"]


def reference_divides_zero_by_zero(config: GuidanceConfig, step: int) -> bool:
    """The reference's NaN case: partial phase, every concept past warmup weighs <= 0 or is
    cooled (stated from the method's description, not from our code)."""
    past = [c for c in config.concepts if step >= c.warmup]
    if not 0 < len(past) < len(config.concepts):
        return False
    return all(c.weight <= 0 or (c.cooldown is not None and step >= c.cooldown) for c in past)


TOLERANCE = {  # (rtol, atol)
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-12, 1e-12),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def assert_matches_reference(config, run, dtype=torch.float32, subset=False):
    """Returns how many steps with a non-zero reference edit were compared."""
    ours = replay(config, run, dtype=dtype, subset=subset)
    rtol, atol = TOLERANCE[dtype]
    compared = 0
    for step, (edit, expected) in enumerate(zip(ours, run.edits)):
        assert edit.dtype == dtype and edit.shape == expected.shape
        assert not edit.isnan().any(), f"NaN in our edit at step {step}"
        if expected.isnan().any():
            # Where the reference divides 0 by 0 we deliberately apply no edit; from here on
            # its latents are NaN, so nothing later can be compared.
            assert reference_divides_zero_by_zero(config, step), f"unexpected NaN at {step}"
            assert torch.equal(edit, torch.zeros_like(edit))
            break
        torch.testing.assert_close(edit.double(), expected.double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"step {step}: {m}")
        compared += bool(expected.abs().sum() > 0)
    return compared


HAND_MADE = {
    "defaults, warmup 10 of 14": (GuidanceConfig(concepts=[C(prompt="smiling")]), {"steps": 14}),
    "partial then full phase, weights 2 and 3": (
        GuidanceConfig(concepts=[C(prompt="smiling", warmup=2, weight=2.0),
                                 C(prompt="glasses", warmup=5, weight=3.0)]), {"steps": 9}),
    "momentum fed during warmup": (
        GuidanceConfig(concepts=[C(prompt="snow", warmup=5), C(prompt="a red hat", warmup=5)],
                       momentum_scale=0.8, momentum_beta=0.3), {"steps": 9}),
    "cooled concept still counts as past warmup": (
        GuidanceConfig(concepts=[C(prompt="smiling", warmup=0, cooldown=3),
                                 C(prompt="glasses", warmup=0, weight=0.5),
                                 C(prompt="snow", warmup=6)], momentum_scale=0.2), {"steps": 10}),
    "momentum goes on after every concept cooled": (
        GuidanceConfig(concepts=[C(prompt="smiling", warmup=0, cooldown=3),
                                 C(prompt="snow", warmup=1, cooldown=4)],
                       momentum_scale=0.5, momentum_beta=0.7), {"steps": 9}),
    "cooldown before warmup": (
        GuidanceConfig(concepts=[C(prompt="smiling", warmup=6, cooldown=2),
                                 C(prompt="snow", warmup=0)], momentum_scale=0.4), {"steps": 9}),
    "thresholds 0 and 1, reverse, negative scale": (
        GuidanceConfig(concepts=[C(prompt="smiling", threshold=0.0, warmup=0),
                                 C(prompt="glasses", threshold=1.0, warmup=0, reverse=True),
                                 C(prompt="snow", scale=-4.0, warmup=1)]), {"steps": 6}),
    "scale 0, weight 0 and negative weight": (
        GuidanceConfig(concepts=[C(prompt="smiling", scale=0.0, warmup=0),
                                 C(prompt="glasses", weight=0.0, warmup=1),
                                 C(prompt="snow", weight=-2.0, warmup=0),
                                 C(prompt="oil painting", warmup=2)]), {"steps": 7}),
    "beta 0 and no momentum": (
        GuidanceConfig(concepts=[C(prompt="smiling", warmup=1)], momentum_beta=0.0), {"steps": 5}),
    "beta 1": (GuidanceConfig(concepts=[C(prompt="smiling", warmup=1)], momentum_scale=0.7,
                              momentum_beta=1.0), {"steps": 5}),
    "momentum scale 0": (GuidanceConfig(concepts=[C(prompt="smiling", warmup=3),
                                                  C(prompt="snow", warmup=1)],
                                        momentum_scale=0.0), {"steps": 6}),
    "batch 3, non-square latents": (
        GuidanceConfig(concepts=[C(prompt="smiling", warmup=1), C(prompt="snow", warmup=2)]),
        {"steps": 6, "batch": 3, "height": 16, "width": 40}),
    "ten concepts": (
        GuidanceConfig(concepts=[C(prompt=PROMPTS[i % 6] + " " * i, warmup=i % 4,
                                   weight=0.5 + i / 10, reverse=i % 3 == 0) for i in range(10)]),
        {"steps": 6}),
    "the reference's 0 / 0 becomes no edit": (
        GuidanceConfig(concepts=[C(prompt="smiling", warmup=1, weight=0.0),
                                 C(prompt="snow", warmup=4)]), {"steps": 6}),
}


@pytest.mark.parametrize("name", list(HAND_MADE))
def test_hand_made_cases_match_the_reference(name, reference_pipeline):
    config, options = HAND_MADE[name]
    run = run_reference(reference_pipeline(), config, **options)
    nan_case = name == "the reference's 0 / 0 becomes no edit"
    assert assert_matches_reference(config, run) >= 1 or nan_case


def random_config(rng: random.Random, steps: int) -> GuidanceConfig:
    """Random settings; the first concept always acts at some step, so edits are not all 0."""
    def acting():
        warmup = rng.randint(0, steps - 1)
        return C(prompt=rng.choice(PROMPTS), scale=rng.choice([5.0, -3.0, rng.uniform(1, 15)]),
                 threshold=rng.choice([0.0, 0.9, rng.random()]), warmup=warmup,
                 cooldown=rng.choice([None, rng.randint(warmup + 1, steps)]),
                 weight=rng.choice([1.0, rng.uniform(0.5, 3)]), reverse=rng.random() < 0.4)

    def concept():
        return C(prompt=rng.choice(PROMPTS),
                 scale=rng.choice([5.0, 0.0, -3.0, rng.uniform(-10, 20), rng.uniform(0, 20)]),
                 threshold=rng.choice([0.0, 1.0, 0.9, rng.random(), rng.random()]),
                 warmup=rng.randint(0, steps),
                 cooldown=rng.choice([None, None, rng.randint(0, steps)]),
                 weight=rng.choice([1.0, 0.0, -1.0, rng.uniform(0, 3), rng.uniform(0, 3)]),
                 reverse=rng.random() < 0.4)
    return GuidanceConfig(concepts=[acting()] + [concept() for _ in range(rng.randint(0, 3))],
                          momentum_scale=rng.choice([0.0, 0.1, rng.uniform(-1, 1)]),
                          momentum_beta=rng.choice([0.0, 0.4, 1.0, rng.random()]))


@pytest.mark.parametrize("seed", range(40))
def test_random_cases_match_the_reference(seed, reference_pipeline):
    rng = random.Random(seed)
    steps = rng.randint(3, 12)
    config = random_config(rng, steps)
    run = run_reference(reference_pipeline(), config, steps=steps, batch=rng.randint(1, 2),
                        height=8 * rng.randint(1, 3), width=8 * rng.randint(1, 3), seed=seed,
                        guidance_scale=rng.choice([7.5, 3.0]))
    nan_case = any(reference_divides_zero_by_zero(config, i) for i in range(steps))
    assert assert_matches_reference(config, run) >= 1 or nan_case


DTYPE_CASE = GuidanceConfig(
    concepts=[C(prompt="smiling", warmup=2, threshold=0.8),
              C(prompt="glasses", warmup=4, cooldown=7, weight=2.0, reverse=True)],
    momentum_scale=0.3, momentum_beta=0.6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_match_the_reference(dtype, reference_pipeline):
    run = run_reference(reference_pipeline(dtype), DTYPE_CASE, steps=9, batch=2, width=24)
    assert assert_matches_reference(DTYPE_CASE, run, dtype=dtype) == 7  # steps 2-8 edit


@pytest.mark.parametrize("seed", range(0, 40, 4))
def test_skipping_matches_the_reference(seed, reference_pipeline):
    rng = random.Random(seed)
    steps = rng.randint(3, 12)
    config = random_config(rng, steps)
    run = run_reference(reference_pipeline(), config, steps=steps, seed=seed)
    nan_case = any(reference_divides_zero_by_zero(config, i) for i in range(steps))
    assert assert_matches_reference(config, run, subset=True) >= 1 or nan_case
