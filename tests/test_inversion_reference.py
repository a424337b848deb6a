"""ldg_core.inversion against diffusers' LEditsPPPipelineStableDiffusion, step by step.

The oracle (tests/ledits_reference.py) inverts two images with diffusers' own invert() and
edits them with its own __call__ loop, on a tiny random offline model, for DDIM and for
DPM-Solver++(2M) SDE. We drive invert() with the reference's schedule numbers, x0 and random
draws, then run our own edit loop (the tiny UNet's eps, ledits_edit, the rule's step) and
compare noise maps, start latents, every step's latents and every step's edit: each step from
the reference's latents, and whole passes on our own latents. Reconstruction is checked
against x0 and through k-diffusion's real sample_dpmpp_2m_sde.
"""

from __future__ import annotations

import pytest
import torch

from ldg_core import Concept
from ldg_core.inversion import DDIMRule, DPMpp2MSDERule, invert, ledits_edit
from tests.ledits_reference import build_ledits, run_ledits, sample_images, text_embeddings

KINDS = ("ddim", "dpm")
STEPS, SKIP, SEED = 5, 0.3, 3        # int(5 * 1.3) = 6 scheduler steps, the first skipped
BATCH, HEIGHT, WIDTH = 2, 32, 64     # two different images; latents 16 x 32 (non-square)

CONFIGS = {
    # Add one concept, remove another: different scales and thresholds, a warmup, a cooldown.
    "add and remove": [
        Concept(prompt="glasses", scale=6.0, threshold=0.9, warmup=1),
        Concept(prompt="snow", scale=4.0, threshold=0.6, warmup=0, cooldown=4, reverse=True),
    ],
    # The quantile's ends, where the mask's ">=" decides: only the strongest position, all.
    "thresholds 1 and 0": [
        Concept(prompt="a red hat", scale=5.0, threshold=1.0, warmup=0, cooldown=3),
        Concept(prompt="dark, moody", scale=3.0, threshold=0.0, warmup=2, reverse=True),
    ],
}
CONCEPTS = CONFIGS["add and remove"]

# Both sides compute the same formulas in float32 but group them differently (python-float vs
# tensor schedule scalars, VE vs VP latents), so they agree to float32 rounding. Differences are
# taken relative to each tensor's largest value (at least 1). One step of the rules (start
# latents, the noise a map adds, a step from the reference's latents): measured <= 1e-6,
# allowed TOL_STEP. The edit from the reference's latents: bit-identical here (same UNet call,
# same ops), allowed TOL_EDIT for a harmless reordering. A whole pass on our own latents: the
# random UNet and the concept scales amplify the rounding step by step, measured <= 3.2e-5
# (an edit at the last step), allowed TOL_PASS. Misplaced noise maps miss by 0.1-10.
TOL_STEP = 1e-5
TOL_EDIT = 1e-6
TOL_PASS = 1e-4


def difference(actual, expected):
    """Largest difference relative to the largest value (at least 1)."""
    scale = max(1.0, float(expected.abs().max()))
    return float((actual - expected).abs().max()) / scale


def close(actual, expected, what, tol):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    measured = difference(actual, expected)
    assert measured <= tol, f"{what}: {measured:.2e} > {tol}"


# -- the reference runs, once per scheduler ----------------------------------------------------

_cache = {}


def reference(kind):
    if kind not in _cache:
        pipe = build_ledits(kind)
        images = sample_images(BATCH, HEIGHT, WIDTH)
        runs = run_ledits(pipe, images, {**CONFIGS, "plain": []}, steps=STEPS, skip=SKIP,
                          seed=SEED)
        _cache[kind] = pipe, runs
    return _cache[kind]


# -- our side: rules from the reference's schedule, the tiny UNet as the model -------------------

def rule_for(pipe, run):
    if run.sigmas is None:
        # compute_noise_ddim / DDIMScheduler.step: a_t at t, a_prev at t - 1000 // n, or the
        # final alpha when that is below 0; eta 1 (invert() sets self.eta = 1.0).
        ratio = pipe.scheduler.config.num_train_timesteps // run.num_inference_steps
        alphas = [float(run.alphas_cumprod[t]) for t in run.timesteps]
        prev = [float(run.alphas_cumprod[t - ratio]) if t - ratio >= 0
                else run.final_alpha_cumprod for t in run.timesteps]
        return DDIMRule.from_schedule(alphas, prev, eta=1.0)
    # DPMSolverMultistepScheduler's sigmas are VE already, sqrt((1 - a) / a), ending in 0.
    return DPMpp2MSDERule(run.sigmas)


