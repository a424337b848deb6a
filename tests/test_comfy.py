"""The ComfyUI nodes on the ComfyUI double (tests/comfy_double), with real k-diffusion samplers:
no concept is bit-identical to ComfyUI's own guider; the guider and the model patch equal an
independent reference (each concept evaluated alone with the negative's inputs,
SemanticGuidance applied directly, the step from the sampler's reports); the calls, the
refusals and the messages."""
import json
import os

import pytest
import torch

from tests import comfy_harness as ch
from tests.webui_double.model import TinySD
import comfy.model_sampling
import comfy.samplers

NODES, CORE = ch.NODES, ch.CORE
SemanticGuidance = __import__(CORE.__name__ + ".guidance", fromlist=["x"]).SemanticGuidance
SafetyGuidance = __import__(CORE.__name__ + ".safety", fromlist=["x"]).SafetyGuidance
comfy_core = __import__(CORE.__name__ + ".comfy", fromlist=["x"])
SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_sde", "lms", "ddim"]
TWO_CALLS = {"heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"}
CONCEPTS = [dict(text="smiling woman", direction="add", scale=8.0, threshold=0.8, warmup=1,
                 cooldown=-1, weight=1.0),
            dict(text="glasses", direction="remove", scale=6.0, threshold=0.7, warmup=0,
                 cooldown=4, weight=1.0)]


@pytest.fixture(params=["sd15", "sdxl", "v"])
def setup(request):
    sd = TinySD(sdxl=request.param == "sdxl", v_prediction=request.param == "v")
    model = ch.Model(sd, family="SDXL" if sd.is_sdxl else "SD15")
    return comfy.model_patcher.ModelPatcher(model), ch.Clip(sd)


def encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def concepts_of(clip, concepts=CONCEPTS):
    chain = ()
    for concept in concepts:
        (chain,) = NODES.LDGConcept().add(clip, concepts=chain, **concept)
    return chain


class Reference:
    """A post-CFG function of its own on a plain model: each concept alone, evaluated with the
    model and the negative's control, SemanticGuidance (and SafetyGuidance) applied directly;
    the step from the sampler's reports (k-diffusion reports a step after its first call)."""

    def __init__(self, clip, sampler, concepts=CONCEPTS, momentum=(0.1, 0.4), safety=None,
                 control=None, cfg=5.0, options=None):
        self.texts = [encode(clip, c["text"])[0] for c in concepts]
        self.engine = SemanticGuidance(CORE.GuidanceConfig(
            [CORE.Concept(c["text"], scale=c["scale"], threshold=c["threshold"],
                          warmup=c["warmup"], cooldown=None if c["cooldown"] < 0 else c["cooldown"],
                          weight=c["weight"], reverse=c["direction"] == "remove")
             for c in concepts], *momentum))
        self.safety = None if safety is None else (SafetyGuidance(safety),
                                                   encode(clip, safety.concept)[0])
        self.two_calls, self.control, self.cfg = sampler in TWO_CALLS, control, cfg
        self.options = options  # transformer options the negative is evaluated with
        self.reports, self.reports_at_last_call, self.calls = 0, 0, 0

    def callback(self, i, denoised, x, total):
        self.reports = i + 1

    def index(self):
        second = self.two_calls and self.calls and self.reports > self.reports_at_last_call
        self.reports_at_last_call, self.calls = self.reports, self.calls + 1
        return self.reports - (1 if second else 0)

    def estimate(self, model, x, sigma, text):
        tensor, extra = text
        pooled = extra.get("pooled_output")
        options = None if self.options is None else dict(self.options, cond_or_uncond=[1])
        return model.apply_model(x, sigma, c_crossattn=tensor.expand(x.shape[0], -1, -1),
                                 y=None if pooled is None else pooled.expand(x.shape[0], -1),
                                 control=self.control, transformer_options=options)

    def post_cfg(self, args):
        x, sigma, model = args["input"], args["sigma"], args["model"]
        index = self.index()
        s = sigma.view(-1, 1, 1, 1)
        eps = lambda x0: (x - x0) / s  # noqa: E731
        uncond, cond = eps(args["uncond_denoised"]), eps(args["cond_denoised"])
        estimates = torch.stack([eps(self.estimate(model, x, sigma, t)) for t in self.texts])
        edit = self.engine.step(step=index, uncond=uncond, cond=cond, concepts=estimates)
        if self.safety is not None:
            engine, text = self.safety
            edit = edit + engine.step(step=index, uncond=uncond, cond=cond,
                                      safety=eps(self.estimate(model, x, sigma, text)),
                                      guidance_scale=self.cfg)
        return args["denoised"] - s * edit

    def sample(self, patcher, positive, negative, sampler, **kwargs):
        plain = patcher.clone()
        plain.set_model_sampler_post_cfg_function(self.post_cfg)
        return ch.ksample(plain, positive, negative, sampler, callback=self.callback, **kwargs)


