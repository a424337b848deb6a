"""Safe Latent Diffusion: SafetyConfig and SafetyGuidance against StableDiffusionPipelineSafe.

The reference runs its own denoising loop on the tiny random model and records, at every step,
the uncond, text and safety estimates and the noise prediction it handed to the scheduler; we
replay the estimates through our engine and compare its guided estimate,
uncond + cfg * (cond - uncond) + edit, with that noise prediction.
"""

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from ldg_core import SafetyConfig, SafetyGuidance
from tests.safety_reference import REFERENCE_NAMES, run_safe_reference, safe_pipeline

PRESET_NAMES = ["weak", "medium", "strong", "max"]
FP16_EPS = 2.0 ** -10


def diffusers_safety_config():
    """diffusers' own table of the four configurations: the oracle for our presets."""
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig as Reference
    return Reference


@pytest.fixture(scope="module")
def safe(reference_pipeline):
    """StableDiffusionPipelineSafe on the tiny random model, one per dtype.

    One torch thread while this module runs: the model is tiny, and on a loaded machine with
    few cores, worker threads waiting for each other made runs up to 100 times slower.
    """
    pipes = {}

    def get(dtype=torch.float32):
        if dtype not in pipes:
            pipes[dtype] = safe_pipeline(reference_pipeline(dtype))
        return pipes[dtype]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield get
    finally:
        torch.set_num_threads(threads)


# -- the comparison ---------------------------------------------------------------------------

def replay(config, run, *, make=SafetyGuidance, dtype=None, skip=False):
    """Our guided estimate at each step of `run`. skip=True passes safety=None wherever
    needed() says the estimate cannot matter."""
    guidance = make(config)
    cfg = run.guidance_scale
    dtype = dtype or run.cond.dtype
    guided = []
    for i in range(run.cond.shape[0]):
        u, t = run.uncond[i].to(dtype), run.cond[i].to(dtype)
        s = None if run.safety is None else run.safety[i].to(dtype)
        if skip and not guidance.needed(i, cfg):
            s = None
        edit = guidance.step(step=i, uncond=u, cond=t, safety=s, guidance_scale=cfg)
        assert edit.dtype == dtype and edit.shape == u.shape
        guided.append(u + cfg * (t - u) + edit)
    return guided


def tolerance(dtype, expected):
    """(rtol, atol): float rounding, the absolute part relative to the step's largest value."""
    scale = expected.abs().max().item()
    if dtype == torch.float16:
        return 2 * FP16_EPS, 2 * FP16_EPS * scale  # a couple of fp16 ulps
    return 1e-5, 1e-5 * scale


def assert_matches_reference(config, run, **options):
    """Returns at how many steps the reference's SLD edit actually changed the estimate."""
    ours = replay(config, run, **options)
    acted = 0
    for step, (guided, expected) in enumerate(zip(ours, run.noise_pred)):
        rtol, atol = tolerance(guided.dtype, expected)
        torch.testing.assert_close(guided.double(), expected.double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"step {step}: {m}")
        u, t = run.uncond[step].double(), run.cond[step].double()
        plain_cfg = u + run.guidance_scale * (t - u)
        acted += not torch.allclose(plain_cfg, expected.double(), rtol=rtol, atol=atol)
    return acted


_runs = {}


def reference_run(safe, config, dtype=torch.float32, **options):
    """Reference runs are deterministic; each distinct one is made once per session."""
    key = (repr(config), dtype, tuple(sorted((k, repr(v)) for k, v in options.items())))
    if key not in _runs:
        _runs[key] = run_safe_reference(safe(dtype), config, **options)
    return _runs[key]


# -- presets and defaults: diffusers is the oracle --------------------------------------------

@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_are_diffusers_safety_configs(name):
    reference = getattr(diffusers_safety_config(), name.upper())
    ours = SafetyConfig.preset(name)
    assert {REFERENCE_NAMES[k]: getattr(ours, k) for k in REFERENCE_NAMES} == reference
    assert SafetyConfig.preset(name.upper()) == ours
    assert ours.concept == SafetyConfig().concept
    assert SafetyConfig.preset(name, concept="blood").concept == "blood"


