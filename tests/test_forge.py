"""The WebUI script on the Forge double (tests/forge_double.py), driven by the real k-diffusion
samplers: disabled is bit-identical, enabled matches an independent reference that evaluates
each concept in a model call of its own and applies SemanticGuidance directly."""
import functools
import re
from types import SimpleNamespace

import pytest
import torch

from tests import webui_harness as h  # first: it puts the WebUI double on sys.path
from tests import forge_double
from tests.webui_harness import webui_state  # noqa: F401 (autouse: a fresh double per test)
from tests import test_webui_paths as paths
from tests.test_webui_paths import CONCEPTS, LONG_CONCEPT, guided
from tests.webui_double.model import TinySD
from tests.webui_reference import ReferenceGuidance
from ldg_core import SafetyConfig
from ldg_core.forge import ForgeFunctions
from modules import script_callbacks, shared

SAMPLERS = ["Euler", "Euler a", "Heun", "DPM++ 2M", "DPM++ SDE", "DPM2", "LMS", "LCM",
            "DDIM", "PLMS", "UniPC"]


def forge_functions(calc_cond_uncond_batch=forge_double.calc_cond_uncond_batch):
    """What the script hands over on Forge (scripts/latent_diffusion_guidance.py
    forge_functions), with the double's pieces."""
    return ForgeFunctions(
        "Forge", lambda model, entry, x, sigma, options: calc_cond_uncond_batch(
            model, [], [entry], x, sigma, options)[1],
        cross_attn=forge_double.ConditionCrossAttn, condition=forge_double.Condition)


@pytest.fixture(autouse=True)
def forge(webui_state, monkeypatch):  # noqa: F811 (after the fresh WebUI double)
    base = forge_double.install(monkeypatch, shared.sd_model)
    h.serve_host(monkeypatch, "forge", forge_functions)
    return base


class ForgeReference(ReferenceGuidance):
    """The reference of the A1111 tests (its step index from the sampler's reports and noise
    levels), as a post-CFG function of its own: each concept evaluated alone, unpadded."""
    def process(self, p, *args):
        self.p = p

    def process_before_every_sampling(self, p, *args, **kwargs):
        super().process_before_every_sampling(p, *args, **kwargs)
        unet = p.sd_model.forge_objects.unet.clone()
        unet.set_model_sampler_post_cfg_function(lambda args: self.post_cfg(args))
        p.sd_model.forge_objects.unet = unet

    def postprocess(self, p, processed, *args):
        pass

    def post_cfg(self, args):
        denoiser = self.p.sampler.model_wrap_cfg
        x, sigma, b = args["input"], args["sigma"], args["input"].shape[0]

        def eps(out):
            return (x - out) / sigma.view(-1, 1, 1, 1)
        estimates = []
        for concept in self.config.concepts:
            text = shared.sd_model.get_learned_conditioning([concept.prompt])
            cond = ({"c_crossattn": [text["crossattn"].expand(b, -1, -1)],
                     "vector": text["vector"].expand(b, -1)} if isinstance(text, dict)
                    else {"c_crossattn": [text.expand(b, -1, -1)]})
            estimates.append(eps(args["model"](x, sigma, cond=cond)))
        index = self._index(denoiser, sigma[0])
        uncond, cond = eps(args["uncond_denoised"]), eps(args["cond_denoised"])
        edit = (self.guidance.step(step=index, uncond=uncond, cond=cond,
                                   concepts=torch.stack(estimates))
                if estimates else torch.zeros_like(uncond))
        if self.safety is not None:  # Safe Latent Diffusion: its concept alone, every call
            text = shared.sd_model.get_learned_conditioning([self.safety_config.concept])
            condition = ({"c_crossattn": [text["crossattn"].expand(b, -1, -1)],
                          "vector": text["vector"].expand(b, -1)} if isinstance(text, dict)
                         else {"c_crossattn": [text.expand(b, -1, -1)]})
            safety = eps(args["model"](x, sigma, cond=condition))
            # The prompt's estimate the host's CFG scales: AND sub-prompts are averaged by
            # strength and the difference scaled by the strengths' sum, in the host's x0 space
            # (SLD's mask and clamp are not continuous, so the rounding must be the host's).
            strength = sum(entry.get("strength", 1.0) for entry in args["cond"])
            u, c = args["uncond_denoised"], args["cond_denoised"]
            prompt = eps(u + (c - u) * strength) if abs(strength - 1) > 1e-9 else cond
            scale = args.get("cond_scale", denoiser.sampler.sampler_extra_args["cond_scale"])
            edit = edit + self.safety.step(step=index, uncond=uncond, cond=prompt,
                                           safety=safety, guidance_scale=scale)
        edit = -sigma.view(-1, 1, 1, 1) * edit
        if denoiser.mask is not None:
            edit = edit * denoiser.nmask
        return args["denoised"] + edit