def vp_scale(run, index):
    """x_ve = x_vp * sqrt(1 + sigma^2) at sigmas[index] (1 for DDIM, whose latents are VP)."""
    if run.sigmas is None:
        return 1.0
    return float((run.sigmas[index].double() ** 2 + 1).sqrt())


def eps(pipe, x_vp, t, embeddings):
    """The UNet's eps for x_vp under each prompt's embedding, as the reference calls it: one
    batch, the latents repeated once per prompt (invert(): uncond only; __call__: uncond, then
    each concept). From the same latents both sides get bit-identical estimates, which matters:
    LEDITS++'s quantile mask is discontinuous, and float32 differences in the estimates can
    flip a position lying at the cutoff (seen with DPM at step 1), after which the paths part."""
    copies = embeddings.shape[0] // x_vp.shape[0]
    with torch.no_grad():
        out = pipe.unet(torch.cat([x_vp] * copies), torch.tensor(t),
                        encoder_hidden_states=embeddings).sample
    return out.chunk(copies)


def model_output(run, step, x, eps_total):
    """What the rule's sampler gets at `step` from the combined eps: eps itself (DDIM) or the
    denoised estimate x - sigma * eps (DPM, k-diffusion's DiscreteEpsDDPMDenoiser)."""
    return eps_total if run.sigmas is None else x + eps_total * -run.sigmas[step]


def unet_input(run, step, x):
    """The UNet's latents for the rule's x: x (DDIM) or x * c_in = x / sqrt(1 + sigma^2).
    Contiguous, as the reference's are: the encoded x0 has channels-last strides, which our
    latents inherit, and the UNet's convolutions round differently on them."""
    if run.sigmas is not None:
        x = x * (1 / (run.sigmas[step] ** 2 + 1) ** 0.5)
    return x.contiguous()


def drawn_noises(run):
    """invert()'s draws: randn_tensor(x0.shape, generator) once per timestep in
    reversed(timesteps) order, i.e. the last sampling step's first."""
    g = torch.Generator().manual_seed(SEED)
    draws = [torch.randn(run.x0.shape, generator=g, dtype=run.x0.dtype) for _ in range(STEPS)]
    return lambda step: draws[STEPS - 1 - step]


_inversions = {}


def our_inversion(pipe, run):
    """Our rule and invert() on the reference's schedule, x0 and draws (once per pipeline: its
    runs share one inversion)."""
    if id(pipe) not in _inversions:
        _inversions[id(pipe)] = _invert(pipe, run)
    return _inversions[id(pipe)]


def _invert(pipe, run):
    rule = rule_for(pipe, run)
    uncond = text_embeddings(pipe, [], BATCH)  # source prompt "": no CFG in invert()

    def model(step, x):
        (estimate,) = eps(pipe, unet_input(run, step, x), run.timesteps[step], uncond)
        return model_output(run, step, x, estimate)

    return rule, invert(rule, run.x0, model, drawn_noises(run))


def our_edit(pipe, run, rule, maps, noise, concepts, *, forced, steps=STEPS):
    """Our LEDITS++ sampling: per step, uncond + ledits_edit in eps, then the rule's step with
    noise[step]. Returns the first `steps` steps' latents (in the rule's space) and edits.

    forced=False runs on our own latents from maps.start. forced=True starts every step from
    the reference's latents (its init_latents, then what its previous step returned), so each
    step is compared on its own: the UNet gets the reference's latents bit for bit and the rule
    the same latents in its space (DPM's multistep memory is still our own previous step's)."""
    embeddings = text_embeddings(pipe, [c.prompt for c in concepts], BATCH)
    rule.reset()
    x, latents, edits = maps.start, [], []
    for step, t in enumerate(run.timesteps[:steps]):
        if forced:
            x_unet = run.init_latents if step == 0 else run.latents[step - 1]
            x = x_unet * vp_scale(run, step)
        else:
            x_unet = unet_input(run, step, x)
        uncond, *estimates = eps(pipe, x_unet, t, embeddings)
        edit = ledits_edit(concepts, step, uncond, dict(enumerate(estimates)))
        mean = rule.mean(step, x, model_output(run, step, x, uncond + edit))
        # DPM's last step (sigma 0) returns the denoised estimate; the residual is our own
        # addition for exact reconstruction and is not part of the reference's loop.
        x = rule.add_noise(step, mean, noise[step]) if rule.has_noise(step) else mean
        latents.append(x)
        edits.append(edit)
    return torch.stack(latents), torch.stack(edits)


