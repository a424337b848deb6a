"""The WebUI script in the test double of WebUI 1.10.1, driven by the real k-diffusion
samplers: disabled is bit-identical, enabled matches the independent reference."""
from types import SimpleNamespace

import pytest
import torch

from tests import webui_harness as h
from tests.webui_harness import webui_state  # noqa: F401 (autouse: a fresh double per test)
from tests.webui_double.model import TinySD
from tests.webui_reference import ReferenceGuidance
from ldg_core import Concept, GuidanceConfig
from modules import script_callbacks, shared

K_SAMPLERS = ["Euler", "Euler a", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ 2M",
              "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "LCM"]
TIMESTEP_SAMPLERS = ["DDIM", "DDIM CFG++", "PLMS", "UniPC"]
CONCEPTS = [{"prompt": "smiling woman", "scale": 40.0, "warmup": 2, "threshold": 0.8},
            {"prompt": "glasses", "direction": "remove", "scale": 30.0, "warmup": 1,
             "cooldown": 6, "weight": 2.0}]


def config_of(concepts, momentum_scale=0.1, momentum_beta=0.4):
    made = []
    for c in concepts:
        fields = {k: v for k, v in c.items() if k != "direction"}
        if fields.get("cooldown", -1) == -1:
            fields["cooldown"] = None
        made.append(Concept(reverse=c.get("direction") == "remove", **fields))
    return GuidanceConfig(concepts=made, momentum_scale=momentum_scale, momentum_beta=momentum_beta)


def unguided(p_kwargs):
    return h.generate(p_kwargs)[1]


def guided(p_kwargs, concepts=CONCEPTS, **settings):
    return h.generate(p_kwargs, h.script_args(concepts, **settings))


def referenced(p_kwargs, concepts=CONCEPTS, reference=ReferenceGuidance, **settings):
    reference = reference(config_of(concepts, **settings))
    return h.generate(p_kwargs, None, extra_scripts=[(reference, [])])[1]


def assert_guided_as_reference(p_kwargs, concepts=CONCEPTS, reference=ReferenceGuidance,
                               **settings):
    p, ours = guided(p_kwargs, concepts, **settings)
    expected = referenced(p_kwargs, concepts, reference, **settings)
    plain = unguided(p_kwargs)
    assert (ours - plain).abs().max() > 1e-3, "guidance had no visible effect"
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    return p


@pytest.mark.parametrize("sampler", K_SAMPLERS + TIMESTEP_SAMPLERS)
def test_disabled_is_bit_identical_and_registers_nothing(sampler):
    p_kwargs = {"sampler_name": sampler, "steps": 6}
    plain = unguided(p_kwargs)
    p, off = h.generate(p_kwargs, h.script_args(CONCEPTS, enabled=False))
    assert torch.equal(plain, off)
    assert "Latent Diffusion Guidance" not in p.extra_generation_params
    p, empty = h.generate(p_kwargs, h.script_args([{"prompt": "  "}]))
    assert torch.equal(plain, empty)


@pytest.mark.parametrize("sampler", K_SAMPLERS + TIMESTEP_SAMPLERS)
def test_enabled_matches_the_reference(sampler):
    p = assert_guided_as_reference({"sampler_name": sampler, "steps": 8})
    assert p.extra_generation_params["Latent Diffusion Guidance"].startswith('add "smiling woman"')


@pytest.mark.parametrize("sampler", TIMESTEP_SAMPLERS)
@pytest.mark.parametrize("steps", [6, 12])
def test_timestep_samplers_where_1000_is_not_a_multiple_of_the_steps(sampler, steps):
    # The WebUI spaces its timesteps 1000 // steps apart (sd_samplers_timesteps.py L86-97): 6
    # steps give 7 timesteps, 12 give 13, and UniPC then makes 7 or 13 model calls. A concept
    # whose warmup ends near the end must act on the last of them (the real WebUI logged
    # 'step 12 is past the end of this pass' for UniPC at 12 steps).
    concepts = [dict(CONCEPTS[0], warmup=steps - 2), dict(CONCEPTS[1], cooldown=-1)]
    assert_guided_as_reference({"sampler_name": sampler, "steps": steps}, concepts)


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS", "UniPC"])
def test_img2img_and_hires_of_timestep_samplers_with_uneven_spacing(sampler):
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    concepts = [dict(CONCEPTS[0], warmup=8), dict(CONCEPTS[1], cooldown=-1)]
    assert_guided_as_reference({"sampler_name": sampler, "steps": 12, "init_latent": init,
                                "denoising_strength": 0.5}, concepts)
    assert_guided_as_reference({"sampler_name": sampler, "steps": 12, "enable_hr": True,
                                "hr_scale": 2, "hr_second_pass_steps": 6,
                                "denoising_strength": 0.5}, concepts)


def test_batch_images_are_guided_independently():
    p_kwargs = {"sampler_name": "Heun", "steps": 8, "seed": 7}  # no sampler noise: seeds alone
    _, pair = guided(dict(p_kwargs, batch_size=2))
    _, first = guided(p_kwargs)
    _, second = guided(dict(p_kwargs, seed=8))
    # Each image's masks and momentum are its own: the batch gives what each alone gives.
    torch.testing.assert_close(pair, torch.cat([first, second]), rtol=1e-5, atol=1e-5)
    assert_guided_as_reference(dict(p_kwargs, batch_size=2))


def test_batch_count_starts_each_batch_afresh():
    p_kwargs = {"sampler_name": "DPM++ 2M", "steps": 8, "seed": 3}
    _, both = guided(dict(p_kwargs, n_iter=2))
    _, second_alone = guided(dict(p_kwargs, seed=4))
    torch.testing.assert_close(both[1:2], second_alone, rtol=1e-5, atol=1e-5)


def test_and_prompts():
    assert_guided_as_reference({"sampler_name": "Euler", "steps": 8, "batch_size": 2,
                                "prompt": "a cat AND a dog :0.5"})


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DPM++ SDE", "DDIM", "PLMS", "UniPC"])
def test_img2img_joins_the_schedule_where_its_noise_level_is(sampler):
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    concepts = [dict(CONCEPTS[0], warmup=6), CONCEPTS[1]]
    assert_guided_as_reference({"sampler_name": sampler, "steps": 10, "init_latent": init,
                                "denoising_strength": 0.5}, concepts)


class PreservedAreaSpy:
    """Registered after our script's callbacks: sees each combined result as the sampler will."""
    def __init__(self):
        self.max_change = []

    def process_before_every_sampling(self, p, *args, **kwargs):
        self.p = p
        script_callbacks.on_cfg_after_cfg(self.check, name="spy")

    def check(self, params):
        mask = self.p.mask
        if self.p.sampler.model_wrap_cfg.mask_before_denoising:
            return  # timestep samplers blend x before each call, and the result at the end
        self.max_change.append(((params.x - self.p.init_latent) * mask).abs().max().item())

    def postprocess(self, p, processed, *args):
        script_callbacks.remove_callbacks_for_function(self.check)


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_inpainting_leaves_the_preserved_area_alone(sampler):
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0  # the left half is preserved
    p_kwargs = {"sampler_name": sampler, "steps": 10, "init_latent": init,
                "denoising_strength": 0.9, "mask": mask, "nmask": 1 - mask}
    spy = PreservedAreaSpy()
    p, ours = h.generate(p_kwargs, h.script_args(CONCEPTS), extra_scripts=[(spy, [])])
    assert all(change == 0 for change in spy.max_change)
    assert torch.equal(ours * mask, init * mask)
    assert_guided_as_reference(p_kwargs)


def test_hires_fix_guides_both_passes():
    p_kwargs = {"sampler_name": "Euler", "steps": 8, "enable_hr": True, "hr_scale": 2,
                "hr_second_pass_steps": 4, "denoising_strength": 0.6}
    p = assert_guided_as_reference(p_kwargs)
    assert p.extra_generation_params["Latent Diffusion Guidance"]


@pytest.mark.parametrize("options", [{"batch_cond_uncond": False}, {"pad_cond_uncond": True},
                                     {"pad_cond_uncond_v0": True}, {}])
def test_long_negative_prompt_and_cond_uncond_options(options):
    for key, value in options.items():
        setattr(shared.opts, key, value)
    negative = " ".join(f"word{i}" for i in range(90))  # two chunks: 154 tokens against 77
    assert_guided_as_reference({"sampler_name": "Euler", "steps": 6, "batch_size": 2,
                                "negative_prompt": negative})


def test_long_prompt_pads_concepts_with_empty_chunks():
    prompt = " ".join(f"w{i}" for i in range(80)) + " BREAK a cat"  # three chunks
    assert_guided_as_reference({"sampler_name": "DPM++ 2M", "steps": 6, "prompt": prompt})


def test_cfg_scale_one():
    assert_guided_as_reference({"sampler_name": "Euler", "steps": 6, "cfg_scale": 1.0})


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_sdxl_style_dict_conditioning(sampler):
    shared.sd_model = TinySD(sdxl=True)
    assert_guided_as_reference({"sampler_name": sampler, "steps": 6, "batch_size": 2})


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "DDIM"])
def test_v_prediction_is_guided_in_eps_space(sampler):
    shared.sd_model = TinySD(v_prediction=True)
    assert_guided_as_reference({"sampler_name": sampler, "steps": 6})