def prompts(clip):
    return encode(clip, "a portrait of a woman"), encode(clip, "blurry")


def guided_by_guider(patcher, clip, sampler, concepts=CONCEPTS, cfg=5.0, safety=None, **kwargs):
    positive, negative = prompts(clip)
    (guider,) = NODES.LDGGuider().get_guider(patcher, positive, negative, cfg,
                                              concepts_of(clip, concepts), 0.1, 0.4, safety)
    return ch.ksample(patcher, positive, negative, sampler, cfg=cfg, guider=guider, **kwargs)


def guided_by_patch(patcher, clip, sampler, concepts=CONCEPTS, cfg=5.0, safety=None, **kwargs):
    positive, negative = prompts(clip)
    (patched,) = NODES.LDGModelPatch().patch(patcher, concepts_of(clip, concepts), 0.1, 0.4,
                                             safety)
    return ch.ksample(patched, positive, negative, sampler, cfg=cfg, **kwargs)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("path", [guided_by_guider, guided_by_patch], ids=["guider", "patch"])
def test_guided_equals_the_reference(path, sampler, setup):
    patcher, clip = setup
    positive, negative = prompts(clip)
    ours = path(patcher, clip, sampler, batch=2)
    expected = Reference(clip, sampler).sample(patcher, positive, negative, sampler, batch=2)
    plain = ch.ksample(patcher, positive, negative, sampler, batch=2)
    assert (ours - plain).abs().max() > 1e-2, "guidance had no visible effect"
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", [guided_by_guider, guided_by_patch], ids=["guider", "patch"])
def test_a_scale_of_zero_is_comfyuis_own_image_bit_for_bit(path):
    sd = TinySD()
    patcher, clip = comfy.model_patcher.ModelPatcher(ch.Model(sd)), ch.Clip(sd)
    positive, negative = prompts(clip)
    for sampler in ["euler", "heun"]:
        plain = ch.ksample(patcher, positive, negative, sampler)
        zero = [dict(c, scale=0.0) for c in CONCEPTS]
        assert torch.equal(path(patcher, clip, sampler, concepts=zero), plain)
        assert torch.equal(path(patcher, clip, sampler, concepts=[]), plain)


def test_the_guider_evaluates_prompt_negative_and_needed_concepts_in_one_call():
    sd = TinySD()
    model = ch.Model(sd)
    patcher, clip = comfy.model_patcher.ModelPatcher(model), ch.Clip(sd)
    guided_by_guider(patcher, clip, "euler", steps=6)
    # Lists: 0 positive, 1 negative, 2 and 3 the concepts. The first acts from step 1 (its
    # momentum builds from step 0), the second until its cooldown at step 4: after that it is
    # not evaluated.
    assert [sorted(call) for call in model.calls] == [[0, 1, 2, 3]] * 4 + [[0, 1, 2]] * 2
    model.calls.clear()
    guided_by_patch(patcher, clip, "euler", steps=6)
    # The patch: ComfyUI's own call, then one call for the needed concepts (lists 0 and 1 of
    # its calc_cond_batch).
    assert [sorted(call) for call in model.calls] == [[0, 1], [0, 1]] * 4 + [[0, 1], [0]] * 2