assert_guided_as_reference = functools.partial(paths.assert_guided_as_reference,
                                               reference=ForgeReference)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_disabled_is_bit_identical_and_patches_nothing(sampler, forge):
    p_kwargs = {"sampler_name": sampler, "steps": 6}
    plain = h.generate(p_kwargs)[1]
    p, off = h.generate(p_kwargs, h.script_args(CONCEPTS, enabled=False))
    assert torch.equal(plain, off)
    assert "sampler_post_cfg_function" not in shared.sd_model.forge_objects.unet.model_options


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_enabled_matches_the_reference(sampler):
    p = assert_guided_as_reference({"sampler_name": sampler, "steps": 8})
    assert p.extra_generation_params["Latent Diffusion Guidance"].startswith('add "smiling woman"')


def test_no_webui_callbacks_are_registered_on_forge():
    counts = []

    def spy(params):
        counts.append(script_callbacks.registered_count())
    script_callbacks.on_cfg_denoiser(spy, name="spy")
    guided({"sampler_name": "Euler", "steps": 4})
    script_callbacks.remove_callbacks_for_function(spy)
    # Forge fires on_cfg_denoiser with the images' rows only: A1111's row callbacks of ours
    # would stop there. Only the spy is registered while sampling.
    assert counts == [1] * 4


def test_all_needed_concepts_go_in_one_model_call(forge):
    guided({"sampler_name": "Euler", "steps": 6, "batch_size": 2})
    # Per step: Forge's cond and uncond calls (2 rows each), then one call of 2 concepts x 2 images.
    assert forge.model.calls == [2, 2, 4] * 6


@pytest.mark.parametrize("limit, rows", [(2, [2, 2]), (3, [2, 2]), (4, [4]), (1, [2, 2])])
def test_the_row_limit_takes_whole_concepts(forge, limit, rows):
    p_kwargs = {"sampler_name": "DPM++ 2M", "steps": 4, "batch_size": 2}
    unlimited = guided(p_kwargs)[1]
    shared.opts.ldg_max_rows_per_call = limit
    forge.model.calls.clear()
    limited = guided(p_kwargs)[1]
    assert torch.equal(limited, unlimited)
    assert forge.model.calls == ([2, 2] + rows) * 4


def test_batch_img2img_hires_and_long_concepts():
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    concepts = [dict(CONCEPTS[0], warmup=4), CONCEPTS[1]]
    assert_guided_as_reference({"sampler_name": "Euler", "steps": 10, "init_latent": init,
                                "batch_size": 2, "denoising_strength": 0.5}, concepts)
    assert_guided_as_reference({"sampler_name": "Heun", "steps": 6, "enable_hr": True,
                                "hr_scale": 2, "hr_second_pass_steps": 4,
                                "denoising_strength": 0.6}, concepts)
    assert_guided_as_reference({"sampler_name": "DPM++ 2M", "steps": 6},
                               [LONG_CONCEPT, CONCEPTS[0]])


def test_inpainting_leaves_the_preserved_area_alone():
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    p_kwargs = {"sampler_name": "Euler", "steps": 8, "init_latent": init, "mask": mask,
                "nmask": 1 - mask, "denoising_strength": 0.75}
    _, ours = guided(p_kwargs)
    assert torch.equal(ours * mask, init * mask)
    assert_guided_as_reference(p_kwargs)


def check_sdxl_and_v_prediction(monkeypatch, double, assert_guided):
    """On a fresh SDXL-like and a v-prediction model, installed in `double` (also reForge's)."""
    shared.sd_model = TinySD(sdxl=True)
    double.install(monkeypatch, shared.sd_model)
    assert_guided({"sampler_name": "Euler", "steps": 6})
    shared.sd_model = TinySD(v_prediction=True)
    double.install(monkeypatch, shared.sd_model)
    assert_guided({"sampler_name": "DPM++ 2M", "steps": 6})