class RowSpy:
    """Records the rows of every model call's conditioning, after our callback has run."""
    def __init__(self):
        self.calls = []

    def process_before_every_sampling(self, p, *args, **kwargs):
        self.p = p
        script_callbacks.on_cfg_denoiser(self.record, name="spy")

    def record(self, params):
        cond = params.text_cond["crossattn"] if isinstance(params.text_cond, dict) else params.text_cond
        self.calls.append((params.denoiser.step, params.x.shape[0], cond.clone()))

    def postprocess(self, p, processed, *args):
        script_callbacks.remove_callbacks_for_function(self.record)


@pytest.mark.parametrize("option", ["s_min_uncond", "skip_early_cond"])
def test_steps_without_uncond_get_no_concept_rows_and_no_edit(option):
    p_kwargs = {"sampler_name": "Euler", "steps": 8}
    if option == "s_min_uncond":
        p_kwargs["s_min_uncond"] = 100.0  # every odd call skips its uncond
    else:
        shared.opts.skip_early_cond = 0.5  # the first half of the calls skip theirs
    spy = RowSpy()
    concepts = [CONCEPTS[0], dict(CONCEPTS[1], cooldown=-1)]  # both needed at every step
    p, ours = h.generate(p_kwargs, h.script_args(concepts), extra_scripts=[(spy, [])])
    rows = [n for _, n, _ in spy.calls]
    skipped = [i % 2 == 1 for i in range(8)] if option == "s_min_uncond" else [i <= 4 for i in range(8)]
    for n, skip in zip(rows, skipped):
        assert n == (2 if skip else 2 + 2)  # prompt + uncond (+ two concepts)
    assert not torch.equal(ours, unguided(p_kwargs))


