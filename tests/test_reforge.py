"""The WebUI script on the reForge double (tests/reforge_double.py), driven by the real
k-diffusion samplers: disabled is bit-identical, enabled matches the independent reference of
the Forge tests (each concept evaluated alone, SemanticGuidance applied directly), and the
concepts join reForge's own model call unless something stands in the way."""
import functools
import re
import logging

import pytest
import torch

from tests import webui_harness as h  # first: it puts the WebUI double on sys.path
from tests import reforge_double
from tests import test_webui_paths as paths
from tests.test_forge import ForgeReference, check_sdxl_and_v_prediction
from tests.test_webui_paths import CONCEPTS, LONG_CONCEPT, guided
from tests.webui_harness import webui_state  # noqa: F401 (autouse: a fresh double per test)
from ldg_core.forge import REFORGE_TWO_CALL, ForgeFunctions, reforge_sampler_problem
from modules import shared

SAMPLERS = ["Euler", "Euler a", "Heun", "DPM++ 2M", "DPM++ SDE", "DPM2", "LMS", "LCM"]
HOOK = "sampler_calc_cond_batch_function"


def reforge_functions(calc_cond_batch=reforge_double.calc_cond_batch):
    """What the script hands over on reForge (scripts/latent_diffusion_guidance.py
    forge_functions), with the double's pieces."""
    return ForgeFunctions(
        "reForge", lambda model, entry, x, sigma, options: calc_cond_batch(
            model, [None, [entry]], x, sigma, options)[1],
        cross_attn=reforge_double.CONDCrossAttn, condition=reforge_double.CONDRegular,
        keep_cfg1_uncond=True, evaluate_lists=calc_cond_batch,
        sampler_problem=reforge_sampler_problem, two_call_samplers=REFORGE_TWO_CALL)


@pytest.fixture(autouse=True)
def reforge(webui_state, monkeypatch):  # noqa: F811 (after the fresh WebUI double)
    base = reforge_double.install(monkeypatch, shared.sd_model)
    h.serve_host(monkeypatch, "reforge", reforge_functions)
    return base


class ReForgeReference(ForgeReference):
    """The Forge reference, keeping the negative at CFG 1 as ours does there, and acting only
    where reForge hands over a negative (it skips it itself: NGMS, skip early CFG)."""
    def process_before_every_sampling(self, p, *args, **kwargs):
        super().process_before_every_sampling(p, *args, **kwargs)
        p.sd_model.forge_objects.unet.model_options["disable_cfg1_optimization"] = True

    def post_cfg(self, args):
        if args["uncond"] is None:
            self._index(self.p.sampler.model_wrap_cfg, args["sigma"][0])  # the clock moves on
            return args["denoised"]
        return super().post_cfg(args)


assert_guided_as_reference = functools.partial(paths.assert_guided_as_reference,
                                               reference=ReForgeReference)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_disabled_is_bit_identical_and_patches_nothing(sampler, reforge):
    p_kwargs = {"sampler_name": sampler, "steps": 6}
    plain = h.generate(p_kwargs)[1]
    p, off = h.generate(p_kwargs, h.script_args(CONCEPTS, enabled=False))
    assert torch.equal(plain, off)
    options = shared.sd_model.forge_objects.unet.model_options
    assert "sampler_post_cfg_function" not in options and HOOK not in options


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_enabled_matches_the_reference(sampler):
    p = assert_guided_as_reference({"sampler_name": sampler, "steps": 8})
    assert "Latent Diffusion Guidance rows" not in p.extra_generation_params


def test_concepts_join_the_prompt_and_negative_in_one_model_call(reforge):
    guided({"sampler_name": "Euler", "steps": 6, "batch_size": 2})
    # Per step one call: prompt, negative and both concepts, 2 images each, in reForge's
    # reverse order of lists.
    assert reforge.model.calls == [8] * 6
    assert reforge.model.slots == [[3, 2, 1, 0]] * 6


