"""The contract of SemanticGuidance.step beyond the math: forms, state, errors, no host sync."""

import random

import pytest
import torch

from ldg_core import Concept, GuidanceConfig, SemanticGuidance
from tests.test_reference import random_config

C = Concept
SHAPE = (2, 4, 6, 10)


def estimates(n, seed, shape=SHAPE, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    u, t = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    c = torch.randn((n, *shape), generator=g)
    return u.to(dtype), t.to(dtype), c.to(dtype)


def two_concepts(**momentum):
    return GuidanceConfig(concepts=[C(prompt="a", warmup=1), C(prompt="b", warmup=2, weight=2.0)],
                          **momentum)


def test_inputs_are_not_modified_and_output_matches_uncond():
    guidance = SemanticGuidance(two_concepts(momentum_scale=0.5))
    for step in range(5):
        u, t, c = estimates(2, step)
        copies = [x.clone() for x in (u, t, c)]
        edit = guidance.step(step=step, uncond=u, cond=t, concepts=c)
        for before, after in zip(copies, (u, t, c)):
            assert torch.equal(before, after)
        assert edit.shape == u.shape and edit.dtype == u.dtype and edit.device == u.device
        assert edit is not u and edit is not t


def test_list_of_tensors_is_the_same_as_a_stacked_tensor():
    config = two_concepts(momentum_scale=0.3)
    stacked, listed = SemanticGuidance(config), SemanticGuidance(config)
    for step in range(5):
        u, t, c = estimates(2, step)
        assert torch.equal(stacked.step(step=step, uncond=u, cond=t, concepts=c),
                           listed.step(step=step, uncond=u, cond=t, concepts=list(c)))


def everything_needed(config, step, end_step=None):
    return tuple(range(len(config.concepts)))


@pytest.mark.parametrize("seed", range(30))
def test_skipped_estimates_give_bit_identical_edits(seed, monkeypatch):
    rng = random.Random(1000 + seed)
    steps = rng.randint(2, 12)
    config = random_config(rng, steps)
    calls = [(step, estimates(len(config.concepts), seed * 100 + step)) for step in range(steps)]
    # Half the cases tell the engine where the pass ends, which lets it skip more.
    skipping = SemanticGuidance(config, end_step=steps if seed % 2 else None)
    skipped_edits = []
    for step, (u, t, c) in calls:
        needed = list(skipping.needed(step))
        subset = c[needed] if needed else None
        skipped_edits.append(skipping.step(step=step, uncond=u, cond=t, concepts=subset))
    # The same pass computing every concept's term at every step, as the reference does.
    monkeypatch.setattr("ldg_core.guidance.concepts_needed", everything_needed)
    everything = SemanticGuidance(config)
    for (step, (u, t, c)), skipped in zip(calls, skipped_edits):
        assert torch.equal(everything.step(step=step, uncond=u, cond=t, concepts=c), skipped)


def test_what_is_needed_follows_the_rules():
    concepts = [C(prompt="zero scale", scale=0.0, warmup=0),
                C(prompt="zero weight", weight=0.0, warmup=0),
                C(prompt="negative weight", weight=-1.0, warmup=0),
                C(prompt="cools at 3", warmup=0, cooldown=3),
                C(prompt="warm from 2", warmup=2)]
    no_momentum = SemanticGuidance(GuidanceConfig(concepts=concepts, momentum_scale=0.0))
    assert [no_momentum.needed(i) for i in range(5)] == [(3,), (3,), (3, 4), (4,), (4,)]
    momentum = SemanticGuidance(GuidanceConfig(concepts=concepts, momentum_scale=0.1))
    assert [momentum.needed(i) for i in range(5)] == [(3, 4), (3, 4), (3, 4), (4,), (4,)]
    # With beta 1 the momentum buffer never leaves zero, so warmup steps need nothing either.
    stuck = SemanticGuidance(GuidanceConfig(concepts=concepts, momentum_scale=0.1,
                                            momentum_beta=1.0))
    assert stuck.needed(0) == (3,)
    # A pass that ends before every concept is past its warmup never applies the momentum.
    short = SemanticGuidance(GuidanceConfig(concepts=concepts, momentum_scale=0.1), end_step=2)
    assert [short.needed(i) for i in range(2)] == [(3,), (3,)]
    with pytest.raises(ValueError, match="step 2 is past the end of this pass"):
        u, t, c = estimates(5, 0)
        short.step(step=2, uncond=u, cond=t, concepts=c)


def test_garbage_in_an_unneeded_estimate_changes_nothing():
    config = GuidanceConfig(concepts=[C(prompt="a", warmup=0), C(prompt="off", weight=0.0)])
    clean, dirty = SemanticGuidance(config), SemanticGuidance(config)
    for step in range(3):
        u, t, c = estimates(2, step)
        poisoned = c.clone()
        poisoned[1] = float("nan")
        assert torch.equal(clean.step(step=step, uncond=u, cond=t, concepts=c),
                           dirty.step(step=step, uncond=u, cond=t, concepts=poisoned))


def run(config, calls):
    guidance = SemanticGuidance(config)
    return [guidance.step(step=i, uncond=u, cond=t, concepts=c) for i, (u, t, c) in calls]


def test_repeated_step_starts_from_the_state_at_the_start_of_that_step():
    config = two_concepts(momentum_scale=0.6, momentum_beta=0.3)
    s0, s1a, s1b, s2, s3 = (estimates(2, seed) for seed in range(5))
    twice = run(config, [(0, s0), (1, s1a), (1, s1b), (2, s2), (3, s3)])
    first_only = run(config, [(0, s0), (1, s1a)])
    last_only = run(config, [(0, s0), (1, s1b), (2, s2), (3, s3)])
    assert torch.equal(twice[1], first_only[1])
    assert torch.equal(twice[2], last_only[1])
    assert torch.equal(twice[3], last_only[2]) and torch.equal(twice[4], last_only[3])
    # The first call's values must not leak into the state: with them, step 2 would differ.
    with_first = run(config, [(0, s0), (1, s1a), (2, s2)])
    assert not torch.equal(twice[3], with_first[2])


def test_a_pass_may_start_at_a_later_step():
    # img2img and hires passes join the schedule part-way; momentum starts at zero there.
    config = two_concepts(momentum_scale=0.5)
    calls = [(i, estimates(2, i)) for i in range(4, 8)]
    edits = run(config, calls)
    assert all(e.abs().sum() > 0 for e in edits)


def test_steps_must_not_go_back():
    guidance = SemanticGuidance(two_concepts())
    u, t, c = estimates(2, 0)
    guidance.step(step=3, uncond=u, cond=t, concepts=c)
    with pytest.raises(ValueError, match="step 2 came after step 3"):
        guidance.step(step=2, uncond=u, cond=t, concepts=c)


@pytest.mark.parametrize("change, message", [
    (lambda u, t, c: (u[0], t, c), r"uncond must be a floating-point tensor \[B, C, H, W\]"),
    (lambda u, t, c: (u.long(), t, c), "uncond must be a floating-point tensor"),
    (lambda u, t, c: (u, t[:1], c), r"cond must match uncond \(shape \(2, 4, 6, 10\)"),
    (lambda u, t, c: (u, t.double(), c), "cond must match uncond.*torch.float64"),
    (lambda u, t, c: (u, t.to("meta"), c), "cond must match uncond.*meta"),
    (lambda u, t, c: (u, t, c[:1]), r"concepts holds 1 estimates; expected 2 \(every concept\)"),
    (lambda u, t, c: (u, t, c[0]), r"concepts must be \[N, B, C, H, W\]"),
    (lambda u, t, c: (u, t, c.half()), r"concepts\[0\] must match uncond.*float16"),
    (lambda u, t, c: (u, t, c[:, :, :, :3]), r"concepts\[0\] must match uncond.*\(2, 4, 3, 10\)"),
    (lambda u, t, c: (u, t, "rows"), "concepts must be a tensor or a list of tensors"),
])
def test_bad_tensors_are_named_in_the_error(change, message):
    guidance = SemanticGuidance(two_concepts())
    u, t, c = change(*estimates(2, 0))
    with pytest.raises(ValueError, match=message):
        guidance.step(step=2, uncond=u, cond=t, concepts=c)


@pytest.mark.parametrize("change", [lambda u: u[:1], lambda u: u.double()])
def test_a_new_shape_or_dtype_mid_pass_is_refused(change):
    guidance = SemanticGuidance(two_concepts(momentum_scale=0.5))
    u, t, c = estimates(2, 0)
    guidance.step(step=0, uncond=u, cond=t, concepts=c)
    u, t, c = estimates(2, 1)
    u, t, c = change(u), change(t), torch.stack([change(x) for x in c])
    with pytest.raises(ValueError, match="but this sampling pass started with"):
        guidance.step(step=1, uncond=u, cond=t, concepts=c)


def test_numpy_integer_steps_and_empty_estimates():
    import numpy as np
    guidance = SemanticGuidance(GuidanceConfig(concepts=[C(prompt="a", warmup=5)],
                                               momentum_scale=0.0))
    u, t, _ = estimates(1, 0)
    edit = guidance.step(step=np.int64(0), uncond=u, cond=t, concepts=torch.empty(0))
    assert torch.equal(edit, torch.zeros_like(u))


def test_a_new_shape_mid_pass_is_refused():
    guidance = SemanticGuidance(two_concepts(momentum_scale=0.5))
    guidance.step(step=0, uncond=(e := estimates(2, 0))[0], cond=e[1], concepts=e[2])
    u, t, c = estimates(2, 1, shape=(1, 4, 6, 10))
    with pytest.raises(ValueError, match="use a new SemanticGuidance for each pass"):
        guidance.step(step=1, uncond=u, cond=t, concepts=c)


def test_no_host_sync_in_a_step():
    # Meta tensors have no data: .item(), .cpu() values, or Python branching on tensor values
    # raise on them, so a whole pass running on meta proves the step never reads values back.
    config = GuidanceConfig(concepts=[C(prompt="a", warmup=0), C(prompt="b", warmup=2,
                                                                 cooldown=4, reverse=True)],
                            momentum_scale=0.3)
    guidance = SemanticGuidance(config)
    for step in range(6):
        u, t = torch.empty(SHAPE, device="meta"), torch.empty(SHAPE, device="meta")
        c = torch.empty((2, *SHAPE), device="meta")
        edit = guidance.step(step=step, uncond=u, cond=t, concepts=c)
        assert edit.device.type == "meta" and edit.shape == SHAPE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_keep_their_dtype(dtype):
    guidance = SemanticGuidance(two_concepts(momentum_scale=0.2))
    for step in range(4):
        u, t, c = estimates(2, step, dtype=dtype)
        edit = guidance.step(step=step, uncond=u, cond=t, concepts=c)
        assert edit.dtype == dtype and not edit.isnan().any()


def test_no_concepts_and_config_type():
    guidance = SemanticGuidance(GuidanceConfig())
    u, t, _ = estimates(0, 0)
    assert torch.equal(guidance.step(step=0, uncond=u, cond=t, concepts=None), torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="needs a GuidanceConfig"):
        SemanticGuidance({"concepts": []})