def reference_latents_in_our_space(run):
    """The reference's latents after each step (VP), as the rule's latents: step i lands at
    sigmas[i + 1]."""
    return torch.stack([run.latents[i] * vp_scale(run, i + 1) for i in range(STEPS)])


# -- the tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_noise_maps_and_start_match_reference(kind):
    pipe, runs = reference(kind)
    run = runs["add and remove"]
    rule, maps = our_inversion(pipe, run)
    assert_inversion_matches(kind, run, rule, maps)


def assert_inversion_matches(kind, run, rule, maps):
    """Our start latents and noise maps are the reference's (SD and SDXL pipelines alike)."""
    close(maps.start, run.init_latents * vp_scale(run, 0), "start latents", TOL_STEP)
    assert len(maps.noise) == STEPS == run.zs.shape[0]
    for step, z in enumerate(maps.noise):  # run.zs is flipped back to sampling order
        if kind == "dpm" and step == STEPS - 1:
            # To sigma 0 the reference adds no noise: its z there is 0 (its inversion takes
            # that step second order, with h = inf; its edit loop takes it first order).
            assert z is None and torch.equal(run.zs[step], torch.zeros_like(run.zs[step]))
        else:
            # z = (target - mean) / scale, with scales down to 0.02 (DDIM's last steps), where
            # float32 cancellation in 1 - a_prev - sigma^2 shows: compare the noise each map
            # adds, scale * z (the same positive factor on both sides, so equal iff z equal).
            def added(map_):
                return rule.add_noise(step, torch.zeros_like(map_), map_)
            close(added(z), added(run.zs[step]), f"noise map {step}", TOL_STEP)
    assert (maps.residual is None) == (kind == "ddim")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", CONFIGS)
def test_each_edit_step_matches_reference(kind, config):
    """Every step from the reference's own latents: the edit is the reference's and the rule's
    step with our noise map lands on the reference's next latents."""
    pipe, runs = reference(kind)
    run = runs[config]
    rule, maps = our_inversion(pipe, run)
    latents, edits = our_edit(pipe, run, rule, maps, maps.noise, CONFIGS[config], forced=True)
    expected = reference_latents_in_our_space(run)
    for step in range(STEPS):
        close(edits[step], run.edits[step], f"edit at step {step}", TOL_EDIT)
        close(latents[step], expected[step], f"latents after step {step}", TOL_STEP)
    # The reference edited at every step (the concepts' windows overlap and cover the pass)...
    assert all(run.edits[step].abs().sum() > 0 for step in range(STEPS))
    # ...of two different images, and a concept waits out a warmup, one is cooled inside it.
    assert not torch.equal(run.x0[0], run.x0[1])
    assert any(c.warmup > 0 for c in CONFIGS[config])
    assert any(c.cooldown is not None and c.cooldown < STEPS for c in CONFIGS[config])


