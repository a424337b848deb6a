"""Semantic guidance in ComfyUI: what the nodes share, none of ComfyUI imported here.

ComfyUI's sampling code (comfy/samplers.py) evaluates any number of conditioning lists in one
batched model call (`calc_cond_batch`, one x0 per list), and a guider's `predict_noise` owns
the combination of one model evaluation. Concept conditionings are made from the negative's:
each of its entries with only the text (and the pooled vector) replaced, so that ControlNet,
areas, masks, timestep ranges and hooks apply to a concept exactly as to the negative, and
control cancels in the concept's direction. ComfyUI's `process_conds` then prepares them with
the prompt's and the negative's.

Which step a model call belongs to is counted from the calls of one sampling run, by the
sampler's function: its calls per step were measured in the real ComfyUI
(tests/data/comfy_calls.json), and the first call of each step must fall on the sampler's
sigma schedule, so a sampler that does not follow it stops with a message.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from .clock import StepClock
from .config import GuidanceConfig
from .failures import GuidanceError, StopSampling
from .passes import GuidancePass
from .safety_config import SafetyConfig

# Model calls per step of ComfyUI's samplers that make more than one (comfy/samplers.py
# ksampler(), sampler_object()), by their k-diffusion function, measured in the real ComfyUI
# (tests/data/comfy_calls.json): each makes one call at its last step, which ends at sigma 0.
CALLS_PER_STEP = {
    "sample_heun": 2, "sample_dpm_2": 2, "sample_dpm_2_ancestral": 2,
    "sample_dpmpp_2s_ancestral": 2, "sample_dpmpp_2s_ancestral_cfg_pp": 2,
    "sample_dpmpp_sde": 2, "sample_dpmpp_sde_gpu": 2, "sample_seeds_2": 2,
    "sample_sa_solver_pece": 2, "sample_seeds_3": 3}
_OWN_POINTS = "it picks its own evaluation points instead of the step schedule"
REFUSED_SAMPLERS = {
    "dpm_fast_function": _OWN_POINTS,  # dpm_fast
    "dpm_adaptive_function": _OWN_POINTS,  # dpm_adaptive
    "sample_heunpp2": "its number of model calls per step changes during the run",
}
CONCEPT_KEY = "ldg_concept_{}"  # the guider's named conditionings, next to positive, negative


def sampler_function_name(sampler: Any) -> str:
    """The name of the k-diffusion function a ComfyUI sampler (KSAMPLER) runs."""
    function = getattr(sampler, "sampler_function", None)
    return getattr(function, "__name__", type(sampler).__name__)


def sampler_problem(sampler: Any) -> Optional[str]:
    name = sampler_function_name(sampler)
    why = REFUSED_SAMPLERS.get(name)
    if why is None:
        return None
    label = name.removeprefix("sample_").removesuffix("_function")  # the name users pick
    return f"the sampler {label!r} is not supported: {why}"


# comfy/model_sampling.py's prediction classes: the model's sampling object derives from one.
# EPS, V_PREDICTION and EDM (a v-prediction) all give x0 = x - sigma * eps in k-diffusion's
# space, where concepts are eps directions; X0 models and flow models (CONST) do not.
GUIDED_PREDICTIONS = ("EPS", "V_PREDICTION", "EDM")
_PREDICTIONS = ("IMG_TO_IMG", "X0", "EDM", "V_PREDICTION", "EPS", "CONST", "COSMOS_RFLOW")


def model_problem(sampling_classes: Sequence[str], family: str) -> Optional[str]:
    """`sampling_classes`: the class names of the model's sampling object's MRO, `family`: its
    config class name (comfy/supported_models.py: SD15, SDXL, Flux, SD3, ...)."""
    prediction = next((name for name in sampling_classes if name in _PREDICTIONS), None)
    if prediction in GUIDED_PREDICTIONS:
        return None
    return (f"this model ({family}, {prediction or 'unknown'} prediction) is not an eps or "
            "v-prediction UNet; semantic guidance works with SD 1.x, SD 2.x and SDXL models")


@dataclass(frozen=True)
class ConceptText:
    """One concept's encoded text: the cross-attention rows and the pooled vector (SDXL)."""

    cross_attn: torch.Tensor
    pooled_output: Optional[torch.Tensor] = None