def test_defaults_are_the_reference_pipelines(safe):
    import inspect

    from diffusers import StableDiffusionPipelineSafe

    defaults = inspect.signature(StableDiffusionPipelineSafe.__call__).parameters
    config = SafetyConfig()
    for ours, theirs in REFERENCE_NAMES.items():
        assert getattr(config, ours) == defaults[theirs].default, ours
    assert config == SafetyConfig.preset("medium")  # the reference's defaults are MEDIUM
    # A newly built pipeline's concept (the tests set safety_concept on the shared one).
    assert config.concept == safe_pipeline(safe()).safety_concept


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_match_the_reference(name, safe):
    """The reference runs with diffusers' own configuration dict, we with our preset."""
    reference = getattr(diffusers_safety_config(), name.upper())
    config = SafetyConfig.preset(name)
    steps = config.warmup + 3
    run = reference_run(safe, reference, steps=steps)
    assert run.safety is not None
    assert assert_matches_reference(config, run) == 3  # every step from the warmup on
    assert assert_matches_reference(config, run, skip=True) == 3


# name: (config, reference options, steps at which the reference's edit acts)
HAND_MADE = {
    "batch 4: two prompts, two images each, non-square": (
        SafetyConfig(warmup=2, momentum_scale=0.5, momentum_beta=0.7),
        {"steps": 5, "prompt": ["a cat, smiling", "a dog"], "num_images_per_prompt": 2,
         "width": 24}, 3),
    "threshold below zero": (
        SafetyConfig(threshold=-0.05, warmup=1), {"steps": 4}, 3),
    "threshold far below zero: nothing passes, momentum stays 0": (
        SafetyConfig(threshold=-100.0, warmup=0), {"steps": 3}, 0),
    "momentum fed during warmup": (
        SafetyConfig(warmup=4, momentum_scale=0.9, momentum_beta=0.2), {"steps": 6}, 2),
    "momentum scale 0 with a warmup": (
        SafetyConfig(warmup=3, momentum_scale=0.0), {"steps": 5}, 2),
    "beta 1 keeps the momentum at 0": (
        SafetyConfig(warmup=3, momentum_scale=0.7, momentum_beta=1.0), {"steps": 5}, 2),
    "beta 0, momentum of the last step only": (
        SafetyConfig(warmup=0, momentum_scale=0.5, momentum_beta=0.0), {"steps": 4}, 4),
    "scale just above 1, the clamp rarely bites": (
        SafetyConfig(scale=1.5, warmup=0, concept="blood, gore"), {"steps": 3}, 3),
    "CFG 3 and another seed": (
        SafetyConfig.preset("strong"), {"steps": 9, "guidance_scale": 3.0, "seed": 7}, 2),
    "warmup longer than the pass": (SafetyConfig(warmup=10), {"steps": 4}, 0),
}


@pytest.mark.parametrize("name", list(HAND_MADE))
def test_hand_made_cases_match_the_reference(name, safe):
    config, options, acting = HAND_MADE[name]
    run = reference_run(safe, config, **options)
    assert assert_matches_reference(config, run) == acting
    assert assert_matches_reference(config, run, skip=True) == acting


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_sld_scale_of_1_or_less_is_off(scale, safe):
    config = SafetyConfig(scale=scale, warmup=0)
    run = reference_run(safe, config, steps=3)
    assert run.safety is None  # the reference did not even evaluate the safety concept
    guidance = SafetyGuidance(config)
    assert not any(guidance.needed(i) or guidance.needed(i, 7.5) for i in range(3))
    assert assert_matches_reference(config, run) == 0  # safety=None is accepted