def test_concept_schedules_run_on_the_prompts_clock():
    # Heun makes two calls per step and the WebUI counts a prompt's [a:b:n] in calls (its
    # conds are built for 2 x steps): a concept's schedule must switch at the same call.
    spy = RowSpy()
    concepts = [{"prompt": "[red:blue:6]", "warmup": 0}]
    h.generate({"sampler_name": "Heun", "steps": 5}, h.script_args(concepts),
               extra_scripts=[(spy, [])])
    model = shared.sd_model
    red, blue = model.get_learned_conditioning(["red"])[0], model.get_learned_conditioning(["blue"])[0]
    for call, rows, cond in spy.calls:
        assert rows == 3
        assert torch.equal(cond[1], red if call <= 6 else blue), call


def test_a_pass_of_another_processing_object_is_left_alone():
    # ADetailer runs inner passes with copies of p while our callbacks are registered.
    from ldg_core.clock import StepClock
    from ldg_core.passes import GuidancePass
    from ldg_core.webui_adapter import PassGuidance
    from modules.script_callbacks import CFGDenoiserParams
    guidance = PassGuidance(GuidancePass(config_of(CONCEPTS), clock=StepClock(), eps_outputs=False),
                            owner=object(), concept_schedules=[], first_prompt_rows=[0],
                            webui=None)
    denoiser = type("Denoiser", (), {"p": object(), "step": 0})()
    x = torch.zeros(2, 4, 8, 8)
    params = CFGDenoiserParams(x, torch.zeros(2, 5, 1, 1), torch.ones(2), 0, 8,
                               torch.zeros(1, 77, 32), torch.zeros(1, 77, 32), denoiser)
    guidance.on_cfg_denoiser(params)
    assert params.x is x and guidance._call is None


def test_callbacks_are_removed_when_sampling_raises():
    class Boom(RuntimeError):
        pass

    original = shared.sd_model.apply_model
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Boom("the model failed")
        return original(*args, **kwargs)

    shared.sd_model.apply_model = failing
    with pytest.raises(Boom):
        guided({"sampler_name": "Euler", "steps": 6})
    assert script_callbacks.registered_count() == 0
    shared.sd_model.apply_model = original
    # Nothing leaks into the next generation: it equals a fresh one.
    _, after = guided({"sampler_name": "Euler", "steps": 6})
    shared.sd_model = TinySD()
    _, fresh = guided({"sampler_name": "Euler", "steps": 6})
    assert torch.equal(after, fresh)


def test_back_to_back_generations_are_identical():
    _, a = guided({"sampler_name": "DPM++ 2M", "steps": 6})
    _, b = guided({"sampler_name": "DPM++ 2M", "steps": 6})
    assert torch.equal(a, b)


