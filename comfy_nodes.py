"""Latent Diffusion Guidance's ComfyUI nodes (the WebUI's entry point is scripts/).

A concept node encodes a concept with ComfyUI's own text encoding and chains it into a list;
the guider (for SamplerCustomAdvanced) evaluates the prompt, the negative and the needed
concepts in one calc_cond_batch per model evaluation; the model patch (for KSampler) does the
same from a post-CFG function, with one extra batched call. Both use ldg_core's engine, its
step rules (ldg_core/comfy.py) and refusals; ComfyUI's pre- and post-CFG hooks still run.
"""

from __future__ import annotations

import contextlib

import comfy.patcher_extension
import comfy.samplers
import torch

from .ldg_core import MAX_CONCEPTS, Concept, GuidanceConfig, SafetyConfig
from .ldg_core.comfy import (CONCEPT_KEY, ComfyPass, concept_conds, concept_text,
                             model_problem, rows_read_by_position)
from .ldg_core.config import (DEFAULT_MOMENTUM_BETA, DEFAULT_MOMENTUM_SCALE, DEFAULT_SCALE,
                              DEFAULT_THRESHOLD, DEFAULT_WARMUP, DEFAULT_WEIGHT)
from .ldg_core.failures import GuidanceError, StopSampling, stop_on_error
from .ldg_core.presets import BUILTIN_PRESETS
from .ldg_core.safety_config import DEFAULT_PRESET, DEFAULT_SAFETY_CONCEPT, PRESETS

CATEGORY = "sampling/latent diffusion guidance"
CONCEPTS = "LDG_CONCEPTS"  # a tuple of (Concept, ConceptText)
SAFETY = "LDG_SAFETY"  # (SafetyConfig, ConceptText)
WRAPPER_KEY = "latent_diffusion_guidance"


# -- checks and pieces shared by the guider and the patch -----------------------------------

def check_model(model) -> None:
    """Refuses models that are not eps or v-prediction UNets, before anything is sampled."""
    sampling = model.get_model_object("model_sampling")
    problem = model_problem([cls.__name__ for cls in type(sampling).__mro__],
                            type(model.model.model_config).__name__)
    if problem:
        raise GuidanceError(problem)


def guidance_config(concepts, momentum_scale, momentum_beta) -> GuidanceConfig:
    return GuidanceConfig([concept for concept, _ in concepts or ()], momentum_scale,
                          momentum_beta)


def texts_of(concepts, safety):
    """The conditioning rows in the engine's order: concepts, then the safety concept."""
    return [text for _, text in concepts or ()] + ([safety[1]] if safety else [])


def add_concept_conds(conds: dict, texts) -> None:
    negative = conds.get("negative")
    if negative is None:
        raise GuidanceError("semantic guidance needs a negative conditioning (concepts are "
                            "directions from it): use a guider with a negative, such as CFGGuider")
    for index, text in enumerate(texts):
        conds[CONCEPT_KEY.format(index)] = concept_conds(negative, text)


@contextlib.contextmanager
def stopping_with_a_message():
    """A failure inside sampling reaches ComfyUI as one error with our message."""
    try:
        yield
    except StopSampling as stop:
        raise GuidanceError(stop.message) from stop.__cause__


def evaluate_concepts(model, lists, x, sigma, model_options, plan):
    """[K, B, C, H, W] x0 of the concept lists: one batched call, or, where attention patches
    read a list's position, one call per concept in the negative's place."""
    with _stopping_at(plan, x, "evaluating the concepts"):
        if rows_read_by_position(model_options):
            return torch.stack([comfy.samplers.calc_cond_batch(
                model, [None, entries], x, sigma, model_options)[1] for entries in lists])
        return torch.stack(comfy.samplers.calc_cond_batch(model, lists, x, sigma, model_options))


def _stopping_at(plan, x, what):
    return stop_on_error(step=plan.index, rows=len(plan.needed) * x.shape[0], what=what)


def with_edit_first(model_options: dict, edit: torch.Tensor) -> dict:
    """The options with a post-CFG function that adds `edit`, ahead of the others, so that they
    see the guided result as the plain one's CFG result."""
    options = dict(model_options)
    options["sampler_post_cfg_function"] = [lambda args: args["denoised"] + edit] + list(
        model_options.get("sampler_post_cfg_function", []))
    return options


# -- the guider ----------------------------------------------------------------------------

