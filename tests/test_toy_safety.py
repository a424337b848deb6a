"""Safe Latent Diffusion (SLD) on the toy model: the host runs it, and what it does to images.

A colour stands in for unsafe content: the prompt asks for a red circle and the safety concept
is "red". Margins come from measured distributions (20 Euler steps, CFG 7, seeds 0-7, the
shipped weights), written next to each test.
"""
import numpy as np
import pytest
import torch

from ldg_core import Concept, GuidanceConfig, SafetyConfig, SafetyGuidance, SemanticGuidance
from ldg_core.toy import load, measure
from ldg_core.toy.host import SAMPLERS

SEEDS = range(8)
BASE = "a red circle on a white background"
COLOUR = "red"


@pytest.fixture(scope="module")
def pipe():
    return load()


def sld(level, **changes):
    config = SafetyConfig.preset(level, COLOUR)
    return SafetyConfig(**{**config.to_dict(), **changes})


# -- the host runs SLD --------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_sld_off_and_none_are_bit_identical_to_unguided(pipe, sampler):
    """safety=None attaches nothing; SLD with scale <= 1 (off in the reference) or CFG <= 1
    never adds a row or an edit, so the latent is the unguided one, bit for bit."""
    plain = pipe.generate_latent(BASE, seed=2, sampler=sampler)[0]
    assert torch.equal(pipe.generate_latent(BASE, seed=2, sampler=sampler, safety=None)[0], plain)
    for scale in (0.0, 1.0):
        latent = pipe.generate_latent(BASE, seed=2, sampler=sampler,
                                      safety=sld("max", scale=scale))[0]
        assert torch.equal(latent, plain)
    no_cfg = pipe.generate_latent(BASE, seed=2, sampler=sampler, cfg_scale=1.0)[0]
    assert torch.equal(pipe.generate_latent(BASE, seed=2, sampler=sampler, cfg_scale=1.0,
                                            safety=sld("max"))[0], no_cfg)


def test_sld_off_leaves_guidance_alone(pipe):
    guidance = GuidanceConfig(concepts=[Concept("blue", scale=5, warmup=2)])
    alone = pipe.generate_latent(BASE, seed=1, guidance=guidance)[0]
    off = pipe.generate_latent(BASE, seed=1, guidance=guidance, safety=sld("max", scale=1.0))[0]
    assert torch.equal(off, alone)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_same_arguments_same_image(pipe, sampler):
    guidance = GuidanceConfig(concepts=[Concept("blue", scale=5, warmup=2)])
    for kw in ({"safety": sld("strong")}, {"safety": sld("medium"), "guidance": guidance}):
        first = pipe.generate(BASE, seed=3, sampler=sampler, **kw)
        assert np.array_equal(first, pipe.generate(BASE, seed=3, sampler=sampler, **kw))
        assert first.dtype == np.uint8 and first.shape == (32, 32, 3)


def test_a_safety_config_is_required(pipe):
    with pytest.raises(ValueError, match="SafetyConfig"):
        pipe.generate(BASE, seed=0, safety={"concept": "red"})


def test_the_safety_row_is_added_only_where_needed(pipe):
    """One more row in the model call where needed(step, cfg): "weak" has no momentum, so only
    its last 5 of 20 steps (warmup 15); "medium" feeds its momentum from step 0."""
    rows = []
    hook = pipe._eps_model.register_forward_hook(lambda m, args, out: rows.append(len(out)))
    try:
        pipe.generate(BASE, seed=0, safety=sld("weak"))
        weak, rows[:] = list(rows), []
        pipe.generate(BASE, seed=0, safety=sld("medium"))
    finally:
        hook.remove()
    assert weak == [2] * 15 + [3] * 5
    assert rows == [3] * 20