def test_no_concept_that_can_act_means_nothing_registered():
    p_kwargs = {"sampler_name": "Euler", "steps": 6}
    concepts = [{"prompt": "smiling", "weight": 0.0}, {"prompt": "glasses", "scale": 0.0},
                {"prompt": "hat", "warmup": 3, "cooldown": 2}]
    for args in (h.script_args(concepts, momentum_scale=0.0),
                 h.script_args([{"prompt": "hat", "warmup": 100}])):  # the pass ends first
        spy = RowSpy()
        p, ours = h.generate(p_kwargs, args, extra_scripts=[(spy, [])])
        assert torch.equal(ours, unguided(p_kwargs))
        assert all(rows == 2 for _, rows, _ in spy.calls)


@pytest.mark.parametrize("concepts, settings, message", [
    ([{"prompt": "smiling", "threshold": 2.0}], {},
     r"^Latent Diffusion Guidance: concept 1 \('smiling'\): threshold must be a number in \[0, 1\], got 2.0"),
    ([{"prompt": ""}, {"prompt": "glasses", "warmup": -3}], {},
     r"concept 2 \('glasses'\): warmup must be an integer >= 0, got -3"),
    ([{"prompt": "hat", "direction": "sideways"}], {}, r"concept 1 \('hat'\): direction must be"),
    ([{"prompt": "hat"}], {"momentum_beta": 1.5}, r"momentum_beta must be a number in \[0, 1\]"),
])
def test_bad_settings_stop_the_generation_before_sampling(concepts, settings, message):
    p = None
    with pytest.raises(ValueError, match=message):
        p, _ = guided({"sampler_name": "Euler", "steps": 6}, concepts, **settings)
    assert p is None and shared.sd_model.unet.training is False


@pytest.mark.parametrize("p_kwargs, message", [
    ({"sampler_name": "DPM fast"}, "the sampler 'DPM fast' is not supported"),
    ({"sampler_name": "DPM adaptive"}, "the sampler 'DPM adaptive' is not supported"),
    ({"sampler_name": "Euler", "enable_hr": True, "hr_sampler_name": "DPM fast"},
     "the sampler 'DPM fast' is not supported"),
])
def test_unsupported_samplers_are_refused_before_sampling(p_kwargs, message):
    calls = []
    original = shared.sd_model.apply_model
    shared.sd_model.apply_model = lambda *a, **k: calls.append(1) or original(*a, **k)
    with pytest.raises(ValueError, match=message):
        guided(dict(p_kwargs, steps=6))
    assert calls == [], "the model ran before the error"


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DDIM"])
def test_a_concept_longer_than_the_prompt_is_evaluated_in_a_separate_call(sampler):
    long_concept = {"prompt": " ".join(f"w{i}" for i in range(80)), "scale": 30.0, "warmup": 1}
    concepts = [long_concept, CONCEPTS[0]]
    spy = RowSpy()
    p, _ = h.generate({"sampler_name": sampler, "steps": 6}, h.script_args(concepts),
                      extra_scripts=[(spy, [])])
    assert all(rows == 2 for _, rows, _ in spy.calls)  # nothing added to the prompt's call
    assert p.extra_generation_params["Latent Diffusion Guidance rows"] == "separate call"
    assert_guided_as_reference({"sampler_name": sampler, "steps": 6}, concepts)


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "DDIM"])
@pytest.mark.parametrize("p_extra", [{}, {"prompt": " ".join(f"w{i}" for i in range(80)),
                                          "batch_size": 2}])
def test_a_separate_call_gives_the_same_result_as_added_rows(sampler, p_extra, monkeypatch):
    p_kwargs = dict({"sampler_name": sampler, "steps": 6}, **p_extra)
    same_call = guided(p_kwargs)[1]
    monkeypatch.setattr("ldg_core.webui_generation.Generation._separate_call_needed",
                        lambda self, c, conds: True)
    separate = guided(p_kwargs)[1]
    torch.testing.assert_close(separate, same_call, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flag, message", [("is_sd3", "SD3 models are not supported"),
                                           ("cond_stage_key", "instruct-pix2pix edit models")])
def test_models_we_cannot_guide_are_refused(flag, message):
    setattr(shared.sd_model, flag, "edit" if flag == "cond_stage_key" else True)
    with pytest.raises(ValueError, match=message):
        guided({"sampler_name": "Euler", "steps": 6})


