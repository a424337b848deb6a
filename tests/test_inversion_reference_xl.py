"""ldg_core.inversion against diffusers' LEditsPPPipelineStableDiffusionXL, step by step.

The SDXL twin of tests/test_inversion_reference.py (which checks LEditsPPPipelineStableDiffusion)
and written the same way: the oracle (tests/ledits_reference_xl.py) inverts an image with
diffusers' own LEditsPPPipelineStableDiffusionXL.invert() and edits it with its own __call__
loop, on a tiny random offline SDXL-shaped model, for DDIM and for DPM-Solver++(2M) SDE. We
drive ldg_core.inversion.invert() with the reference's schedule numbers, x0 and random draws,
then run our own edit loop (the tiny UNet's eps, ledits_edit, the rule's step) and compare
noise maps, start latents, every step's edit and latents (each step from the reference's
latents, and a whole pass on our own) and the reconstruction without concepts.

SDXL's UNet takes more than prompt embeddings: pooled text embeddings and add_time_ids
(added_cond_kwargs). Our side calls the UNet with the exact inputs the reference's own calls got
(recorded per call by the oracle), so the eps match bit for bit, as on SD 1.x.

One image, not two: the reference's __call__ fails for more than one image with editing prompts
(see tests/ledits_reference_xl.py). It is inverted with num_zero_noise_steps=0: by default the
XL invert() zeroes the last three noise maps, which our inversion does not do.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ldg_core.inversion import invert, ledits_edit
from tests.ledits_reference import sample_images
from tests.ledits_reference_xl import build_ledits_xl, run_ledits_xl
from tests.test_inversion_reference import (CONFIGS, KINDS, SEED, SKIP, STEPS,
                                            assert_inversion_matches, assert_reconstructs,
                                            close, difference,
                                            drawn_noises,
                                            model_output, rule_for, unet_input, vp_scale)

# The SD check's steps, skip, seed and concept sets; one image (see the module docstring).
BATCH, HEIGHT, WIDTH = 1, 32, 64     # latents 16 x 32 (the tiny VAE halves): non-square
CONCEPTS = CONFIGS["add and remove"]

# As in tests/test_inversion_reference.py: both sides compute the same formulas in float32,
# grouped differently, and differences are relative to each tensor's largest value (at least
# 1). Measured here (diffusers 0.42.1, torch 2.14 CPU, both schedulers):
#   TOL_STEP  one step of the rules: start latents <= 1.1e-7 (DDIM: 0); the noise a map adds
#             <= 1.1e-6 (DDIM's last step); latents after a step from the reference's
#             latents <= 9.3e-7.
#   TOL_EDIT  the edit from the reference's latents: 0, bit-identical (same UNet inputs, same
#             ops); allowed for a harmless reordering.
#   TOL_PASS  a whole pass on our own latents ("thresholds 1 and 0"): edits <= 3.6e-5 (DDIM,
#             the last step), latents <= 1.0e-5; the no-concept output <= 5.1e-7.
# A noise map from the wrong step misses by 0.08 (DDIM's last step) to 7.8; the UNet's added
# conditioning, changed, moves its eps by 0.08 to 0.15.
TOL_STEP = 1e-5
TOL_EDIT = 1e-6
TOL_PASS = 1e-4


# -- the reference runs, once per scheduler ----------------------------------------------------

_cache = {}


def reference(kind):
    if kind not in _cache:
        pipe = build_ledits_xl(kind)
        images = sample_images(BATCH, HEIGHT, WIDTH)
        runs = run_ledits_xl(pipe, images, {**CONFIGS, "plain": []}, steps=STEPS, skip=SKIP,
                             seed=SEED)
        _cache[kind] = pipe, runs
    return _cache[kind]


# -- our side: the SD test's rules and spaces (rule_for, vp_scale, unet_input, model_output),
#    the UNet called with the reference's recorded conditioning --------------------------------

def eps(pipe, x_vp, call):
    """The UNet's eps for x_vp under each row of the reference's recorded call `call`: its
    prompt embeddings, pooled embeddings, time ids and timestep, the latents repeated once per
    prompt (invert(): the empty prompt only; __call__: empty, then each concept), as
    test_inversion_reference.eps does on SD 1.x."""
    copies = call.encoder_hidden_states.shape[0] // x_vp.shape[0]
    added = {"text_embeds": call.text_embeds, "time_ids": call.time_ids}
    with torch.no_grad():
        out = pipe.unet(torch.cat([x_vp] * copies), call.timestep,
                        encoder_hidden_states=call.encoder_hidden_states,
                        added_cond_kwargs=added).sample
    return out.chunk(copies)


_inversions = {}


def our_inversion(pipe, run):
    """Our rule and invert() on the reference's schedule, x0, draws and invert()'s UNet
    conditioning (once per pipeline: its runs share one inversion)."""
    if id(pipe) not in _inversions:
        rule = rule_for(pipe, run)

        def model(step, x):
            (estimate,) = eps(pipe, unet_input(run, step, x), run.inversion_calls[step])
            return model_output(run, step, x, estimate)

        _inversions[id(pipe)] = rule, invert(rule, run.x0, model, drawn_noises(run))
    return _inversions[id(pipe)]


def our_edit(pipe, run, rule, maps, noise, concepts, *, forced, steps=STEPS):
    """Our LEDITS++ sampling, as test_inversion_reference.our_edit: per step, uncond +
    ledits_edit in eps, then the rule's step with noise[step]. Returns the first `steps`
    steps' latents (in the rule's space), edits and UNet latents.

    forced=True starts every step from the reference's latents (its init_latents, then what
    its previous step returned), so each step is compared on its own."""
    rule.reset()
    x, latents, edits, unet_latents = maps.start, [], [], []
    for step in range(steps):
        if forced:
            x_unet = run.init_latents if step == 0 else run.latents[step - 1]
            x = x_unet * vp_scale(run, step)
        else:
            x_unet = unet_input(run, step, x)
        uncond, *estimates = eps(pipe, x_unet, run.calls[step])
        assert len(estimates) == len(concepts)
        edit = ledits_edit(concepts, step, uncond, dict(enumerate(estimates)))
        mean = rule.mean(step, x, model_output(run, step, x, uncond + edit))
        # DPM's last step (sigma 0) returns the denoised estimate; the residual is our own
        # addition for exact reconstruction and is not part of the reference's loop.
        x = rule.add_noise(step, mean, noise[step]) if rule.has_noise(step) else mean
        latents.append(x)
        edits.append(edit)
        unet_latents.append(x_unet)
    return torch.stack(latents), torch.stack(edits), torch.stack(unet_latents)


def reference_latents_in_our_space(run):
    """The reference's latents after each step (VP), as the rule's latents: step i lands at
    sigmas[i + 1]."""
    return torch.stack([run.latents[i] * vp_scale(run, i + 1) for i in range(STEPS)])


# -- the tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_reference_conditioning_is_what_our_side_assumes(kind):
    """What eps() relies on: every step of a pass got the same conditioning, rows ordered
    empty prompt then concepts, the empty prompt's embeddings zeros; and the recorded quirk:
    add_time_ids of the transposed size (width, height)."""
    pipe, runs = reference(kind)
    run = runs["add and remove"]
    for calls, rows in ((run.inversion_calls, BATCH), (run.calls, BATCH * (1 + len(CONCEPTS)))):
        first = calls[0]
        assert first.encoder_hidden_states.shape[0] == first.text_embeds.shape[0] == rows
        assert first.time_ids.shape == (rows, 6) and first.sample.shape[0] == rows
        for call in calls[1:]:
            for name in ("encoder_hidden_states", "text_embeds", "time_ids"):
                assert torch.equal(getattr(call, name), getattr(first, name)), name
        assert not first.encoder_hidden_states[:BATCH].any()
        assert not first.text_embeds[:BATCH].any()
        # invert(): self.size = (x0.shape[3], x0.shape[2]) * vae_scale_factor (2 here)
        size = [WIDTH, HEIGHT]
        assert first.time_ids.tolist() == [size + [0, 0] + size] * rows
    # the concepts' rows differ from each other and from the empty prompt's
    rows = run.calls[0].encoder_hidden_states
    assert rows[1].abs().sum() > 0 and not torch.equal(rows[1], rows[2])
    assert [int(c.timestep) for c in run.calls] == run.timesteps
    assert [int(c.timestep) for c in run.inversion_calls] == run.timesteps
    # The tiny UNet does read the added conditioning, so passing it as recorded is tested:
    # the time ids in SDXL's (height, width) order, or pooled embeddings of zeros, move eps.
    call, x = run.calls[2], run.latents[1]
    expected = eps(pipe, x, call)
    for changed in (dict(time_ids=call.time_ids[:, [1, 0, 2, 3, 5, 4]]),
                    dict(text_embeds=torch.zeros_like(call.text_embeds))):
        moved = eps(pipe, x, dataclasses.replace(call, **changed))
        assert max(difference(a, b) for a, b in zip(moved, expected)) > 1000 * TOL_EDIT


@pytest.mark.parametrize("kind", KINDS)
def test_noise_maps_and_start_match_reference(kind):
    pipe, runs = reference(kind)
    run = runs["add and remove"]
    rule, maps = our_inversion(pipe, run)
    assert_inversion_matches(kind, run, rule, maps)
    # no map is zeroed (num_zero_noise_steps=0, see the module docstring)
    assert all(run.zs[step].abs().max() > 1 for step in range(STEPS - (kind == "dpm")))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", CONFIGS)
def test_each_edit_step_matches_reference(kind, config):
    """Every step from the reference's own latents: the UNet gets the reference's latents, the
    edit is the reference's sem_guidance and the rule's step with our noise map lands on the
    reference's next latents."""
    pipe, runs = reference(kind)
    run = runs[config]
    rule, maps = our_inversion(pipe, run)
    latents, edits, unet_latents = our_edit(pipe, run, rule, maps, maps.noise, CONFIGS[config],
                                            forced=True)
    expected = reference_latents_in_our_space(run)
    for step in range(STEPS):
        # the reference's UNet input is its latents (scale_model_input is the identity for
        # both schedulers), repeated per prompt
        assert torch.equal(torch.cat([unet_latents[step]] * (1 + len(CONFIGS[config]))),
                           run.calls[step].sample)
        close(edits[step], run.edits[step], f"edit at step {step}", TOL_EDIT)
        close(latents[step], expected[step], f"latents after step {step}", TOL_STEP)
    # The reference edited at every step (the concepts' windows overlap and cover the pass),
    # and a concept waits out a warmup, one is cooled inside it.
    assert all(run.edits[step].abs().sum() > 0 for step in range(STEPS))
    assert any(c.warmup > 0 for c in CONFIGS[config])
    assert any(c.cooldown is not None and c.cooldown < STEPS for c in CONFIGS[config])