def test_sdxl_conditioning_and_v_prediction(monkeypatch):
    check_sdxl_and_v_prediction(monkeypatch, forge_double, assert_guided_as_reference)


@pytest.mark.parametrize("p_extra, setting", [
    ({"cfg_scale": 1.0}, "CFG scale"),
    # The real Forge ran the whole first pass before refusing this one in the hires pass.
    ({"enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 2, "denoising_strength": 0.5,
      "hr_cfg": 1.0}, "Hires CFG Scale"),
])
def test_cfg_one_is_refused_before_sampling(forge, p_extra, setting):
    with pytest.raises(ValueError, match="Forge computes no estimate of the negative prompt at "
                                         f"a {setting} of 1"):
        guided(dict({"sampler_name": "Euler", "steps": 4}, **p_extra))
    assert forge.model.calls == []


def test_flow_models_are_refused_before_sampling(forge):
    forge.model.predictor = SimpleNamespace(prediction_type="const")
    with pytest.raises(ValueError, match="TinySD models are not supported: they predict a flow"):
        guided({"sampler_name": "Euler", "steps": 4})
    assert forge.model.calls == []


def test_a_failure_in_the_concept_call_stops_the_generation_once(forge, monkeypatch):
    original = forge_double.calc_cond_uncond_batch

    def failing(model, cond, uncond, *args):
        if not cond:  # ours: the concepts in the negative slot alone
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(model, cond, uncond, *args)
    monkeypatch.setattr(h.SCRIPT_MODULE, "forge_functions", lambda: forge_functions(failing))
    with pytest.raises(ValueError, match="out of memory at step 0 while evaluating the concepts"):
        guided({"sampler_name": "Euler", "steps": 4})
    assert "sampler_post_cfg_function" not in shared.sd_model.forge_objects.unet.model_options



@pytest.mark.parametrize("neo", [False, True])
def test_guidance_leaves_the_steps_where_forge_skips_the_negative(neo, monkeypatch, forge):
    # Forge skips by the A1111 rule, which includes call 0; Forge Neo never skips call 0
    # (sd_samplers_cfg_denoiser.py L142) and says the scale in the post-CFG arguments.
    monkeypatch.setitem(forge_double.NEO, "on", neo)
    shared.opts.skip_early_cond = 0.25
    seen = []
    original = forge_double.calc_cond_uncond_batch

    def spy(model, cond, uncond, *args):
        seen.append((bool(cond), uncond is not None))
        return original(model, cond, uncond, *args)
    monkeypatch.setattr(forge_double, "calc_cond_uncond_batch", spy)
    monkeypatch.setattr(h.SCRIPT_MODULE, "forge_functions", lambda: forge_functions(spy))
    concepts = [dict(CONCEPTS[0], warmup=0)]
    _, ours = guided({"sampler_name": "Euler", "steps": 8}, concepts)
    # Forge's own calls have the prompt (and the negative unless skipped); ours have no prompt.
    guided_calls = [call for call in seen if not call[0]]
    skipped = [0, 1, 2] if not neo else [1, 2]  # calls with step / 8 <= 0.25
    assert len(guided_calls) == 8 - len(skipped)
    own = [entry for entry in seen if entry[0]]
    assert [not has_uncond for _, has_uncond in own] == [i in skipped for i in range(8)]
    unguided = h.generate({"sampler_name": "Euler", "steps": 8})[1]
    assert (ours - unguided).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", ["HeunPP2", "Kohaku LoNyu Yog", "DPM++ 2s a RF"])
def test_samplers_with_changing_calls_per_step_are_refused_before_sampling(sampler, forge,
                                                                          monkeypatch):
    # Forge's HeunPP2 makes 3 calls per step, then 2, then 1 (k_diffusion/sampling.py
    # sample_heunpp2); Neo's Kohaku LoNyu Yog and DPM++ 2s a RF change theirs too. The double
    # has none of them: an entry of that name (its calls never come) stands in.
    from modules import sd_samplers
    monkeypatch.setitem(sd_samplers.all_samplers_map, sampler, sd_samplers.all_samplers_map["Euler"])
    with pytest.raises(ValueError, match=f"the sampler '{re.escape(sampler)}' is not supported: its number "
                                         "of model calls per step changes during the run"):
        guided({"sampler_name": sampler, "steps": 4})
    assert forge.model.calls == []