def test_ui_returns_the_fixed_argument_layout():
    from ldg_core.ui_args import ARG_COUNT, default_args
    script = h.SCRIPT_MODULE.LatentDiffusionGuidanceScript()
    assert script.title() == "Latent Diffusion Guidance"
    assert script.show(False) is h.scripts.AlwaysVisible
    for is_img2img in (False, True):
        components = script.ui(is_img2img)
        assert len(components) == ARG_COUNT
        assert [c.value for c in components] == default_args()


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_refiner_switch_mid_sampling_reencodes_the_concepts(sampler):
    base = shared.sd_model
    refiner = TinySD(seed=1, name="refiner")
    p_kwargs = {"sampler_name": sampler, "steps": 8, "refiner_model": refiner,
                "refiner_switch_at": 0.5}
    ours = guided(p_kwargs)[1]
    shared.sd_model = base
    expected = referenced(p_kwargs)
    shared.sd_model = base
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_concepts_of_different_lengths_under_a_long_prompt():
    prompt = " ".join(f"w{i}" for i in range(160))  # three chunks
    concepts = [{"prompt": "smiling", "scale": 30.0, "warmup": 0},
                {"prompt": " ".join(f"c{i}" for i in range(80)), "scale": 30.0, "warmup": 0}]
    assert_guided_as_reference({"sampler_name": "Euler", "steps": 6, "prompt": prompt}, concepts)


def test_interrupting_a_generation_removes_the_callbacks():
    # Interrupt / Skip: the sampler returns early and the WebUI goes on to the next batch.
    original, calls = shared.sd_model.apply_model, []

    def interrupting(*args, **kwargs):
        calls.append(1)
        shared.state.interrupted = len(calls) >= 3
        return original(*args, **kwargs)

    shared.sd_model.apply_model = interrupting
    try:
        guided({"sampler_name": "Euler", "steps": 6, "n_iter": 2})
    finally:
        shared.state.interrupted = False
    assert script_callbacks.registered_count() == 0


def test_rows_are_added_only_for_concepts_that_can_act():
    concepts = [{"prompt": "smiling", "warmup": 2, "cooldown": 5},
                {"prompt": "glasses", "warmup": 4}]
    spy = RowSpy()
    h.generate({"sampler_name": "Euler", "steps": 8}, h.script_args(concepts, momentum_scale=0.0),
               extra_scripts=[(spy, [])])
    # 1 prompt row + 1 uncond row, + smiling at steps 2-4, + glasses from step 4.
    assert [rows for _, rows, _ in spy.calls] == [2, 2, 3, 3, 4, 3, 3, 3]


def test_concept_conditioning_is_encoded_once_for_all_batches():
    model, encoded = shared.sd_model, []
    original = model.get_learned_conditioning
    model.get_learned_conditioning = lambda texts: encoded.append(list(texts)) or original(texts)
    guided({"sampler_name": "Euler", "steps": 4, "n_iter": 3})
    concept_encodings = [t for t in encoded if "smiling woman" in t]
    assert concept_encodings == [["smiling woman"]]


def test_an_unexpected_failure_while_setting_up_stops_the_generation():
    model = shared.sd_model
    original = model.get_learned_conditioning

    def encode(texts):
        if "boom" in texts:
            raise RuntimeError("text encoder failed")
        return original(texts)

    model.get_learned_conditioning = encode
    with pytest.raises(ValueError, match=r"could not set up guidance: RuntimeError\('text encoder failed'\)"):
        guided({"sampler_name": "Euler", "steps": 4}, [{"prompt": "boom"}])


class AnnouncingNeighbour:
    """Stands for an extension that reads the CFG rows and says so in the image parameters,
    as Dynamic Thresholding (process_batch) and Regional Prompter (process) do."""
    def __init__(self, key):
        self.key = key

    def process(self, p, *args):
        p.extra_generation_params[self.key] = True


@pytest.mark.parametrize("key", ["Dynamic thresholding enabled", "RP Active"])
def test_neighbours_that_read_the_rows_get_a_separate_call(key):
    p_kwargs = {"sampler_name": "Euler", "steps": 6}
    spy = RowSpy()
    p, ours = h.generate(p_kwargs, h.script_args(CONCEPTS),
                         extra_scripts=[(AnnouncingNeighbour(key), []), (spy, [])])
    assert all(rows == 2 for _, rows, _ in spy.calls)
    assert p.extra_generation_params["Latent Diffusion Guidance rows"] == "separate call"
    torch.testing.assert_close(ours, guided(p_kwargs)[1], rtol=1e-5, atol=1e-5)