class SemanticGuider(comfy.samplers.CFGGuider):
    """CFGGuider (comfy/samplers.py L942-1044) whose predict_noise evaluates the concepts with
    the prompt and the negative in one calc_cond_batch, as Guider_PerpNeg evaluates its empty
    prompt (comfy_extras/nodes_perpneg.py L75-121), then lets ComfyUI's cfg_function combine
    them and run the post-CFG chain, our edit first."""

    def set_guidance(self, positive, negative, config: GuidanceConfig, texts, safety=None):
        self.config, self.safety = config, safety
        self.inner_set_conds({"positive": positive, "negative": negative})
        add_concept_conds(self.original_conds, texts)
        self.ldg_pass = None

    def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
        self.ldg_pass = ComfyPass(self.config, sampler=sampler, sigmas=sigmas,
                                  safety=self.safety, cfg_scale=self.cfg)
        try:
            with stopping_with_a_message():
                return super().sample(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            self.ldg_pass = None

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        plan = self.ldg_pass.plan(timestep, self.cfg)
        conds = [self.conds.get("positive"), self.conds.get("negative")]
        lists = [self.conds[CONCEPT_KEY.format(i)] for i in plan.needed]
        concepts = None
        if lists and rows_read_by_position(model_options):
            concepts = evaluate_concepts(self.inner_model, lists, x, timestep, model_options, plan)
            lists = []
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds + lists, x, timestep,
                                             model_options)
        if lists:
            out, concepts = out[:2], torch.stack(out[2:])
        for fn in model_options.get("sampler_pre_cfg_function", []):  # as sampling_function
            out = fn({"conds": conds, "conds_out": out, "cond_scale": self.cfg, "timestep": timestep,
                      "input": x, "sigma": timestep, "model": self.inner_model,
                      "model_options": model_options})
        with _stopping_at(plan, x, "computing the edit"):
            edit = self.ldg_pass.edit(plan, x=x, sigma=timestep, uncond=out[1], cond=out[0],
                                      concepts=concepts)
        return comfy.samplers.cfg_function(
            self.inner_model, out[0], out[1], self.cfg, x, timestep,
            model_options=with_edit_first(model_options, edit), cond=conds[0], uncond=conds[1])


# -- the model patch -----------------------------------------------------------------------

class PatchState:
    """What the patch's two functions share during one sampling run."""

    def __init__(self, config: GuidanceConfig, texts, safety):
        self.config, self.texts, self.safety = config, texts, safety
        self.guider = None
        self.ldg_pass = None

    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        """An OUTER_SAMPLE wrapper (CFGGuider.sample, comfy/samplers.py L1031-1036): the concept
        conditionings join the guider's before ComfyUI prepares them all (process_conds)."""
        guider = executor.class_obj
        add_concept_conds(guider.conds, self.texts)
        self.guider = guider
        self.ldg_pass = ComfyPass(self.config, sampler=sampler, sigmas=sigmas,
                                  safety=self.safety, cfg_scale=getattr(guider, "cfg", 1.0))
        try:
            with stopping_with_a_message():
                return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            self.guider = self.ldg_pass = None

    def post_cfg(self, args: dict) -> torch.Tensor:
        """A post-CFG function (cfg_function, comfy/samplers.py L367-370): the needed concepts
        in one extra calc_cond_batch with the negative's inputs, the edit added."""
        ldg_pass = self.ldg_pass
        if ldg_pass is None:  # sampled without CFGGuider.sample (nothing of ours was set up)
            return args["denoised"]
        x, sigma = args["input"], args["sigma"]
        plan = ldg_pass.plan(sigma, args["cond_scale"])
        if args["uncond"] is None:  # the negative was skipped: no direction
            return args["denoised"]
        concepts = None
        if plan.needed:
            lists = [self.guider.conds[CONCEPT_KEY.format(i)] for i in plan.needed]
            concepts = evaluate_concepts(args["model"], lists, x, sigma, args["model_options"],
                                         plan)
        with _stopping_at(plan, x, "computing the edit"):
            return args["denoised"] + ldg_pass.edit(
                plan, x=x, sigma=sigma, uncond=args["uncond_denoised"],
                cond=args["cond_denoised"], concepts=concepts)


def patched_model(model, config: GuidanceConfig, texts, safety=None):
    state = PatchState(config, texts, safety)
    patched = model.clone()

    def post_cfg(args):  # plain functions: clone() deep-copies model_options
        return state.post_cfg(args)

    def outer_sample(executor, *args, **kwargs):
        return state.outer_sample(executor, *args, **kwargs)
    patched.set_model_sampler_post_cfg_function(post_cfg, disable_cfg1_optimization=True)
    comfy.patcher_extension.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample,
        patched.model_options, is_model_options=True)
    return patched


# -- the nodes -----------------------------------------------------------------------------

def _momentum_inputs():
    return {
        "momentum_scale": ("FLOAT", {"default": DEFAULT_MOMENTUM_SCALE, "min": 0.0, "max": 1.0,
                                     "step": 0.01, "tooltip": "How much of the edits of earlier "
                                     "steps carries on (momentum), shared by all concepts."}),
        "momentum_beta": ("FLOAT", {"default": DEFAULT_MOMENTUM_BETA, "min": 0.0, "max": 1.0,
                                    "step": 0.01, "tooltip": "How slowly the momentum changes: "
                                    "0 follows the latest edit, 1 never changes."}),
    }