def test_concepts_see_the_negatives_control():
    # A ControlNet stand-in on both prompts (as ControlNetApplyAdvanced sets it): concept
    # estimates must be made with it, so that control cancels in their direction.
    sd = TinySD()
    patcher, clip = comfy.model_patcher.ModelPatcher(ch.Model(sd)), ch.Clip(sd)
    control = 0.3 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    positive, negative = prompts(clip)
    positive = [[t, dict(e, control=control)] for t, e in positive]
    negative = [[t, dict(e, control=control)] for t, e in negative]
    expected = Reference(clip, "euler", control=control).sample(patcher, positive, negative, "euler")
    for make in (NODES.LDGGuider().get_guider, None):
        if make:
            (guider,) = make(patcher, positive, negative, 5.0, concepts_of(clip), 0.1, 0.4)
            ours = ch.ksample(patcher, positive, negative, "euler", guider=guider)
        else:
            (patched,) = NODES.LDGModelPatch().patch(patcher, concepts_of(clip), 0.1, 0.4)
            ours = ch.ksample(patched, positive, negative, "euler")
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", [guided_by_guider, guided_by_patch], ids=["guider", "patch"])
def test_concepts_get_the_negatives_image_from_attention_patches_that_read_positions(path):
    # IP-Adapter's attention patch takes (cond, uncond)[i] for each list position i of the
    # call: a concept must sit in the negative's place (1), as its estimate is the negative's.
    sd = TinySD()
    patcher, clip = comfy.model_patcher.ModelPatcher(ch.Model(sd)), ch.Clip(sd)
    generator = torch.Generator().manual_seed(11)
    images = tuple(0.3 * torch.randn(1, 4, 8, 8, generator=generator) for _ in range(2))
    patcher.model_options["transformer_options"]["patches_replace"] = {
        "attn2": {"ip_adapter": images}}
    positive, negative = prompts(clip)
    expected = Reference(clip, "euler", options=patcher.model_options["transformer_options"]
                         ).sample(patcher, positive, negative, "euler")
    plain = ch.ksample(patcher, positive, negative, "euler")
    ours = path(patcher, clip, "euler")
    assert (ours - plain).abs().max() > 1e-2
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", [guided_by_guider, guided_by_patch], ids=["guider", "patch"])
def test_safe_latent_diffusion_with_concepts_equals_the_reference(path):
    sd = TinySD()
    patcher, clip = comfy.model_patcher.ModelPatcher(ch.Model(sd)), ch.Clip(sd)
    (safety,) = NODES.LDGSafety().configure(clip, "custom", "glasses", 60.0, 0.05, 2, 0.3, 0.4)
    positive, negative = prompts(clip)
    ours = path(patcher, clip, "heun", safety=safety)
    expected = Reference(clip, "heun", safety=safety[0]).sample(patcher, positive, negative, "heun")
    without = path(patcher, clip, "heun")
    assert (ours - without).abs().max() > 1e-3
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_flow_models_are_refused_naming_their_family():
    sd = TinySD()
    model = ch.Model(sd, family="Flux", prediction=comfy.model_sampling.CONST)
    patcher, clip = comfy.model_patcher.ModelPatcher(model), ch.Clip(sd)
    for node in (lambda: NODES.LDGModelPatch().patch(patcher, concepts_of(clip), 0.1, 0.4),
                 lambda: NODES.LDGGuider().get_guider(patcher, *prompts(clip), 5.0,
                                                      concepts_of(clip), 0.1, 0.4)):
        with pytest.raises(ValueError, match=r"this model \(Flux, CONST prediction\) is not an eps "
                                             "or v-prediction UNet"):
            node()


@pytest.mark.parametrize("sampler, why", [
    ("dpm_fast", "it picks its own evaluation points"), ("heunpp2", "calls per step change")])
@pytest.mark.parametrize("path", [guided_by_guider, guided_by_patch], ids=["guider", "patch"])
def test_samplers_that_cannot_be_clocked_are_refused_before_any_model_call(path, sampler, why,
                                                                          monkeypatch):
    import k_diffusion.sampling

    def sample_heunpp2(*args, **kwargs):  # ComfyUI's own; not in k-diffusion 0.1.1
        raise AssertionError("never run")
    monkeypatch.setattr(k_diffusion.sampling, "sample_heunpp2", sample_heunpp2, raising=False)
    sd = TinySD()
    model = ch.Model(sd)
    patcher, clip = comfy.model_patcher.ModelPatcher(model), ch.Clip(sd)
    with pytest.raises(ValueError, match=f"the sampler '{sampler}' is not supported: .*"):
        path(patcher, clip, sampler)
    assert model.calls == []


@pytest.mark.parametrize("path", [guided_by_guider, guided_by_patch], ids=["guider", "patch"])
def test_a_sampler_off_its_schedule_stops_once_with_a_message(path, monkeypatch):
    import k_diffusion.sampling

    def sample_midpoints(model, x, sigmas, extra_args=None, callback=None, disable=None):
        for i in range(len(sigmas) - 1):  # one call halfway between the schedule's points
            mid = (sigmas[i] + sigmas[i + 1]) / 2
            x = model(x, mid * x.new_ones([x.shape[0]]), **extra_args)
        return x
    monkeypatch.setattr(k_diffusion.sampling, "sample_midpoints", sample_midpoints, raising=False)
    sd = TinySD()
    patcher, clip = comfy.model_patcher.ModelPatcher(ch.Model(sd)), ch.Clip(sd)
    with pytest.raises(ValueError, match="Latent Diffusion Guidance: the sampler evaluated the "
                                         "model at sigma .* where step 0 of its schedule is at"):
        path(patcher, clip, "midpoints")