class ControlNetMarks:
    """A double of ControlNet's prompt marking (sd-webui-controlnet scripts/hook.py L22-112):
    it wraps p.sample to prepend a +1024 token to every prompt conditioning and -1024 to every
    negative one, and its UNet hook strips that token, noting each row's mark. Its script
    arguments hold one unit with the preprocessor `module`."""
    def __init__(self, enabled=True, module="canny"):
        self.row_marks = []  # per model call: the mark of each row
        self.enabled, self.module = enabled, module

    def title(self):
        return "ControlNet"

    @staticmethod
    def _mark(conditioning, value):
        from modules.prompt_parser import ScheduledPromptConditioning
        schedules = ([row.schedules for rows in conditioning.batch for row in rows]
                     if hasattr(conditioning, "batch") else conditioning)
        for schedule in schedules:
            for i, entry in enumerate(schedule):
                if entry.cond.shape[0] % 77 == 1:
                    continue  # already marked
                mark = torch.zeros_like(entry.cond[:1]) + value
                schedule[i] = ScheduledPromptConditioning(entry.end_at_step, torch.cat([mark, entry.cond]))

    def process(self, p, *args):
        self.args_from, self.args_to = 0, 1
        p.script_args = [{"enabled": self.enabled, "model": "control_canny", "input_mode": "simple",
                          "module": self.module}]
        sample = p.sample

        def process_sample(*a, **kw):
            self._mark(kw["conditioning"], 1024.0)
            self._mark(kw["unconditional_conditioning"], -1024.0)
            return sample(*a, **kw)
        p.sample = process_sample
        model = self.model = shared.sd_model
        self.apply_model = model.apply_model

        def apply_model(x, t, cond):
            context = cond["c_crossattn"][0]
            if context.shape[1] % 77 == 1:
                self.row_marks.append(context[:, 0, 0].tolist())
                cond = {**cond, "c_crossattn": [context[:, 1:]]}
                # It drops the WebUI's cond caches, whose entries it marked (hook.py L109-110).
                from modules.processing import Processing
                Processing.cached_c, Processing.cached_uc = [None, None], [None, None]
            return self.apply_model(x, t, cond)
        model.apply_model = apply_model

    def postprocess(self, p, processed, *args):
        self.restore()

    def restore(self):
        """Unhooks the model: postprocess, or the start of ControlNet's next generation
        (controlnet.py L860-862) when this one failed."""
        self.model.apply_model = self.apply_model


def test_controlnet_marks_concept_rows_as_uncond_and_rows_stay_constant():
    p_kwargs = {"sampler_name": "Euler", "steps": 6, "batch_size": 2}
    marks = ControlNetMarks()
    p, ours = h.generate(p_kwargs, h.script_args(CONCEPTS), extra_scripts=[(marks, [])])
    # Every call: 2 prompt rows, 2 x 2 concept rows (all concepts, also where one is not
    # needed: ControlNet caches per-row state at the first call's row count), 2 uncond rows.
    assert [len(m) for m in marks.row_marks] == [8] * 6
    assert all(m == [1024.0] * 2 + [-1024.0] * 6 for m in marks.row_marks)
    reference = ReferenceGuidance(config_of(CONCEPTS))
    expected = h.generate(p_kwargs, None, extra_scripts=[(ControlNetMarks(), []), (reference, [])])[1]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


LONG_CONCEPT = {"prompt": " ".join(f"w{i}" for i in range(80)), "scale": 30.0, "warmup": 1}


@pytest.mark.parametrize("module", ["reference_only", "reference_adain+attn", "inpaint_only+lama",
                                    "tile_colorfix+sharp"])
@pytest.mark.parametrize("neighbour, concepts, remedy", [
    (AnnouncingNeighbour("Dynamic thresholding enabled"), CONCEPTS,
     "^Latent Diffusion Guidance: Dynamic Thresholding reads .*: turn that extension off"),
    (None, [LONG_CONCEPT],
     "^Latent Diffusion Guidance: concept 1 is longer .*: shorten the concept"),
])
def test_controlnet_modes_that_cannot_follow_a_separate_call_are_refused(neighbour, concepts,
                                                                         remedy, module):
    scripts = [(ControlNetMarks(module=module), [])] + ([(neighbour, [])] if neighbour else [])
    calls = []
    original = shared.sd_model.apply_model
    shared.sd_model.apply_model = lambda *a, **k: calls.append(1) or original(*a, **k)
    with pytest.raises(ValueError, match=remedy + ".*") as refused:
        h.generate({"sampler_name": "Euler", "steps": 4}, h.script_args(concepts),
                   extra_scripts=scripts)
    assert f"ControlNet unit 1 ({module}) cannot follow" in str(refused.value)
    assert calls == []


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
@pytest.mark.parametrize("module", ["canny", "depth_midas", "ip-adapter_clip_sd15",
                                    "inpaint_global_harmonious", None])