@pytest.mark.parametrize("cfg", [1.0, 0.5])
def test_cfg_of_1_or_less_is_off(cfg, safe):
    config = SafetyConfig(warmup=0)
    run = reference_run(safe, config, steps=3, guidance_scale=cfg)
    assert run.uncond is None and run.safety is None  # no CFG, no SLD in the reference
    guidance = SafetyGuidance(config)
    for i in range(3):
        assert not guidance.needed(i, cfg) and guidance.needed(i)
        t = run.cond[i]
        u = t + torch.randn(t.shape, generator=torch.Generator().manual_seed(i))  # any uncond
        edit = guidance.step(step=i, uncond=u, cond=t, safety=None, guidance_scale=cfg)
        assert torch.equal(edit, torch.zeros_like(t))
        if cfg == 1.0:  # only there is the reference's plain text estimate our CFG formula
            torch.testing.assert_close(u + cfg * (t - u) + edit, run.noise_pred[i],
                                       rtol=1e-5, atol=1e-5 * run.noise_pred[i].abs().max())


FP16_CASE = SafetyConfig(scale=2000, threshold=0.025, warmup=2, momentum_scale=0.5,
                         momentum_beta=0.7)


def test_fp16_matches_the_fp16_reference_and_our_fp32(safe):
    options = {"steps": 5, "prompt": ["a cat", "a dog"]}
    run = reference_run(safe, FP16_CASE, dtype=torch.float16, **options)
    assert run.noise_pred.dtype == torch.float16
    assert assert_matches_reference(FP16_CASE, run, dtype=torch.float16) == 3
    # The same fp16 estimates through our engine in fp32 agree to fp16 rounding.
    in_fp16, in_fp32 = replay(FP16_CASE, run), replay(FP16_CASE, run, dtype=torch.float32)
    for a, b in zip(in_fp16, in_fp32):
        rtol, atol = tolerance(torch.float16, b)
        torch.testing.assert_close(a.float(), b, rtol=rtol, atol=atol)


# -- the comparison catches broken engines ----------------------------------------------------

def no_clamp(config, uncond, cond, safety, momentum):
    difference = cond - safety
    weight = torch.where(difference >= config.threshold, torch.zeros_like(difference),
                         difference.abs() * config.scale)
    return with_momentum(config, (safety - uncond) * weight, momentum)


def with_momentum(config, term, momentum, order="reference"):
    previous = torch.zeros_like(term) if momentum is None else momentum
    beta = config.momentum_beta
    if order == "buffer first":  # the buffer is updated, then the new buffer is added
        updated = beta * previous + (1 - beta) * term
        return term + config.momentum_scale * updated, updated
    if order == "buffer from the bare term":
        return term + config.momentum_scale * previous, beta * previous + (1 - beta) * term
    term = term + config.momentum_scale * previous
    return term, beta * previous + (1 - beta) * term


def bare_term(config, uncond, cond, safety):
    difference = cond - safety
    weight = torch.clamp(difference.abs() * config.scale, max=1.0)
    weight = torch.where(difference >= config.threshold, torch.zeros_like(weight), weight)
    return (safety - uncond) * weight


def term_mutant(order="reference", direction_from="uncond"):
    def mutant(config, uncond, cond, safety, momentum):
        base = cond if direction_from == "cond" else uncond
        return with_momentum(config, bare_term(config, base, cond, safety), momentum, order)
    return mutant


def inverted_mask(config, uncond, cond, safety, momentum):
    difference = cond - safety
    weight = torch.clamp(difference.abs() * config.scale, max=1.0)
    weight = torch.where(difference < config.threshold, torch.zeros_like(weight), weight)
    return with_momentum(config, (safety - uncond) * weight, momentum)


class NoMomentumDuringWarmup:
    """Treats the warmup as 'off': the estimate is not even looked at before it."""

    def __init__(self, config):
        self.config, self.inner = config, SafetyGuidance(config)

    def step(self, *, step, **estimates):
        if step < self.config.warmup:
            return torch.zeros_like(estimates["uncond"])
        return self.inner.step(step=step, **estimates)


class EditNotScaledByCfg(SafetyGuidance):
    def step(self, *, guidance_scale, **estimates):
        return super().step(guidance_scale=guidance_scale, **estimates) / guidance_scale