@pytest.mark.parametrize("field, value, message", [
    ("threshold", 2.0, r"concept 1 \('smiling woman'\): threshold must be a number in \[0, 1\]"),
    ("text", "  ", r"concept 1 \(''\): prompt must be a non-empty string"),
    ("scale", float("nan"), r"concept 1 \('smiling woman'\): scale must be a finite number"),
])
def test_bad_concept_inputs_are_named(field, value, message):
    clip = ch.Clip(TinySD())
    with pytest.raises(ValueError, match=message):
        NODES.LDGConcept().add(clip, **dict(CONCEPTS[0], **{field: value}))


def test_the_concept_list_has_the_engines_limit_and_safety_bad_values_are_named():
    clip = ch.Clip(TinySD())
    chain = concepts_of(clip, [CONCEPTS[1]] * CORE.MAX_CONCEPTS)
    with pytest.raises(ValueError, match=f"at most {CORE.MAX_CONCEPTS} concepts"):
        NODES.LDGConcept().add(clip, concepts=chain, **CONCEPTS[0])
    with pytest.raises(ValueError, match="Safe Latent Diffusion: .*warmup"):
        NODES.LDGSafety().configure(clip, "custom", "x", 60.0, 0.05, -1, 0.3, 0.4)
    (safety,) = NODES.LDGSafety().configure(clip, "strong", "weapons", 1.0, 0.0, 0, 0.0, 0.0)
    assert safety[0] == CORE.SafetyConfig.preset("strong", concept="weapons")


def test_presets_load_their_concepts_and_momentum():
    clip = ch.Clip(TinySD())
    name = "Style transfer"
    concepts, scale, beta = NODES.LDGPreset().load(clip, name)
    preset = __import__(CORE.__name__ + ".presets", fromlist=["x"]).BUILTIN_PRESETS[name]
    assert [c for c, _ in concepts] == list(preset.config.concepts)
    assert (scale, beta) == (preset.config.momentum_scale, preset.config.momentum_beta)


def test_every_node_input_has_a_tooltip_and_the_pack_loads_as_comfyui_loads_it():
    assert set(ch.PACK.NODE_CLASS_MAPPINGS) == {"LDGConcept", "LDGPreset", "LDGSafety",
                                                "LDGGuider", "LDGModelPatch"}
    for name, node in ch.PACK.NODE_CLASS_MAPPINGS.items():
        inputs = node.INPUT_TYPES()
        for group in inputs.values():
            for key, spec in group.items():
                assert spec[1].get("tooltip"), (name, key)
        assert node.DESCRIPTION and node.CATEGORY == NODES.CATEGORY
        assert name in ch.PACK.NODE_DISPLAY_NAME_MAPPINGS


def test_the_clock_follows_every_samplers_calls_measured_in_the_real_comfyui():
    # tests/data/comfy_calls.json: every KSampler sampler of the real ComfyUI, 6 steps, the
    # sigma of each model evaluation and the step reports. The step our clock gives each call
    # must be the step k-diffusion reported it in; refused samplers are the ones whose calls
    # cannot be placed.
    data = json.load(open(os.path.join(os.path.dirname(__file__), "data", "comfy_calls.json")))
    for name, run in data["samplers"].items():
        function = "dpm_fast_function" if name == "dpm_fast" else (
            "sample_euler" if name == "ddim" else f"sample_{name}")
        sampler = type("KSAMPLER", (), {"sampler_function": type(function, (), {"__name__": function})})
        if name in ("dpm_fast", "heunpp2"):
            with pytest.raises(ValueError, match="is not supported"):
                comfy_core.ComfyPass(CORE.GuidanceConfig(), sampler=sampler, sigmas=torch.tensor(run["sigmas"]))
            continue
        ldg_pass = comfy_core.ComfyPass(CORE.GuidanceConfig(), sampler=sampler,
                                        sigmas=torch.tensor(run["sigmas"]))
        steps = [ldg_pass.plan(torch.tensor([s]), 5.0).index for s in run["call_sigmas"]]
        per = len(run["call_sigmas"]) // (len(run["sigmas"]) - 1) + 1 if len(run["call_sigmas"]) > len(run["sigmas"]) - 1 else 1
        assert steps == sorted(steps) and steps[-1] == len(run["sigmas"]) - 2, name
        assert [steps.count(i) for i in range(len(run["sigmas"]) - 1)] == \
            [per] * (len(run["sigmas"]) - 2) + [1], name


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral",
                                  "lms", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m"])