def test_only_the_needed_concepts_join(reforge):
    concepts = [dict(CONCEPTS[0], warmup=3, cooldown=5), dict(CONCEPTS[1], warmup=0, cooldown=2)]
    assert_guided_as_reference({"sampler_name": "Euler", "steps": 8}, concepts,
                               momentum_scale=0.0)
    reforge.model.calls.clear()
    reforge.model.slots.clear()
    guided({"sampler_name": "Euler", "steps": 8}, concepts, momentum_scale=0.0)
    # Without momentum a concept is evaluated only in its window [warmup, cooldown).
    assert reforge.model.slots == [[2, 1, 0]] * 2 + [[1, 0]] + [[2, 1, 0]] * 2 + [[1, 0]] * 3


def test_a_taken_hook_means_a_separate_call_said_once(reforge, caplog):
    def theirs(args):
        return reforge_double.calc_cond_batch(args["model"], args["conds"], args["input"],
                                              args["sigma"], args["model_options"])
    reforge.set_model_sampler_calc_cond_batch_function(theirs)
    with caplog.at_level(logging.WARNING):
        p = assert_guided_as_reference({"sampler_name": "DPM++ 2M", "steps": 6})
    assert p.extra_generation_params["Latent Diffusion Guidance rows"] == "separate call"
    said = [r.getMessage() for r in caplog.records if "separate model call" in r.getMessage()]
    assert said == ["Latent Diffusion Guidance evaluates concepts in a separate model call: "
                    "another extension evaluates reForge's conditioning "
                    "(sampler_calc_cond_batch_function)."]
    reforge.model.calls.clear()
    guided({"sampler_name": "Euler", "steps": 3})
    assert reforge.model.calls == [2, 2] * 3  # theirs for prompt and negative, then ours
    assert shared.sd_model.forge_objects.unet.model_options[HOOK] is theirs


def test_attention_patches_that_read_rows_by_position_mean_a_separate_call(reforge):
    # IP-Adapter's patch picks (cond, uncond)[i] per list index (IPAdapterPlus.py L478-484).
    reforge.model_options["transformer_options"]["patches_replace"] = {"attn2": {("input", 1): 0}}
    p = assert_guided_as_reference({"sampler_name": "Euler", "steps": 4})
    assert p.extra_generation_params["Latent Diffusion Guidance rows"] == "separate call"
    reforge.model.calls.clear()
    guided({"sampler_name": "Euler", "steps": 4})
    assert reforge.model.calls == [2, 2] * 4  # reForge's prompt and negative, then the concepts


def test_a_row_limit_evaluates_concepts_apart_in_calls_of_that_size(reforge):
    p_kwargs = {"sampler_name": "Euler", "steps": 4, "batch_size": 2}
    shared.opts.ldg_max_rows_per_call = 2
    assert_guided_as_reference(p_kwargs)
    reforge.model.calls.clear()
    guided(p_kwargs)
    assert reforge.model.calls == [4, 2, 2] * 4


@pytest.mark.parametrize("option, value", [("s_min_uncond", 100.0), ("skip_early_cond", 0.5)])
def test_the_negative_reforge_skips_is_no_direction(option, value, reforge):
    setattr(shared.opts, option, value)
    assert_guided_as_reference({"sampler_name": "Euler", "steps": 8})
    reforge.model.slots.clear()
    guided({"sampler_name": "Euler", "steps": 8})
    skipped = [slots for slots in reforge.model.slots if 1 not in slots]
    assert skipped and all(slots == [0] for slots in skipped)  # no concepts where it skips


def test_cfg_one_keeps_the_negative_and_guides():
    assert_guided_as_reference({"sampler_name": "Euler", "steps": 6, "cfg_scale": 1.0})


def test_a_hires_cfg_below_zero_is_refused_before_sampling(reforge):
    with pytest.raises(ValueError, match="reForge computes no estimate of the negative prompt at "
                                         "a Hires CFG Scale of -1 .*: set it above 0, "
                                         "or turn guidance off"):
        guided({"sampler_name": "Euler", "steps": 4, "enable_hr": True, "hr_scale": 2,
                "hr_second_pass_steps": 2, "denoising_strength": 0.5, "hr_cfg": -1.0})
    assert reforge.model.calls == []


