"""Safe Latent Diffusion in the WebUI double (A1111 1.10.1): the safety concept is one more
row per image, SLD's edit adds to SEGA's; off is bit-identical; on matches the independent
reference (tests/webui_reference.py), which evaluates the safety concept in a call of its own
and applies SafetyGuidance directly."""
import pytest
import torch

from tests import webui_harness as h
from tests.webui_harness import webui_state  # noqa: F401 (autouse: a fresh double per test)
from tests.test_webui_paths import CONCEPTS, RowSpy, config_of, unguided
from tests.webui_double.model import TinySD
from tests.webui_reference import ReferenceGuidance
from ldg_core import SafetyConfig
from modules import shared

# Numbers that act on the double's tiny model within a few steps (SLD's own act from step 7
# to 15 of 50, and with differences of real UNets).
SAFETY = SafetyConfig(concept="glasses", scale=60.0, threshold=0.05, warmup=2,
                      momentum_scale=0.3, momentum_beta=0.4)
SAMPLERS = ["Euler", "Euler a", "Heun", "DPM++ 2M", "DPM++ SDE", "LCM", "DDIM", "PLMS", "UniPC"]


def guided(p_kwargs, concepts=(), safety=SAFETY, **kwargs):
    return h.generate(p_kwargs, h.script_args(list(concepts), safety=safety), **kwargs)


def referenced(p_kwargs, concepts=(), safety=SAFETY):
    reference = ReferenceGuidance(config_of(list(concepts)), safety)
    return h.generate(p_kwargs, None, extra_scripts=[(reference, [])])[1]


def assert_as_reference(p_kwargs, concepts=(), safety=SAFETY):
    p, ours = guided(p_kwargs, concepts, safety)
    expected = referenced(p_kwargs, concepts, safety)
    assert (ours - unguided(p_kwargs)).abs().max() > 1e-3, "guidance had no visible effect"
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    return p, ours


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sld_alone_matches_the_reference(sampler):
    p, _ = assert_as_reference({"sampler_name": sampler, "steps": 8})
    assert p.extra_generation_params["Safe Latent Diffusion"] == \
        'custom "glasses" scale=60 threshold=0.05 warmup=2 momentum=0.3 beta=0.4'
    assert "Latent Diffusion Guidance" not in p.extra_generation_params


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DDIM"])
def test_sld_with_concepts_both_edits_add(sampler):
    p_kwargs = {"sampler_name": sampler, "steps": 8}
    p, both = assert_as_reference(p_kwargs, CONCEPTS)
    sega_only = h.generate(p_kwargs, h.script_args(CONCEPTS))[1]
    assert (both - sega_only).abs().max() > 1e-3
    assert p.extra_generation_params["Latent Diffusion Guidance"].startswith('add "smiling')


@pytest.mark.parametrize("p_kwargs", [
    {"sampler_name": "Euler", "steps": 8, "enable_hr": True, "hr_scale": 2,
     "hr_second_pass_steps": 4, "denoising_strength": 0.6},
    {"sampler_name": "DPM++ 2M", "steps": 10, "denoising_strength": 0.6,
     "init_latent": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))},
    {"sampler_name": "Heun", "steps": 8, "seed": 7, "batch_size": 2},
    {"sampler_name": "Euler", "steps": 8, "batch_size": 2, "prompt": "a cat AND a dog :0.5"},
    {"sampler_name": "DDIM", "steps": 8, "prompt": "a cat :1.5 AND a dog :-0.3"},
    {"sampler_name": "Euler", "steps": 6, "prompt": " ".join(f"w{i}" for i in range(80))},
], ids=["hires", "img2img", "batch2", "and", "and-ddim", "long-prompt"])
def test_sld_on_every_path(p_kwargs):
    assert_as_reference(p_kwargs, CONCEPTS[:1])


def test_sld_inpainting_leaves_the_preserved_area_alone():
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0
    p_kwargs = {"sampler_name": "Euler", "steps": 10, "init_latent": init,
                "denoising_strength": 0.9, "mask": mask, "nmask": 1 - mask}
    _, ours = assert_as_reference(p_kwargs)
    assert torch.equal(ours * mask, init * mask)


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_sld_with_sdxl_conditioning(sampler):
    shared.sd_model = TinySD(sdxl=True)
    assert_as_reference({"sampler_name": sampler, "steps": 6, "batch_size": 2}, CONCEPTS[:1])