def test_the_doubles_samplers_make_the_calls_measured_in_the_real_comfyui(name):
    data = json.load(open(os.path.join(os.path.dirname(__file__), "data", "comfy_calls.json")))
    run = data["samplers"][name]
    sd = TinySD()
    patcher = comfy.model_patcher.ModelPatcher(ch.Model(sd))
    seen = []
    patcher.set_model_sampler_post_cfg_function(
        lambda args: seen.append(float(args["sigma"][0])) or args["denoised"])
    clip = ch.Clip(sd)
    noise = torch.zeros(1, 4, 8, 8)
    schedule = torch.tensor(run["sigmas"])
    comfy.samplers.sample(patcher, noise, *prompts(clip), 5.0, comfy.samplers.sampler_object(name),
                          schedule, latent_image=noise)
    assert len(seen) == len(run["call_sigmas"])
    on_schedule = [any(abs(s - p) < 1e-4 * p for p in run["sigmas"]) for s in seen]
    assert on_schedule == [any(abs(s - p) < 1e-4 * p for p in run["sigmas"]) for s in run["call_sigmas"]]


COMFY_NODES = {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler",
               "VAEDecode", "SaveImage", "SamplerCustomAdvanced", "RandomNoise",
               "KSamplerSelect", "BasicScheduler"}  # ComfyUI's own, used by the examples


def _widget_inputs(node_class):
    """The inputs ComfyUI shows as widgets (not sockets), in order: lists and plain types."""
    inputs = node_class.INPUT_TYPES()
    return [name for group in ("required", "optional") for name, spec in inputs.get(group, {}).items()
            if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")]


@pytest.mark.parametrize("name", ["ldg_ksampler_patch.json", "ldg_guider.json"])
def test_the_example_workflows_are_valid_and_their_ldg_nodes_run(name):
    path = os.path.join(ch.ROOT, "example_workflows", name)
    workflow = json.load(open(path))
    nodes = {node["id"]: node for node in workflow["nodes"]}
    ours = ch.PACK.NODE_CLASS_MAPPINGS
    assert all(n["type"] in ours or n["type"] in COMFY_NODES for n in nodes.values())
    for link_id, source, slot, target, target_slot, kind in workflow["links"]:
        out = nodes[source]["outputs"][slot]
        assert link_id in out["links"] and out["type"] == kind
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        if nodes[source]["type"] in ours:
            assert ours[nodes[source]["type"]].RETURN_TYPES[slot] == kind
    clip = ch.Clip(TinySD())
    for node in nodes.values():
        node_class = ours.get(node["type"])
        if node_class is None:
            continue
        values = dict(zip(_widget_inputs(node_class), node["widgets_values"]))
        if node["type"] == "LDGConcept":  # the concept's settings pass our validation
            (concepts,) = node_class().add(clip, **values)
            assert concepts[-1][0].prompt == values["text"].strip()
    used = {n["type"] for n in nodes.values()}
    assert {"LDGConcept"} < used and used & {"LDGGuider", "LDGModelPatch"}


def test_concept_conditionings_are_the_negatives_with_the_concepts_text():
    text = comfy_core.ConceptText(torch.ones(1, 77, 8), torch.ones(1, 4))
    control = object()
    negative = [{"cross_attn": torch.zeros(1, 77, 8), "pooled_output": torch.zeros(1, 4),
                 "model_conds": {}, "uuid": "n", "control": control, "area": (8, 8, 0, 0),
                 "strength": 0.5, "start_percent": 0.2}]
    (entry,) = comfy_core.concept_conds(negative, text)
    assert entry["cross_attn"] is text.cross_attn and entry["pooled_output"] is text.pooled_output
    assert entry["control"] is control and entry["area"] == (8, 8, 0, 0)
    assert entry["strength"] == 0.5 and entry["start_percent"] == 0.2
    assert entry["prompt_type"] == "negative" and entry["uuid"] != "n"
    assert negative[0]["cross_attn"].sum() == 0  # the negative is left as it was