def test_batch_img2img_hires_inpainting_and_long_concepts():
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    concepts = [dict(CONCEPTS[0], warmup=4), CONCEPTS[1]]
    assert_guided_as_reference({"sampler_name": "Euler", "steps": 10, "init_latent": init,
                                "batch_size": 2, "denoising_strength": 0.5}, concepts)
    assert_guided_as_reference({"sampler_name": "Heun", "steps": 6, "enable_hr": True,
                                "hr_scale": 2, "hr_second_pass_steps": 4,
                                "denoising_strength": 0.6, "hr_cfg": 5.0}, concepts)
    assert_guided_as_reference({"sampler_name": "DPM++ 2M", "steps": 6},
                               [LONG_CONCEPT, CONCEPTS[0]])
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    p_kwargs = {"sampler_name": "Euler", "steps": 8, "init_latent": init[:1], "mask": mask,
                "nmask": 1 - mask, "denoising_strength": 0.75}
    _, ours = guided(p_kwargs)
    assert torch.equal(ours * mask, init[:1] * mask)
    assert_guided_as_reference(p_kwargs)


def test_sdxl_conditioning_and_v_prediction(monkeypatch):
    check_sdxl_and_v_prediction(monkeypatch, reforge_double, assert_guided_as_reference)


def test_out_of_memory_in_the_joined_call_stops_the_generation_once(reforge, monkeypatch):
    def failing(model, conds, *args):
        if len(conds) > 2:  # ours joined
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return reforge_double.calc_cond_batch(model, conds, *args)
    monkeypatch.setattr(h.SCRIPT_MODULE, "forge_functions", lambda: reforge_functions(failing))
    with pytest.raises(ValueError, match="out of memory at step 0 while evaluating the concepts "
                                         "with the prompt \\(2 concept rows\\)"):
        guided({"sampler_name": "Euler", "steps": 4})
    assert HOOK not in shared.sd_model.forge_objects.unet.model_options
    p_kwargs = {"sampler_name": "Euler", "steps": 4}
    assert torch.equal(h.generate(p_kwargs, h.script_args(CONCEPTS, enabled=False))[1],
                       h.generate(p_kwargs)[1])


def test_other_failures_in_the_joined_call_stay_the_hosts(reforge, monkeypatch):
    def failing(model, conds, *args):
        raise RuntimeError("a neighbour's patch broke")
    monkeypatch.setattr(h.SCRIPT_MODULE, "forge_functions", lambda: reforge_functions(failing))
    with pytest.raises(RuntimeError, match="a neighbour's patch broke"):
        guided({"sampler_name": "Euler", "steps": 4})


@pytest.mark.parametrize("p_kwargs", [
    {"sampler_name": "Euler", "steps": 8},
    {"sampler_name": "Heun", "steps": 6, "enable_hr": True, "hr_scale": 2,
     "hr_second_pass_steps": 4, "denoising_strength": 0.6, "hr_cfg": 5.0}], ids=["txt2img", "hires"])
def test_sld_with_concepts_matches_the_reference(p_kwargs, reforge):
    from tests.test_forge import assert_sld_as_reference
    assert_sld_as_reference(p_kwargs, CONCEPTS[:1], ReForgeReference)


@pytest.mark.parametrize("sampler, why", [
    ("Euler CFG++", "it replaces the UNet's post-CFG functions with its own"),
    ("Euler A Comfy RF", "it replaces the UNet's post-CFG functions with its own"),
    ("SEEDS 2 DP", "its number of model calls per step changes during the run"),
])
def test_reforge_samplers_that_cannot_be_guided_are_refused_before_sampling(sampler, why,
                                                                           reforge, monkeypatch):
    # Measured in the real reForge: its CFG++ and RF samplers gave images identical to
    # unguided ones (their model options replace ours), SEEDS and others ran past the schedule.
    from modules import sd_samplers
    monkeypatch.setitem(sd_samplers.all_samplers_map, sampler, sd_samplers.all_samplers_map["Euler"])
    with pytest.raises(ValueError, match=f"the sampler '{re.escape(sampler)}' is not supported "
                                         f"on reForge: {why}"):
        guided({"sampler_name": sampler, "steps": 4})
    assert reforge.model.calls == []