def test_controlnet_modes_that_follow_get_long_concepts_in_a_separate_call(sampler, module):
    p_kwargs = {"sampler_name": sampler, "steps": 6, "batch_size": 2}
    concepts = [LONG_CONCEPT, CONCEPTS[0]]
    marks = ControlNetMarks(module=module)
    p, ours = h.generate(p_kwargs, h.script_args(concepts), extra_scripts=[(marks, [])])
    assert p.extra_generation_params["Latent Diffusion Guidance rows"] == "separate call"
    # The WebUI's calls keep their 2 prompt + 2 negative rows; concept rows come in calls of
    # their own, every row with the negative mark, long or short.
    assert [m for m in marks.row_marks if len(m) == 4] == [[1024.0] * 2 + [-1024.0] * 2] * 6
    concept_calls = [m for m in marks.row_marks if len(m) != 4]
    assert concept_calls and all(set(m) == {-1024.0} for m in concept_calls)
    reference = ReferenceGuidance(config_of(concepts))
    expected = h.generate(p_kwargs, None, extra_scripts=[(ControlNetMarks(), []), (reference, [])])[1]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ours, unguided(p_kwargs))


class AdetailerLikePass:
    """Like ADetailer: after the main image, an inner pass runs with a copy of p while our
    callbacks may still be registered, and calls the scripts' postprocess again."""
    def postprocess(self, p, processed, *args):
        import copy
        from modules import sd_samplers
        inner = copy.copy(p)
        inner.sampler = sd_samplers.create_sampler(p.sampler_name, shared.sd_model)
        inner.init_latent, inner.is_img2img = processed, True
        generation_script = h.SCRIPT_MODULE.LatentDiffusionGuidanceScript()
        generation_script.postprocess(inner, processed)  # ours, run again: harmless
        generation_script.postprocess(p, processed)
        self.registered_during_inner_pass = script_callbacks.registered_count()
        self.spy = RowSpy()
        self.spy.process_before_every_sampling(inner)
        inner.setup_conds()
        inner.seeds = p.seeds
        inner._sample_img2img(inner.c, inner.uc)
        self.spy.postprocess(inner, None)


def test_an_inner_pass_with_a_copy_of_p_is_left_alone():
    # Our callbacks go when sampling ends, so ADetailer's later passes never meet them; the
    # owner check (test_a_pass_of_another_processing_object_is_left_alone) guards the rest.
    inner_pass = AdetailerLikePass()
    p, _ = h.generate({"sampler_name": "Euler", "steps": 4}, h.script_args(CONCEPTS),
                      extra_scripts=[(inner_pass, [])])
    assert inner_pass.registered_during_inner_pass == 0
    assert inner_pass.spy.calls and all(rows == 2 for _, rows, _ in inner_pass.spy.calls)


class ControlNetUnits:
    """Stands for the ControlNet script's place in p.script_args (its units, as objects or
    API dicts; internal_controlnet/args.py and external_code.py L126-160, L398-416)."""
    def __init__(self, units):
        self.units = units

    def title(self):
        return "ControlNet"

    def process(self, p, *args):
        self.args_from, self.args_to = 5, 5 + len(self.units)
        p.script_args = [None] * 5 + list(self.units)


@pytest.mark.parametrize("unit, message", [
    ({"enabled": True, "animatediff_batch": True}, "unit 2 uses an AnimateDiff batch"),
    ({"enabled": True, "model": "v3_sd15_sparsectrl_rgb [abcd]"}, "unit 2 uses a SparseCtrl model"),
    (SimpleNamespace(enabled=True, input_mode=SimpleNamespace(value="merge"), model="canny"),
     "unit 2 uses merged multiple inputs"),
    ({"enabled": False, "animatediff_batch": True}, None),
    ({"enabled": True, "input_mode": "simple", "model": "control_canny"}, None),
])
def test_controlnet_units_that_assume_two_rows_per_image_are_refused(unit, message):
    units = ControlNetUnits([{"enabled": False}, unit])
    if message is None:
        p, ours = h.generate({"sampler_name": "Euler", "steps": 4}, h.script_args(CONCEPTS),
                             extra_scripts=[(units, [])])
        assert not torch.equal(ours, unguided({"sampler_name": "Euler", "steps": 4}))
        return
    with pytest.raises(ValueError, match=message):
        h.generate({"sampler_name": "Euler", "steps": 4}, h.script_args(CONCEPTS),
                   extra_scripts=[(units, [])])