def test_and_prompts_are_weighted_entries_of_the_prompt_slot(forge):
    # Forge compiles one entry per sub-prompt with its weight as strength (condition.py
    # L122-142) and averages them; concepts stay directions from the negative.
    p_kwargs = {"sampler_name": "DPM++ 2M", "steps": 6, "batch_size": 2,
                "prompt": "a cat AND a dog :0.5"}
    assert_guided_as_reference(p_kwargs)
    forge.model.calls.clear()
    guided(p_kwargs)
    assert forge.model.calls == [2, 2, 2, 4] * 6  # two prompt entries, the negative, concepts


# -- Safe Latent Diffusion: the safety concept is one more concept in our call ---------------

MASK = torch.zeros(1, 1, 8, 8)
MASK[..., :4] = 1.0  # the left half is preserved
SLD = SafetyConfig(concept="glasses", scale=60.0, threshold=0.05, warmup=2,
                   momentum_scale=0.3, momentum_beta=0.4)


def assert_sld_as_reference(p_kwargs, concepts=(), reference=None):
    reference = reference or ForgeReference
    _, ours = h.generate(p_kwargs, h.script_args(list(concepts), safety=SLD))
    expected = h.generate(p_kwargs, None, extra_scripts=[
        (reference(paths.config_of(list(concepts)), SLD), [])])[1]
    assert (ours - h.generate(p_kwargs)[1]).abs().max() > 1e-3
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p_kwargs, concepts", [
    ({"sampler_name": "Euler", "steps": 8}, ()),
    ({"sampler_name": "DDIM", "steps": 8}, CONCEPTS),
    ({"sampler_name": "Heun", "steps": 6, "batch_size": 2, "prompt": "a cat AND a dog :0.5"},
     CONCEPTS[:1]),
    ({"sampler_name": "Euler", "steps": 8, "enable_hr": True, "hr_scale": 2,
      "hr_second_pass_steps": 4, "denoising_strength": 0.6}, CONCEPTS[:1]),
    ({"sampler_name": "DPM++ 2M", "steps": 10, "denoising_strength": 0.6, "mask": MASK,
      "nmask": 1 - MASK, "init_latent": torch.randn(
          1, 4, 8, 8, generator=torch.Generator().manual_seed(5))}, ()),
], ids=["alone", "with-concepts", "and-batch", "hires", "inpainting"])
def test_sld_matches_the_reference(p_kwargs, concepts, forge):
    assert_sld_as_reference(p_kwargs, concepts)


def test_sld_joins_the_concepts_call(forge):
    h.generate({"sampler_name": "Euler", "steps": 4, "batch_size": 2},
               h.script_args(CONCEPTS[:1], safety=SLD))
    # cond and uncond, then one call: the concept and the safety concept, two images each.
    assert forge.model.calls == [2, 2, 4] * 4


def test_sld_with_sdxl_conditioning(monkeypatch):
    shared.sd_model = TinySD(sdxl=True)
    forge_double.install(monkeypatch, shared.sd_model)
    assert_sld_as_reference({"sampler_name": "Euler", "steps": 6, "batch_size": 2}, CONCEPTS[:1])


def test_with_a_self_attention_replacement_each_concept_gets_its_own_call(forge):
    # StyleAlign aligns the rows of a call to its first: stacked concepts would leak into each
    # other (measured in the real Forge: 15/255 between stacked and separate calls).
    p_kwargs = {"sampler_name": "Euler", "steps": 4, "batch_size": 2}
    stacked = guided(p_kwargs)[1]
    forge.model_options["transformer_options"]["patches_replace"] = {"attn1": {("input", 1, 0): 0}}
    forge.model.calls.clear()
    alone = guided(p_kwargs)[1]
    assert forge.model.calls == [2, 2, 2, 2] * 4
    assert torch.equal(alone, stacked)  # the double's model has no shared attention


def test_keep_the_image_is_refused_before_sampling(forge):
    from ldg_core.ui_args import KEEP_IMAGE
    args = h.script_args([{"prompt": "glasses"}])
    args[KEEP_IMAGE] = True
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="'Keep the image' .* is not available on Forge yet"):
        h.generate({"sampler_name": "DDIM", "steps": 4, "init_latent": init}, args)
    assert forge.model.calls == []