@pytest.mark.parametrize("with_guidance", [False, True])
def test_ddim_matches_a_loop_written_from_the_method(pipe, with_guidance):
    """DDIM hands eps to the callbacks: a step is CFG plus SLD's edit (plus SEGA's, when both
    run: the edits add) on the model's own estimates. One model call per step with the rows
    [prompt, needed concepts, safety where needed, uncond]."""
    safety = sld("strong", warmup=3)
    guidance = GuidanceConfig(concepts=[Concept("blue", scale=6, warmup=2)],
                              momentum_scale=0.3) if with_guidance else None
    steps, model = 10, pipe.model
    got = pipe.generate_latent(BASE, seed=4, steps=steps, sampler="ddim", guidance=guidance,
                               safety=safety)[0]

    concepts = [c.prompt for c in guidance.concepts] if guidance else []
    context = {t: model.encode([t]) for t in [BASE, COLOUR, ""] + concepts}
    x = torch.randn((1, 12, 16, 16), generator=torch.Generator().manual_seed(4))
    a = model.alphas_cumprod.double()
    timesteps = torch.arange(1, 1000, 1000 // steps)  # the WebUI's DDIM timesteps
    sld_engine = SafetyGuidance(safety, end_step=steps)
    sega = SemanticGuidance(guidance, end_step=steps) if guidance else None
    with torch.no_grad():
        for step in range(steps - 1):
            t = timesteps[-1 - step]
            needed = sega.needed(step) if sega else ()
            safe = sld_engine.needed(step, 7.0)
            rows = [BASE] + [concepts[i] for i in needed] + [COLOUR] * safe + [""]
            out = model(x.expand(len(rows), -1, -1, -1), t.expand(len(rows)),
                        torch.cat([context[r] for r in rows]))
            e_c, e_u = out[:1], out[-1:]
            e = e_u + (e_c - e_u) * 7.0
            if sega:
                e = e + sega.step(step=step, uncond=e_u, cond=e_c,
                                  concepts=out[1:1 + len(needed)].unsqueeze(1) if needed else None)
            e = e + sld_engine.step(step=step, uncond=e_u, cond=e_c,
                                    safety=out[-2:-1] if safe else None, guidance_scale=7.0)
            a_t, a_prev = a[t].item(), a[timesteps[-2 - step]].item()
            x0 = (x - (1 - a_t) ** 0.5 * e) / a_t ** 0.5
            x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * e
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


# -- what SLD does ------------------------------------------------------------------------------
# Per seed, the red share of the unguided image minus that of the SLD image ("removed"), and
# the layout overlap of the two (measure.layout_overlap, 1 = same layout). Measured over seeds
# 0-7 (unguided red share 0.21 to 0.72, mean 0.49):
#   level    removed: mean (min to max)     layout kept: mean (min to max)
#   weak     0.002 (-0.001 to 0.006)        0.99 (0.99 to 1.00)
#   medium   0.029 (0.001 to 0.056)         0.92 (0.88 to 0.95)
#   strong   0.108 (0.030 to 0.242)         0.75 (0.40 to 0.87)
#   max      0.457 (0.206 to 0.718)         0.17 (0.00 to 0.51)
# "weak" starts at step 15 of 20 with no momentum, when this tiny model's colours are long
# settled: it removes next to nothing here. Margins are about half of the measured gaps, so a
# retrained model of the same quality passes and a broken path does not. Our SEGA "Safety"
# presets measure alike (demo.py; removed 0.006 / 0.029 / 0.104 / 0.403, layout kept
# 0.99 / 0.93 / 0.76 / 0.30).

@pytest.fixture(scope="module")
def effects(pipe):
    plain = [pipe.generate(BASE, seed=s) for s in SEEDS]
    result = {}
    for level in ("weak", "medium", "strong", "max"):
        guided = [pipe.generate(BASE, seed=s, safety=sld(level)) for s in SEEDS]
        removed = np.array([measure.colour_share(p, COLOUR) - measure.colour_share(g, COLOUR)
                            for p, g in zip(plain, guided)])
        kept = np.array([measure.layout_overlap(p, g) for p, g in zip(plain, guided)])
        result[level] = removed, kept
    return result


def test_sld_removes_the_colour(effects):
    for level in ("strong", "max"):  # measured minima 0.030 and 0.206
        assert (effects[level][0] > 0).all(), (level, effects[level][0])
    assert effects["medium"][0].mean() > 0.015, effects["medium"][0]  # measured 0.029
    assert effects["strong"][0].mean() > 0.05, effects["strong"][0]  # measured 0.108
    assert effects["max"][0].mean() > 0.23, effects["max"][0]  # measured 0.457
    assert abs(effects["weak"][0].mean()) < 0.02, effects["weak"][0]  # measured 0.002


def test_stronger_configurations_remove_more(effects):
    removed = {level: effects[level][0] for level in effects}
    # Every seed orders medium < strong < max (smallest gaps 0.026 and 0.047); weak < medium
    # holds on every seed too, but by as little as 0.001, so only its mean gap is asserted.
    assert (removed["strong"] > removed["medium"]).all(), removed
    assert (removed["max"] > removed["strong"]).all(), removed
    # mean gaps measured: 0.027, 0.079, 0.35
    assert removed["medium"].mean() - removed["weak"].mean() > 0.013, removed
    assert removed["strong"].mean() - removed["medium"].mean() > 0.04, removed
    assert removed["max"].mean() - removed["strong"].mean() > 0.17, removed


def test_stronger_configurations_keep_less_of_the_layout(effects):
    kept = {level: effects[level][1] for level in effects}
    print({level: round(float(k.mean()), 2) for level, k in kept.items()})  # the report
    assert kept["weak"].min() > 0.95, kept  # measured 0.99 to 1.00
    # means measured 0.99 > 0.92 > 0.75 > 0.17 (gaps 0.07, 0.17, 0.58); per seed, strong
    # and max cross (seed 4: 0.40 and 0.51), so only the means are ordered.
    assert kept["weak"].mean() - kept["medium"].mean() > 0.035, kept
    assert kept["medium"].mean() - kept["strong"].mean() > 0.08, kept
    assert kept["strong"].mean() - kept["max"].mean() > 0.29, kept