class PagLikeNeighbour:
    """Like Incantations' PAG (scripts/pag.py L211-298, L423-507): registers its callbacks when
    the batch starts, clones the call's rows in on_cfg_denoiser, and in on_cfg_denoised runs
    the inner model on [text_cond, text_cond] against those x rows."""
    def __init__(self):
        self.row_counts = []

    def process(self, p, *args):
        script_callbacks.on_cfg_denoiser(self.denoiser, name="pag")
        script_callbacks.on_cfg_denoised(self.denoised, name="pag")

    def denoiser(self, params):
        self.saved = (params.x.clone(), params.sigma.clone(), params.image_cond.clone(),
                      params.text_cond.clone())

    def denoised(self, params):
        x, sigma, image_cond, text_cond = self.saved
        cond = torch.cat([text_cond, text_cond])
        assert cond.shape[0] == x.shape[0], "PAG saw rows it cannot pair"
        self.row_counts.append(x.shape[0])
        params.inner_model(x, sigma, cond={"c_crossattn": [cond], "c_concat": [image_cond]})

    def postprocess(self, p, processed, *args):
        for fn in (self.denoiser, self.denoised):
            script_callbacks.remove_callbacks_for_function(fn)


def test_incantations_pag_registers_first_and_never_sees_concept_rows():
    pag = PagLikeNeighbour()
    h.generate({"sampler_name": "Euler", "steps": 4}, h.script_args(CONCEPTS),
               extra_scripts=[(pag, [])])
    assert pag.row_counts == [2] * 4


class DynamicThresholdingRows:
    """Like Dynamic Thresholding (scripts/dynamic_thresholding.py process_batch and
    CustomCFGDenoiser.combine_denoised): announces itself in the image parameters and feeds
    every row but the uncond ones into its own CFG, here their mean per image."""
    def process(self, p, *args):
        p.extra_generation_params["Dynamic thresholding enabled"] = True
        self.p = p

    def process_before_every_sampling(self, p, *args, **kwargs):
        def combine_denoised(x_out, conds_list, uncond, cond_scale):
            b = uncond.shape[0]
            conds = x_out[:-b].view(-1, b, *x_out.shape[1:]).mean(0)
            return x_out[-b:] + cond_scale * (conds - x_out[-b:])
        p.sampler.model_wrap_cfg.combine_denoised = combine_denoised


def test_dynamic_thresholding_reads_only_its_own_rows():
    p_kwargs = {"sampler_name": "Euler", "steps": 6}
    ours = h.generate(p_kwargs, h.script_args(CONCEPTS),
                      extra_scripts=[(DynamicThresholdingRows(), [])])[1]
    reference = ReferenceGuidance(config_of(CONCEPTS))
    expected = h.generate(p_kwargs, None, extra_scripts=[(DynamicThresholdingRows(), []),
                                                        (reference, [])])[1]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


class RegionalPrompterRows:
    """Like Regional Prompter's latent mode (latent.py L176-198, L242): announces itself and
    splits a call's rows by position into x.shape[0] // batch - 1 areas per image."""
    def process(self, p, *args):
        p.extra_generation_params["RP Active"] = True
        self.areas = []
        script_callbacks.on_cfg_denoised(self.denoised, name="rp")

    def denoised(self, params):
        rows = params.x.shape[0]
        self.areas.append(rows // self.batch - 1)

    def process_before_every_sampling(self, p, *args, **kwargs):
        self.batch = p.batch_size

    def postprocess(self, p, processed, *args):
        script_callbacks.remove_callbacks_for_function(self.denoised)


def test_regional_prompter_sees_only_its_own_areas():
    rp = RegionalPrompterRows()
    p_kwargs = {"sampler_name": "Euler", "steps": 4, "batch_size": 2,
                "prompt": "a cat AND a dog"}  # two areas per image
    h.generate(p_kwargs, h.script_args(CONCEPTS), extra_scripts=[(rp, [])])
    assert rp.areas == [2] * 4


def test_stale_controlnet_marks_without_an_enabled_unit_do_not_refuse():
    # ControlNet marks the cached prompt conds in place; the marks outlive its generation.
    p_kwargs = {"sampler_name": "Euler", "steps": 4}
    p, _ = h.generate(p_kwargs, h.script_args(CONCEPTS),
                      extra_scripts=[(ControlNetMarks(enabled=False), []),
                                     (AnnouncingNeighbour("Dynamic thresholding enabled"), [])])
    assert p.extra_generation_params["Latent Diffusion Guidance rows"] == "separate call"


def test_a_refusal_next_to_controlnet_leaves_nothing_behind():
    # The real WebUI showed it: the refused request's marks reached the next plain image.
    plain = {"sampler_name": "Euler", "steps": 4, "prompt": "a red house"}
    before = unguided(plain)
    controlnet = ControlNetMarks(module="reference_only")
    with pytest.raises(ValueError, match="which ControlNet unit 1 .reference_only. cannot follow"):
        h.generate(plain, h.script_args(CONCEPTS),
                   extra_scripts=[(controlnet, []),
                                  (AnnouncingNeighbour("Dynamic thresholding enabled"), [])])
    controlnet.restore()
    assert torch.equal(unguided(plain), before)