def test_sld_off_is_bit_identical_and_adds_no_parameter():
    p_kwargs = {"sampler_name": "Euler", "steps": 6}
    plain = unguided(p_kwargs)
    p, off = h.generate(p_kwargs, h.script_args([], safety=None))
    assert torch.equal(plain, off) and "Safe Latent Diffusion" not in p.extra_generation_params
    p, off = h.generate(p_kwargs, h.script_args([], enabled=False, safety=SAFETY))
    assert torch.equal(plain, off) and "Safe Latent Diffusion" not in p.extra_generation_params
    # SEGA alone is what it was without the SLD part
    sega = h.generate(p_kwargs, h.script_args(CONCEPTS))[1]
    reference = ReferenceGuidance(config_of(CONCEPTS))
    torch.testing.assert_close(
        sega, h.generate(p_kwargs, None, extra_scripts=[(reference, [])])[1], rtol=0, atol=0)


@pytest.mark.parametrize("p_extra, safety", [
    ({"cfg_scale": 1.0}, SAFETY), ({}, SafetyConfig(concept="glasses", scale=1.0, warmup=0)),
    ({"sampler_name": "DDIM CFG++"}, SAFETY)])  # DDIM CFG++ applies CFG 7 / 12.5 < 1
def test_sld_that_cannot_act_evaluates_nothing_and_changes_nothing(p_extra, safety):
    p_kwargs = dict({"sampler_name": "Euler", "steps": 6}, **p_extra)
    spy = RowSpy()
    p, ours = guided(p_kwargs, safety=safety, extra_scripts=[(spy, [])])
    assert torch.equal(ours, unguided(p_kwargs))
    assert all(rows == 2 for _, rows, _ in spy.calls)


def test_safety_rows_only_at_the_steps_sld_needs():
    # Momentum off: nothing to evaluate before the warmup (SafetyGuidance.needed).
    safety = SafetyConfig(concept="glasses", scale=200.0, threshold=1.0, warmup=3,
                          momentum_scale=0.0, momentum_beta=0.4)
    spy = RowSpy()
    guided({"sampler_name": "Euler", "steps": 8}, safety=safety, extra_scripts=[(spy, [])])
    assert [rows for _, rows, _ in spy.calls] == [2] * 3 + [3] * 5
    assert_as_reference({"sampler_name": "Euler", "steps": 8}, safety=safety)


def test_a_long_safety_concept_goes_to_a_separate_call():
    safety = SafetyConfig(concept=" ".join(f"w{i}" for i in range(80)), scale=60.0,
                          threshold=0.05, warmup=2)
    p, _ = assert_as_reference({"sampler_name": "Euler", "steps": 6}, safety=safety)
    assert p.extra_generation_params["Latent Diffusion Guidance rows"] == "separate call"


def test_bad_sld_settings_stop_the_generation_before_sampling():
    args = h.script_args([], safety=SAFETY)
    args[h.SAFETY_START + 1] = "custom"
    args[h.SAFETY_START + 4] = float("nan")  # threshold
    p = h.processing.Processing(sampler_name="Euler", steps=4)
    runner = h.scripts.ScriptRunner([(h.SCRIPT_MODULE.LatentDiffusionGuidanceScript(), args)])
    with pytest.raises(Exception, match="Safe Latent Diffusion: threshold must be a finite"):
        h.processing.process_images(p, runner)


def test_controlnet_marks_the_safety_row_as_uncond_and_rows_stay_constant():
    from tests.test_webui_paths import ControlNetMarks
    p_kwargs = {"sampler_name": "Euler", "steps": 6, "batch_size": 2}
    safety = SafetyConfig(concept="glasses", scale=60.0, threshold=0.05, warmup=3,
                          momentum_scale=0.0, momentum_beta=0.4)  # needed from step 3 only
    marks = ControlNetMarks()
    _, ours = h.generate(p_kwargs, h.script_args(CONCEPTS[:1], safety=safety),
                         extra_scripts=[(marks, [])])
    # Every call: 2 prompt rows, the concept's and the safety concept's 2 rows each (kept at
    # every call: ControlNet caches per-row state at the first call's row count), 2 uncond.
    assert all(m == [1024.0] * 2 + [-1024.0] * 6 for m in marks.row_marks)
    reference = ReferenceGuidance(config_of(CONCEPTS[:1]), safety)
    expected = h.generate(p_kwargs, None,
                          extra_scripts=[(ControlNetMarks(), []), (reference, [])])[1]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