def register(monkeypatch, name, sample):
    """Adds a sampler as reForge registers its own (modules_forge/forge_alter_samplers.py
    L260-269): a k-diffusion function and no options, so no second_order flag."""
    from modules import sd_samplers, sd_samplers_common, sd_samplers_kdiffusion
    import k_diffusion.sampling
    monkeypatch.setattr(k_diffusion.sampling, f"sample_{name}", sample, raising=False)
    config = sd_samplers_common.SamplerData(
        name, lambda model: sd_samplers_kdiffusion.KDiffusionSampler(f"sample_{name}", model), [], {})
    monkeypatch.setitem(sd_samplers.all_samplers_map, name, config)


@pytest.mark.parametrize("comfy, namesake", [
    ("Heun Comfy", "Heun"), ("DPM++ 2S Ancestral Comfy", "DPM++ 2S a"),
    ("DPM++ SDE Comfy", "DPM++ SDE")])
def test_two_call_samplers_registered_without_saying_so_share_a_step(comfy, namesake, monkeypatch):
    # reForge's ComfyUI copies of Heun, DPM++ 2S a and DPM++ SDE make two model calls per step
    # (ldm_patched/k_diffusion/sampling.py) without the second_order flag their A1111
    # namesakes carry; guided, they must give the namesake's image (the same function and
    # options but the flag), which matches the reference.
    import k_diffusion.sampling
    from modules import sd_samplers
    namesake_config = sd_samplers.all_samplers_map[namesake]
    register(monkeypatch, comfy, getattr(k_diffusion.sampling, namesake_config.constructor(
        shared.sd_model).func.__name__))
    options = {k: v for k, v in namesake_config.options.items() if k != "second_order"}
    monkeypatch.setitem(sd_samplers.all_samplers_map, comfy,
                        sd_samplers.all_samplers_map[comfy]._replace(options=options))
    assert_guided_as_reference({"sampler_name": namesake, "steps": 6})
    for p_kwargs in [{"steps": 6}, {"steps": 8, "denoising_strength": 0.5,
                                    "init_latent": torch.randn(1, 4, 8, 8)}]:
        _, ours = guided(dict(p_kwargs, sampler_name=comfy))
        _, expected = guided(dict(p_kwargs, sampler_name=namesake))
        assert torch.equal(ours, expected)


def test_a_sampler_that_replaces_the_post_cfg_chain_stops_at_its_first_call(reforge, monkeypatch):
    # reForge's CFG denoiser lays a sampler's model options over the UNet's (L211-213); a
    # sampler that brings its own post-CFG list (as its CFG++ samplers do) would drop our edit.
    # Known ones are refused by name before sampling; any other stops at its first call.
    import k_diffusion.sampling

    def sample_own_options(model, x, sigmas, extra_args=None, **kwargs):
        options = {"sampler_post_cfg_function": [lambda args: args["denoised"]]}
        return k_diffusion.sampling.sample_euler(
            model, x, sigmas, extra_args=dict(extra_args, model_options=options), **kwargs)
    register(monkeypatch, "Euler Own Options", sample_own_options)
    with pytest.raises(ValueError, match="this sampler replaces reForge's post-CFG functions "
                                         "with its own, so guidance cannot be added"):
        guided({"sampler_name": "Euler Own Options", "steps": 4})
    assert reforge.model.calls == []
    assert HOOK not in shared.sd_model.forge_objects.unet.model_options


def test_a_failure_after_the_joined_call_says_where_it_happened(monkeypatch):
    from ldg_core.passes import GuidancePass

    def failing(*args, **kwargs):
        raise RuntimeError("broken edit")
    monkeypatch.setattr(GuidancePass, "edit", failing)
    with pytest.raises(ValueError) as raised:
        guided({"sampler_name": "Euler", "steps": 4})
    assert str(raised.value) == (
        "Latent Diffusion Guidance: failed at step 0 while computing the edit from the "
        "concepts evaluated with the prompt: RuntimeError: broken edit. The generation was "
        "stopped rather than finished without guidance")