MUTANTS = {
    "clamp at 1 removed": ("term", no_clamp),
    "momentum buffer updated before it is added": ("term", term_mutant(order="buffer first")),
    "momentum buffer fed the term without momentum": (
        "term", term_mutant(order="buffer from the bare term")),
    "mask inverted": ("term", inverted_mask),
    "direction from cond instead of uncond": ("term", term_mutant(direction_from="cond")),
    "no momentum during warmup": ("make", NoMomentumDuringWarmup),
    "edit not scaled by the CFG scale": ("make", EditNotScaledByCfg),
}
MUTATION_CASE = SafetyConfig(scale=1000, threshold=0.01, warmup=3, momentum_scale=0.5,
                             momentum_beta=0.6)


def test_the_mutation_case_matches_with_the_real_engine(safe):
    run = reference_run(safe, MUTATION_CASE, steps=6)
    assert assert_matches_reference(MUTATION_CASE, run) == 3


@pytest.mark.parametrize("name", list(MUTANTS))
def test_a_broken_engine_fails_the_reference_comparison(name, safe, monkeypatch):
    kind, broken = MUTANTS[name]
    run = reference_run(safe, MUTATION_CASE, steps=6)
    options = {}
    if kind == "term":
        monkeypatch.setattr("ldg_core.safety.safety_term", broken)
    else:
        options["make"] = broken
    with pytest.raises(AssertionError):
        assert_matches_reference(MUTATION_CASE, run, **options)


# -- the step contract ------------------------------------------------------------------------

SHAPE = (2, 4, 6, 10)