_SAFETY_INPUT = (SAFETY, {"tooltip": "Safe Latent Diffusion, from an LDG Safe Latent "
                                     "Diffusion node (optional)."})
_CONCEPTS_INPUT = (CONCEPTS, {"tooltip": "The concepts, from LDG Concept or LDG Preset nodes."})


class LDGConcept:
    DESCRIPTION = ("One editing concept of semantic guidance: a text the image is steered "
                   "towards (add) or away from (remove). Chain several into one list.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (CONCEPTS,)
    RETURN_NAMES = ("concepts",)
    OUTPUT_TOOLTIPS = ("The concepts so far, for an LDG guider or model patch.",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The CLIP model that encodes the concept, as for the prompt."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "tooltip": "The concept, written as a prompt (weights and "
                                           "embeddings work as in any prompt)."}),
            "direction": (["add", "remove"], {"tooltip": "Steer towards the concept, or away from it."}),
            "scale": ("FLOAT", {"default": DEFAULT_SCALE, "min": 0.0, "max": 100.0, "step": 0.1,
                                "tooltip": "How strongly the concept steers."}),
            "threshold": ("FLOAT", {"default": DEFAULT_THRESHOLD, "min": 0.0, "max": 1.0,
                                    "step": 0.001, "tooltip": "The share of the latent left alone: "
                                    "0.95 edits only the strongest 5% of the concept's difference."}),
            "warmup": ("INT", {"default": DEFAULT_WARMUP, "min": 0, "max": 10000,
                               "tooltip": "Steps before the concept acts (counted from the "
                                          "sampler's first step)."}),
            "cooldown": ("INT", {"default": -1, "min": -1, "max": 10000,
                                 "tooltip": "The step from which the concept stops acting; -1: never."}),
            "weight": ("FLOAT", {"default": DEFAULT_WEIGHT, "min": -10.0, "max": 10.0, "step": 0.01,
                                 "tooltip": "The concept's share when several act on the same place."}),
        }, "optional": {
            "concepts": (CONCEPTS, {"tooltip": "Concepts to add this one to (chain)."}),
        }}

    def add(self, clip, text, direction, scale, threshold, warmup, cooldown, weight,
            concepts=()):
        concepts = tuple(concepts or ())
        label = f"concept {len(concepts) + 1} ({text.strip()!r})"
        if len(concepts) >= MAX_CONCEPTS:
            raise ValueError(f"{label}: at most {MAX_CONCEPTS} concepts are supported")
        try:
            concept = Concept(text.strip(), scale=scale, threshold=threshold, warmup=warmup,
                              cooldown=None if cooldown < 0 else cooldown, weight=weight,
                              reverse=direction == "remove")
        except ValueError as error:
            raise ValueError(f"{label}: {error}") from None
        encoded = clip.encode_from_tokens_scheduled(clip.tokenize(concept.prompt))
        return (concepts + ((concept, concept_text(encoded)),),)


class LDGPreset:
    DESCRIPTION = ("The concepts of one of Latent Diffusion Guidance's presets (edit their "
                   "example texts in a copy with LDG Concept nodes), and its momentum.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (CONCEPTS, "FLOAT", "FLOAT")
    RETURN_NAMES = ("concepts", "momentum_scale", "momentum_beta")
    OUTPUT_TOOLTIPS = ("The preset's concepts.", "The preset's momentum scale.",
                       "The preset's momentum beta.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The CLIP model that encodes the concepts."}),
            "preset": (list(BUILTIN_PRESETS), {"tooltip": "; ".join(
                f"{p.name}: {p.description}" for p in BUILTIN_PRESETS.values())}),
        }, "optional": {
            "concepts": (CONCEPTS, {"tooltip": "Concepts to add the preset's to (chain)."}),
        }}

    def load(self, clip, preset, concepts=()):
        config = BUILTIN_PRESETS[preset].config
        concepts = tuple(concepts or ())
        if len(concepts) + len(config.concepts) > MAX_CONCEPTS:
            raise ValueError(f"preset {preset!r}: at most {MAX_CONCEPTS} concepts are supported")
        for concept in config.concepts:
            encoded = clip.encode_from_tokens_scheduled(clip.tokenize(concept.prompt))
            concepts += ((concept, concept_text(encoded)),)
        return (concepts, config.momentum_scale, config.momentum_beta)