@pytest.mark.parametrize("kind", KINDS)
def test_whole_edit_pass_follows_reference(kind):
    """Our own latents from the start latents to the end stay on the reference's path. With
    thresholds 1 and 0 the masks are the strongest position and everything, which rounding
    flips only at a near tie for the strongest; at thresholds inside (0, 1) a position within
    rounding of the cutoff can flip (DPM, "add and remove", step 1: two positions) and part
    the paths by O(0.1), so those are checked step by step above."""
    pipe, runs = reference(kind)
    run = runs["thresholds 1 and 0"]
    rule, maps = our_inversion(pipe, run)
    latents, edits = our_edit(pipe, run, rule, maps, maps.noise, CONFIGS["thresholds 1 and 0"],
                              forced=False)
    expected = reference_latents_in_our_space(run)
    for step in range(STEPS):
        close(edits[step], run.edits[step], f"edit at step {step}", TOL_PASS)
        close(latents[step], expected[step], f"latents after step {step}", TOL_PASS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mutation", ("shifted by one step", "unflipped order"))
def test_misplaced_noise_maps_are_caught(kind, mutation):
    pipe, runs = reference(kind)
    run = runs["add and remove"]
    rule, maps = our_inversion(pipe, run)
    noisy = [i for i, z in enumerate(maps.noise) if z is not None]
    if mutation == "shifted by one step":
        order = noisy[1:] + noisy[:1]
    else:  # the order invert() builds zs in, before its flip
        order = noisy[::-1]
    wrong = list(maps.noise)
    for i, j in zip(noisy, order):
        wrong[i] = maps.noise[j]
    latents, _ = our_edit(pipe, run, rule, maps, wrong, CONCEPTS, forced=True, steps=3)
    expected = reference_latents_in_our_space(run)
    # the right maps agree to ~1e-6 (test above); each step given another step's map misses
    # by 0.1 (where the noise is small) to 10. Steps are compared one by one (forced), so the
    # first three show it.
    moved = [i for i, j in zip(noisy, order) if i != j and i < 3]
    assert len(moved) >= 2
    for step in moved:
        assert difference(latents[step], expected[step]) > 1000 * TOL_STEP
        with pytest.raises(AssertionError):
            close(latents[step], expected[step], f"latents after step {step}", TOL_STEP)


@pytest.mark.parametrize("kind", KINDS)
def test_no_concepts_reconstructs_x0(kind):
    pipe, runs = reference(kind)
    run = runs["plain"]
    rule, maps = our_inversion(pipe, run)
    latents, edits = our_edit(pipe, run, rule, maps, maps.noise, [], forced=False)
    assert not edits.any()
    assert_reconstructs(kind, run, maps, latents[-1])


def assert_reconstructs(kind, run, maps, last):
    """Our last latents without concepts: the reference's output, and x0 (with DPM's residual)."""
    # our loop and the reference's agree without concepts too
    close(last, run.output * vp_scale(run, STEPS), "no-concept output", TOL_PASS)
    x0 = run.x0
    if kind == "ddim":
        # the last step lands on x0 up to float rounding: mean + sigma * ((x0 - mean) / sigma)
        assert maps.residual is None
        torch.testing.assert_close(last, x0, rtol=0, atol=1e-6)
    else:
        # the last step returns the denoised estimate, not x0; the residual closes the gap
        assert float((last - x0).abs().max()) > 1e-3
        torch.testing.assert_close(last + maps.residual, x0, rtol=0, atol=1e-6)


def test_real_kdiffusion_sampler_returns_x0():
    """k-diffusion's own sample_dpmpp_2m_sde, fed our noise maps and the residual at its last
    step, lands on the image: our rule is its arithmetic."""
    from k_diffusion.external import DiscreteEpsDDPMDenoiser
    from k_diffusion.sampling import get_sigmas_karras, sample_dpmpp_2m_sde

    pipe, runs = reference("dpm")
    x0 = runs["plain"].x0
    uncond = text_embeddings(pipe, [], BATCH)
    denoiser = DiscreteEpsDDPMDenoiser(
        lambda x, t: pipe.unet(x, t, encoder_hidden_states=uncond).sample,
        pipe.scheduler.alphas_cumprod, quantize=True)
    steps = 5
    sigmas = get_sigmas_karras(steps, float(denoiser.sigma_min), float(denoiser.sigma_max))
    g = torch.Generator().manual_seed(11)
    draws = [torch.randn(x0.shape, generator=g) for _ in range(steps)]
    ones = x0.new_ones(BATCH)
    with torch.no_grad():
        maps = invert(DPMpp2MSDERule(sigmas), x0,
                      lambda step, x: denoiser(x, sigmas[step] * ones), lambda step: draws[step])

    given = iter(maps.noise[:-1])
    calls = []

    def noise_sampler(sigma, sigma_next):
        calls.append((float(sigma), float(sigma_next)))
        return next(given)

    def model(x, sigma):
        denoised = denoiser(x, sigma)
        return denoised + maps.residual if bool((sigma == sigmas[-2]).all()) else denoised

    with torch.no_grad():
        out = sample_dpmpp_2m_sde(model, maps.start, sigmas, disable=True,
                                  noise_sampler=noise_sampler)
    assert calls == [(float(sigmas[i]), float(sigmas[i + 1])) for i in range(steps - 1)]
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)
    # without the residual it stops at the last denoised estimate, visibly off
    assert float((out - maps.residual - x0).abs().max()) > 1e-3