def estimates(seed, shape=SHAPE, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    u, t, s = (torch.randn(shape, generator=g) * 0.1 for _ in range(3))
    return u.to(dtype), t.to(dtype), s.to(dtype)


def run_pass(config, calls):
    """calls: (step, (u, t, s)), or (step, (u, t, s), cfg) for a CFG scale other than 7.5."""
    guidance = SafetyGuidance(config)
    edits = []
    for step, (u, t, s), *cfg in calls:
        edits.append(guidance.step(step=step, uncond=u, cond=t, safety=s,
                                   guidance_scale=cfg[0] if cfg else 7.5))
    return edits


def test_inputs_are_not_modified():
    guidance = SafetyGuidance(SafetyConfig(warmup=2))
    for step in range(5):
        u, t, s = estimates(step)
        copies = [x.clone() for x in (u, t, s)]
        edit = guidance.step(step=step, uncond=u, cond=t, safety=s, guidance_scale=7.5)
        for before, after in zip(copies, (u, t, s)):
            assert torch.equal(before, after)
        assert edit.shape == u.shape and edit.dtype == u.dtype and edit is not u


def test_repeated_step_starts_from_the_state_at_the_start_of_that_step():
    config = SafetyConfig(warmup=1, momentum_scale=0.6, momentum_beta=0.3)
    s0, s1a, s1b, s2, s3 = (estimates(seed) for seed in range(5))
    twice = run_pass(config, [(0, s0), (1, s1a), (1, s1b), (2, s2), (3, s3)])
    first_only = run_pass(config, [(0, s0), (1, s1a)])
    last_only = run_pass(config, [(0, s0), (1, s1b), (2, s2), (3, s3)])
    assert torch.equal(twice[1], first_only[1])
    assert torch.equal(twice[2], last_only[1])
    assert torch.equal(twice[3], last_only[2]) and torch.equal(twice[4], last_only[3])
    with_first = run_pass(config, [(0, s0), (1, s1a), (2, s2)])
    assert not torch.equal(twice[3], with_first[2])  # the first call's momentum did not leak


@pytest.mark.parametrize("config, cfg, end_step, expected", [
    (SafetyConfig(warmup=3), 7.5, None, [True] * 6),  # momentum: needed during warmup
    (SafetyConfig(warmup=3, momentum_scale=0.0), 7.5, None, [False] * 3 + [True] * 3),
    (SafetyConfig(warmup=3, momentum_beta=1.0), 7.5, None, [False] * 3 + [True] * 3),
    (SafetyConfig(warmup=3), None, None, [True] * 6),  # CFG scale not known: assumed on
    (SafetyConfig(warmup=3), 1.0, None, [False] * 6),
    (SafetyConfig(scale=1.0), 7.5, None, [False] * 6),
    (SafetyConfig(scale=1.0001, warmup=0), 7.5, None, [True] * 6),
    (SafetyConfig(warmup=6), 7.5, 6, [False] * 6),  # the pass ends before the warmup
    (SafetyConfig(warmup=5), 7.5, 6, [True] * 6),
])
def test_what_is_needed_follows_the_rules(config, cfg, end_step, expected):
    guidance = SafetyGuidance(config, end_step=end_step)
    assert [guidance.needed(i, cfg) for i in range(6)] == expected


@pytest.mark.parametrize("config", [SafetyConfig.preset(name) for name in PRESET_NAMES]
                         + [SafetyConfig(warmup=2, momentum_beta=1.0, momentum_scale=0.4)])
def test_skipped_estimates_give_bit_identical_results(config):
    steps = config.warmup + 3
    full, skipping = SafetyGuidance(config), SafetyGuidance(config)
    for i in range(steps):
        u, t, s = estimates(i)
        everything = full.step(step=i, uncond=u, cond=t, safety=s, guidance_scale=7.5)
        poisoned = None if i % 2 else torch.full_like(s, math.nan)  # garbage where unneeded
        given = s if skipping.needed(i, 7.5) else poisoned
        assert torch.equal(everything, skipping.step(step=i, uncond=u, cond=t, safety=given,
                                                     guidance_scale=7.5))


def test_a_needed_estimate_must_be_given():
    guidance = SafetyGuidance(SafetyConfig(warmup=2))
    u, t, _ = estimates(0)
    with pytest.raises(ValueError, match=r"safety is None, but .* needed at step 0"):
        guidance.step(step=0, uncond=u, cond=t, safety=None, guidance_scale=7.5)


def test_a_step_with_cfg_1_leaves_the_momentum_as_it_was():
    # The reference never touches its momentum when SLD is off; a step whose CFG scale turns
    # it off is skipped the same way, so step 2 sees the momentum of step 0.
    config = SafetyConfig(warmup=0, momentum_scale=0.8, momentum_beta=0.2)
    s0, s1, s2 = estimates(0), estimates(1), estimates(2)
    with_off = run_pass(config, [(0, s0), (1, s1, 1.0), (2, s2)])
    without = run_pass(config, [(0, s0), (2, s2)])
    assert torch.equal(with_off[1], torch.zeros(SHAPE))
    assert torch.equal(with_off[2], without[1])


def test_no_host_sync_in_a_step():
    # Meta tensors have no data: reading a value back or branching on one raises.
    guidance = SafetyGuidance(SafetyConfig(warmup=2))
    for step in range(5):
        u, t, s = (torch.empty(SHAPE, device="meta") for _ in range(3))
        edit = guidance.step(step=step, uncond=u, cond=t, safety=s, guidance_scale=7.5)
        assert edit.device.type == "meta" and edit.shape == SHAPE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_keep_their_dtype(dtype):
    guidance = SafetyGuidance(SafetyConfig(warmup=1))
    for step in range(3):
        u, t, s = estimates(step, dtype=dtype)
        edit = guidance.step(step=step, uncond=u, cond=t, safety=s, guidance_scale=7.5)
        assert edit.dtype == dtype and not edit.isnan().any()
    assert edit.abs().sum() > 0


@pytest.mark.parametrize("call, message", [
    (lambda g, u, t, s: g.step(step=0, uncond=u, cond=t, safety=s[:1], guidance_scale=7.5),
     r"safety must match uncond \(shape \(2, 4, 6, 10\)"),
    (lambda g, u, t, s: g.step(step=0, uncond=u, cond=t.double(), safety=s, guidance_scale=7.5),
     "cond must match uncond"),
    (lambda g, u, t, s: g.step(step=0, uncond=u, cond=t, safety=s,
                               guidance_scale=torch.tensor(7.5)),
     "guidance_scale must be a finite number"),
    (lambda g, u, t, s: g.step(step=-1, uncond=u, cond=t, safety=s, guidance_scale=7.5),
     "step must be an integer >= 0, got -1"),
    (lambda g, u, t, s: g.needed(1.5), "step must be an integer >= 0, got 1.5"),
    (lambda g, u, t, s: SafetyGuidance({"scale": 3}), "SafetyGuidance needs a SafetyConfig"),
])
def test_bad_calls_are_named_in_the_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(SafetyGuidance(SafetyConfig()), *estimates(0))


def test_steps_must_not_go_back_and_a_pass_keeps_its_shape():
    guidance = SafetyGuidance(SafetyConfig(warmup=0))
    u, t, s = estimates(0)
    guidance.step(step=3, uncond=u, cond=t, safety=s, guidance_scale=7.5)
    with pytest.raises(ValueError, match="step 2 came after step 3"):
        guidance.step(step=2, uncond=u, cond=t, safety=s, guidance_scale=7.5)
    u, t, s = estimates(1, shape=(1, 4, 6, 10))
    with pytest.raises(ValueError, match="use a new SafetyGuidance for each pass"):
        guidance.step(step=4, uncond=u, cond=t, safety=s, guidance_scale=7.5)


# -- SafetyConfig: validation, immutability, dict form, no torch --------------------------------

def test_keyword_construction_and_normalisation():
    import numpy as np

    config = SafetyConfig(concept="blood", scale=1000, threshold=-0.5, warmup=10.0,
                          momentum_scale=np.float32(0.25), momentum_beta=1)
    assert config.to_dict() == {"concept": "blood", "scale": 1000.0, "threshold": -0.5,
                                "warmup": 10, "momentum_scale": 0.25, "momentum_beta": 1.0}
    assert isinstance(config.warmup, int) and isinstance(config.scale, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.scale = 5.0


@pytest.mark.parametrize("fields, message", [
    ({"concept": ""}, r"^concept must be a non-empty string, got ''"),
    ({"concept": None}, r"^concept must be a non-empty string, got None"),
    ({"scale": -1}, r"^scale must be a finite number >= 0, got -1"),
    ({"scale": math.inf}, r"^scale must be a finite number >= 0, got inf"),
    ({"scale": "1000"}, r"^scale must be a finite number >= 0, got '1000' \(str\)"),
    ({"threshold": math.nan}, r"^threshold must be a finite number, got nan"),
    ({"threshold": True}, r"^threshold must be a finite number, got True \(bool\)"),
    ({"warmup": -1}, r"^warmup must be an integer >= 0, got -1"),
    ({"warmup": 2.5}, r"^warmup must be an integer >= 0, got 2.5"),
    ({"momentum_scale": -0.1}, r"^momentum_scale must be a finite number >= 0, got -0.1"),
    ({"momentum_scale": math.nan}, r"^momentum_scale must be a finite number >= 0"),
    ({"momentum_beta": 1.5}, r"^momentum_beta must be a number in \[0, 1\], got 1.5"),
    ({"momentum_beta": -0.01}, r"^momentum_beta must be a number in \[0, 1\]"),
])
def test_bad_settings_name_field_value_and_range(fields, message):
    with pytest.raises(ValueError, match=message):
        SafetyConfig(**fields)


def test_unknown_preset_names_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown SLD preset 'extreme'.*weak, medium, strong, max"):
        SafetyConfig.preset("extreme")
    with pytest.raises(ValueError, match="allowed names are weak, medium, strong, max"):
        SafetyConfig.preset(None)


def test_dict_form_round_trips_and_names_unknown_keys():
    config = SafetyConfig.from_dict(json.loads('{"threshold": -0.2, "warmup": 3}'))
    assert config == SafetyConfig(threshold=-0.2, warmup=3)
    assert SafetyConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown key 'beta'; allowed keys are concept, scale"):
        SafetyConfig.from_dict({"beta": 0.5})


def test_the_settings_side_imports_no_torch():
    code = ("import sys, ldg_core; ldg_core.SafetyConfig.preset('max');"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