class LDGSafety:
    DESCRIPTION = ("Safe Latent Diffusion (SLD): steers away from a safety concept with SLD's "
                   "own formula. A named configuration uses SLD's published numbers; custom "
                   "uses the numbers below.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (SAFETY,)
    RETURN_NAMES = ("safety",)
    OUTPUT_TOOLTIPS = ("Safe Latent Diffusion's settings, for an LDG guider or model patch.",)
    FUNCTION = "configure"

    @classmethod
    def INPUT_TYPES(cls):
        medium = PRESETS[DEFAULT_PRESET]
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The CLIP model that encodes the safety concept."}),
            "configuration": (list(PRESETS) + ["custom"], {
                "default": DEFAULT_PRESET, "tooltip": "SLD's weak, medium, strong or max "
                "configuration, or custom (the numbers below)."}),
            "concept": ("STRING", {"multiline": True, "default": DEFAULT_SAFETY_CONCEPT,
                                   "tooltip": "What to steer away from (SLD's own text by default)."}),
            "scale": ("FLOAT", {"default": medium["scale"], "min": 0.0, "max": 10000.0,
                                "tooltip": "custom: SLD's guidance scale (1 or less: off)."}),
            "threshold": ("FLOAT", {"default": medium["threshold"], "min": -1.0, "max": 1.0,
                                    "step": 0.001, "tooltip": "custom: SLD's threshold."}),
            "warmup": ("INT", {"default": medium["warmup"], "min": 0, "max": 10000,
                               "tooltip": "custom: steps before SLD acts."}),
            "momentum_scale": ("FLOAT", {"default": medium["momentum_scale"], "min": 0.0,
                                         "max": 10.0, "step": 0.01,
                                         "tooltip": "custom: SLD's momentum scale."}),
            "momentum_beta": ("FLOAT", {"default": medium["momentum_beta"], "min": 0.0,
                                        "max": 1.0, "step": 0.01,
                                        "tooltip": "custom: SLD's momentum beta."}),
        }}

    def configure(self, clip, configuration, concept, scale, threshold, warmup, momentum_scale,
                  momentum_beta):
        try:
            if configuration == "custom":
                config = SafetyConfig(concept=concept.strip(), scale=scale, threshold=threshold,
                                      warmup=warmup, momentum_scale=momentum_scale,
                                      momentum_beta=momentum_beta)
            else:
                config = SafetyConfig.preset(configuration, concept=concept.strip())
        except ValueError as error:
            raise ValueError(f"Safe Latent Diffusion: {error}") from None
        encoded = clip.encode_from_tokens_scheduled(clip.tokenize(config.concept))
        return ((config, concept_text(encoded)),)


class LDGGuider:
    DESCRIPTION = ("A CFG guider with semantic guidance, for SamplerCustomAdvanced: each step "
                   "evaluates the prompt, the negative and the concepts in one batched call.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("GUIDER",)
    OUTPUT_TOOLTIPS = ("The guider, for SamplerCustomAdvanced.",)
    FUNCTION = "get_guider"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD 1.x, SD 2.x or SDXL model."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt; concepts see what it "
                                                     "sees (ControlNet, areas, masks)."}),
            "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1,
                              "round": 0.01, "tooltip": "The CFG scale."}),
            "concepts": _CONCEPTS_INPUT, **_momentum_inputs(),
        }, "optional": {"safety": _SAFETY_INPUT}}

    def get_guider(self, model, positive, negative, cfg, concepts, momentum_scale,
                   momentum_beta, safety=None):
        check_model(model)
        guider = SemanticGuider(model)
        guider.set_guidance(positive, negative, guidance_config(concepts, momentum_scale,
                                                                momentum_beta),
                            texts_of(concepts, safety), safety[0] if safety else None)
        guider.set_cfg(cfg)
        return (guider,)


class LDGModelPatch:
    DESCRIPTION = ("Semantic guidance for KSampler and any sampler that uses CFG: the "
                   "concepts are evaluated in one extra batched call per model evaluation.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with semantic guidance, for KSampler.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD 1.x, SD 2.x or SDXL model."}),
            "concepts": _CONCEPTS_INPUT, **_momentum_inputs(),
        }, "optional": {"safety": _SAFETY_INPUT}}

    def patch(self, model, concepts, momentum_scale, momentum_beta, safety=None):
        check_model(model)
        config = guidance_config(concepts, momentum_scale, momentum_beta)
        return (patched_model(model, config, texts_of(concepts, safety),
                              safety[0] if safety else None),)


NODE_CLASS_MAPPINGS = {
    "LDGConcept": LDGConcept, "LDGPreset": LDGPreset, "LDGSafety": LDGSafety,
    "LDGGuider": LDGGuider, "LDGModelPatch": LDGModelPatch}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LDGConcept": "LDG Concept", "LDGPreset": "LDG Preset",
    "LDGSafety": "LDG Safe Latent Diffusion", "LDGGuider": "LDG Guider (semantic guidance)",
    "LDGModelPatch": "LDG Model Patch (semantic guidance)"}