def concept_text(conditioning: Sequence) -> ConceptText:
    """From a ComfyUI CONDITIONING of one entry ([[tensor, {"pooled_output": ...}]])."""
    if len(conditioning) != 1:
        raise ValueError(f"a concept's conditioning must have one entry, got {len(conditioning)}")
    tensor, extra = conditioning[0]
    return ConceptText(tensor, extra.get("pooled_output"))


def concept_conds(negative: Sequence[dict], text: ConceptText) -> List[dict]:
    """The negative's entries (converted: comfy/sampler_helpers.py convert_cond) with the
    concept's text: everything else the negative carries applies to the concept alike."""
    entries = []
    for entry in negative:
        entry = dict(entry)
        entry["cross_attn"] = text.cross_attn
        if text.pooled_output is not None:
            entry["pooled_output"] = text.pooled_output
        entry["model_conds"] = dict(entry.get("model_conds", {}))  # process_conds renews them
        entry["uuid"] = uuid.uuid4()  # an entry of its own (convert_cond gives each one)
        # Models whose conditioning depends on the prompt's role (the SDXL refiner's aesthetic
        # score) take it from the list's key unless the entry says it (comfy/samplers.py
        # encode_model_conds L707): a concept is a negative.
        entry.setdefault("prompt_type", "negative")
        entries.append(entry)
    return entries


def rows_read_by_position(model_options: dict) -> bool:
    """Attention replacements pick each chunk's inputs by its list's position in the batched
    call, 0 the prompt and 1 the negative: IP-Adapter's takes (cond, uncond)[i] for each i of
    transformer_options["cond_or_uncond"] (ComfyUI_IPAdapter_plus CrossAttentionPatch), so a
    concept list at 2 and up would fail and one at 0 would get the prompt's image. Such
    concepts are evaluated each in the negative's place instead."""
    replaced = model_options.get("transformer_options", {}).get("patches_replace", {})
    return any(replaced.get(kind) for kind in ("attn1", "attn2"))


@dataclass(frozen=True)
class Plan:
    """What one model evaluation needs: its step, CFG scale and the rows to evaluate."""

    index: int
    scale: float
    needed: Tuple[int, ...]


class ComfyPass:
    """Guidance for one sampling run in ComfyUI: the step of each model evaluation, the concepts
    it needs and the edit of its outputs (x0, as ComfyUI's CFG functions see them)."""

    def __init__(self, config: GuidanceConfig, *, sampler: Any, sigmas: torch.Tensor,
                 safety: Optional[SafetyConfig] = None, cfg_scale: float = 7.0,
                 observer: Optional[Callable] = None):
        problem = sampler_problem(sampler)
        if problem:
            raise GuidanceError(problem)
        self.schedule = [float(s) for s in sigmas]
        clock = StepClock(0, CALLS_PER_STEP.get(sampler_function_name(sampler), 1),
                          end_step=len(self.schedule) - 1)
        self.guidance = GuidancePass(config, clock=clock, eps_outputs=False, observer=observer,
                                     safety=safety, guidance_scale=cfg_scale)
        self.calls = 0

    def plan(self, sigma: torch.Tensor, scale: float) -> Plan:
        """The next model evaluation's plan; `sigma` [B] is its noise level."""
        call, self.calls = self.calls, self.calls + 1
        index = self.guidance.clock.index(call)
        if index >= len(self.schedule) - 1:
            raise StopSampling(f"the sampler made more model calls than its {index} steps; "
                               "it is not supported with guidance")
        if call % self.guidance.clock.calls_per_step == 0:
            expected, level = self.schedule[index], float(sigma.flatten()[0])
            if not math.isclose(level, expected, rel_tol=1e-3, abs_tol=1e-5):
                raise StopSampling(
                    f"the sampler evaluated the model at sigma {level:.4g} where step {index} "
                    f"of its schedule is at {expected:.4g}: it does not follow the schedule "
                    "step by step, so guidance cannot count its steps")
        return Plan(index, scale, self.guidance.needed(index, scale))

    def edit(self, plan: Plan, *, x: torch.Tensor, sigma: torch.Tensor, uncond: torch.Tensor,
             cond: torch.Tensor, concepts: Optional[torch.Tensor]) -> torch.Tensor:
        """The change of the combined x0 for this evaluation's outputs (x0 each)."""
        return self.guidance.edit(plan.index, rows=plan.needed, scale=plan.scale, x=x,
                                  sigma=sigma, uncond=uncond, cond=cond, concepts=concepts)