@pytest.mark.parametrize("kind", KINDS)
def test_whole_edit_pass_follows_reference(kind):
    """Our own latents from the start latents to the end stay on the reference's path, with
    the quantile's end thresholds, as on SD 1.x (test_inversion_reference explains why): at
    thresholds inside (0, 1) a position within rounding of the cutoff can flip; here with DDIM,
    "add and remove", at step 1 (edits 0.36 apart, latents 0.1 after it), so those are
    checked step by step above."""
    pipe, runs = reference(kind)
    run = runs["thresholds 1 and 0"]
    rule, maps = our_inversion(pipe, run)
    latents, edits, _ = our_edit(pipe, run, rule, maps, maps.noise,
                                 CONFIGS["thresholds 1 and 0"], forced=False)
    expected = reference_latents_in_our_space(run)
    for step in range(STEPS):
        close(edits[step], run.edits[step], f"edit at step {step}", TOL_PASS)
        close(latents[step], expected[step], f"latents after step {step}", TOL_PASS)


@pytest.mark.parametrize("kind", KINDS)
def test_noise_map_from_the_wrong_step_is_caught(kind):
    """Each step given the next noisy step's map (the last the first's) misses the
    reference's latents."""
    pipe, runs = reference(kind)
    run = runs["add and remove"]
    rule, maps = our_inversion(pipe, run)
    noisy = [i for i, z in enumerate(maps.noise) if z is not None]
    wrong = list(maps.noise)
    for i, j in zip(noisy, noisy[1:] + noisy[:1]):
        wrong[i] = maps.noise[j]
    latents, _, _ = our_edit(pipe, run, rule, maps, wrong, CONCEPTS, forced=True)
    expected = reference_latents_in_our_space(run)
    assert len(noisy) >= STEPS - 1
    for step in noisy:  # compared one by one (forced): every step with a moved map shows it
        assert difference(latents[step], expected[step]) > 1000 * TOL_STEP
        with pytest.raises(AssertionError):
            close(latents[step], expected[step], f"latents after step {step}", TOL_STEP)


@pytest.mark.parametrize("kind", KINDS)
def test_no_concepts_reconstructs_x0(kind):
    pipe, runs = reference(kind)
    run = runs["plain"]
    assert run.edits is None  # no concept: the reference kept no sem_guidance
    rule, maps = our_inversion(pipe, run)
    latents, edits, _ = our_edit(pipe, run, rule, maps, maps.noise, [], forced=False)
    assert not edits.any()
    assert_reconstructs(kind, run, maps, latents[-1])
