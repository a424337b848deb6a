"""Semantic guidance in Forge, Forge Neo and reForge: a post-CFG function on each pass's UNet.

These WebUIs keep A1111's samplers and processing but evaluate the model in their own sampling
code, where appended rows are dropped and on_cfg_denoised never fires. lllyasviel's Forge's
CFG denoiser hands the prompt and negative conditioning to its own sampling function
(backend/sampling/sampling_function.py, dfdcbab6): calc_cond_uncond_batch evaluates them
(L154-289), CFG combines them, and post-CFG functions are chained over the result (L314-317),
all in x0 (k-diffusion) space, also for DDIM and UniPC. Appended rows and on_cfg_denoised do
not exist there. So, for each pass, the script clones the UNet patcher and adds one post-CFG
function, which
  1. finds the step from the CFG denoiser's call counter (the same clock as on A1111);
  2. evaluates the needed concepts with the negative's inputs: a copy of the compiled
     negative entry (so ControlNet, image conditioning and every model option apply alike)
     with only its text replaced, in the negative slot of calc_cond_uncond_batch (ControlNet
     weights the slots differently, L129-137), concepts stacked into one UNet batch: entries
     of one slot would be averaged (L276-288);
  3. adds the edit to the CFG result.
reForge (ldm_patched/modules/samplers.py, 3b56b268) has the same post-CFG chain (L396-399) and
ComfyUI's calc_cond_batch (L206-355), which evaluates any number of conditioning lists, one
output each, batching whatever can share a UNet call. There the concepts join the prompt's and
the negative's call, each a list of its own, through the sampler_calc_cond_batch_function slot
(L419-424), as rows join A1111's call; the post-CFG function then only adds the edit. Where
that cannot be done (see `join_problem`), it evaluates them in a call of their own, as on Forge.
Nothing of either host is imported here: what is needed comes in as `ForgeFunctions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from .failures import StopSampling, is_out_of_memory, sampling_failure, stop_on_error
from .passes import GuidancePass, row_chunks


@dataclass(frozen=True)
class ForgeFunctions:
    """The pieces of the host the post-CFG function uses, handed in by the script (or a double)."""

    name: str  # "Forge" or "reForge", for messages
    # (model, entry, x, sigma, model_options) -> x0 of one entry in the negative's position:
    # Forge's calc_cond_uncond_batch(model, [], [entry], ...)[1], reForge's
    # calc_cond_batch(model, [None, [entry]], ...)[1]
    evaluate_negative: Callable[..., torch.Tensor]
    cross_attn: Callable[[torch.Tensor], Any]  # the text condition's class (CONDCrossAttn)
    condition: Callable[[torch.Tensor], Any]  # a plain condition (SDXL's pooled y)
    # reForge drops the negative at a CFG scale of 1 unless told not to; Forge has none to keep
    # there (processing.py L499-501), so the pass is refused instead.
    keep_cfg1_uncond: bool = False
    # (model, lists of entries, x, sigma, model_options) -> one x0 per list: reForge's
    # calc_cond_batch. None on Forge, whose calc_cond_uncond_batch has two slots only.
    evaluate_lists: Optional[Callable[..., List[torch.Tensor]]] = None
    # sampler name -> why it cannot be guided on this host, or None
    sampler_problem: Callable[[str], Optional[str]] = lambda name: None
    # samplers that evaluate the model twice per step without saying so (second_order)
    two_call_samplers: frozenset = frozenset()


# reForge's own samplers whose model calls run past the steps of their schedule (measured in
# the real reForge, 3b56b268: the Dy and SMEA variants, SEEDS, the ODE solvers, ...).
REFORGE_OVERRUNNING = {
    "Euler Dy", "Euler SMEA Dy", "Euler Negative Dy", "DPM++ SDE Classic", "Kohaku_LoNyu_Yog",
    "SEEDS 2 DP", "SEEDS 3 DP", "SA-Solver-Pece", "RES Solver", "ODE (Bosh3)",
    "ODE (Fehlberg2)", "ODE (Adaptive Heun)", "ODE (Dopri5)", "ODE Custom"}


# reForge's ComfyUI copies of k-diffusion's Heun, DPM++ 2S a and DPM++ SDE: two calls per step,
# one at the last (ldm_patched/k_diffusion/sampling.py sample_heun, sample_dpmpp_2s_ancestral,
# sample_dpmpp_sde), as their A1111 namesakes, but registered without the second_order flag
# (modules_forge/forge_alter_samplers.py L263-266).
REFORGE_TWO_CALL = frozenset({"Heun Comfy", "DPM++ 2S Ancestral Comfy", "DPM++ SDE Comfy"})


def reforge_sampler_problem(name: str) -> Optional[str]:
    """Samplers reForge offers that cannot be guided there, said before sampling. (Any other
    sampler that replaces the post-CFG chain is stopped at its first call: calc_cond_batch.)"""
    if "CFG++" in name or name.endswith(" RF"):
        # They bring model options of their own, which reForge's CFG denoiser lays over the
        # UNet's (sd_samplers_cfg_denoiser.py L211-213, ldm_patched/k_diffusion/sampling.py
        # sample_euler_cfg_pp): our post-CFG function would be dropped, the image unguided.
        return "it replaces the UNet's post-CFG functions with its own, so guidance would be lost"
    if name in REFORGE_OVERRUNNING:
        return "its number of model calls per step changes during the run"
    return None


# reForge's hook that evaluates the prompt and negative lists (samplers.py L419-422); one slot.
CALC_COND_BATCH = "sampler_calc_cond_batch_function"


def join_problem(model_options: dict, max_rows: int) -> Optional[str]:
    """Why concepts cannot join reForge's own model call in this pass; None when they can."""
    if model_options.get(CALC_COND_BATCH) is not None:
        return "another extension evaluates reForge's conditioning (sampler_calc_cond_batch_function)"
    if max_rows:  # calc_cond_batch sizes its calls by free memory, not by our setting
        return "'Max rows per UNet call' is set"
    return None


def rows_read_by_position(model_options: dict) -> bool:
    """Attention replacements (IP-Adapter and others) pick each chunk's tensors by its list
    index as (cond, uncond)[i] (extensions-builtin/sd_forge_ipadapter/lib_ipadapter/
    IPAdapterPlus.py L478-484, CrossAttentionPatch.py L179-184): a concept's index, 2 and up,
    would be misread. In a call of their own the concepts sit in the negative's place."""
    replaced = model_options.get("transformer_options", {}).get("patches_replace", {})
    return any(replaced.get(kind) for kind in ("attn1", "attn2"))


def text_rows(cond: Any) -> torch.Tensor:
    return cond["crossattn"] if isinstance(cond, dict) else cond


def self_attention_replaced(model_options: dict) -> bool:
    """Self-attention replacements can work across the rows of a call: StyleAlign aligns every
    row of a call to its first (extensions-builtin/sd_forge_stylealign/scripts/
    forge_stylealign.py L40-88), so concepts stacked in one call would leak into each other."""
    return bool(model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1"))


@dataclass(frozen=True)
class _Plan:
    """What one call of the CFG denoiser evaluates: its step, CFG scale and needed rows."""

    call: int
    index: int
    scale: float
    needed: Tuple[int, ...]


class ForgePass:
    """Guidance for one sampling pass in Forge; `post_cfg(args)` is Forge's post-CFG call, and
    on reForge `calc_cond_batch(args)` its conditioning hook."""

    def __init__(self, guidance: GuidancePass, *, denoiser: Any, concept_conds: Callable[[int], List[Any]],
                 forge: ForgeFunctions, skips_uncond: Callable[[Any, torch.Tensor], bool],
                 max_rows: int = 0, on_separate_call: Callable[[str], None] = lambda why: None):
        """`denoiser`: the pass's CFG denoiser (its `step` counts the calls of the pass).
        `concept_conds(call)`: every concept's one-row conditioning at that call (schedules
        follow the prompt's clock). `skips_uncond(denoiser, sigma)`: lllyasviel Forge's CFG
        skips the negative at this call (it does not say so in the post-CFG arguments). `max_rows`: rows per model call of ours, 0 = no
        limit; a call holds whole concepts (batch size rows each), since Forge matches
        per-image conditioning (image conditioning, ControlNet hints) to rows by repeating it.
        `on_separate_call(why)`: told when concepts that could join the host's call cannot."""
        self.guidance = guidance
        self.denoiser = denoiser
        self.concept_conds = concept_conds
        self.forge = forge
        self.skips_uncond = skips_uncond
        self.max_rows = max(int(max_rows), 0)
        self.on_separate_call = on_separate_call
        self._joined = None  # (_Plan, [K, B, C, H, W]) from the host's own call, reForge

    def webui_call_failure(self, error: BaseException) -> None:
        return None  # failures in a call of the host's stay the host's, as messages go

    def calc_cond_batch(self, args: dict) -> List[torch.Tensor]:
        """reForge's conditioning hook: the prompt and negative lists, and one list per needed
        concept, in one calc_cond_batch; the concepts' outputs wait for the post-CFG call."""
        conds, options = args["conds"], args["model_options"]
        self._joined = None
        if not any(getattr(fn, "forge_pass", None) is self
                   for fn in options.get("sampler_post_cfg_function", ())):
            # A sampler's own model options replaced the UNet's post-CFG chain (reForge's CFG
            # denoiser lays them over it, sd_samplers_cfg_denoiser.py L211-213): the edit
            # would never be added.
            raise StopSampling(f"this sampler replaces {self.forge.name}'s post-CFG functions "
                               "with its own, so guidance cannot be added: choose another sampler")
        plan = self._plan(self.denoiser.step)
        needed = plan.needed if conds[1] is not None else ()
        if needed and rows_read_by_position(options):
            self.on_separate_call("an attention patch (IP-Adapter, ...) reads the model "
                                  "call's rows by their position")
            needed = ()  # the post-CFG function evaluates them in a call of their own
        if not needed:
            return self.forge.evaluate_lists(args["model"], conds, args["input"], args["sigma"],
                                             options)
        x = args["input"]
        lists = [[self._entry(conds[1][0], [cond], x.shape[0])]
                 for cond in self._conds(needed, plan.call)]
        try:
            out = self.forge.evaluate_lists(args["model"], list(conds) + lists, x, args["sigma"],
                                            options)
        except Exception as error:  # the host's call: only running out of memory is ours to say
            if not is_out_of_memory(error):
                raise
            raise StopSampling(sampling_failure(
                error, step=plan.index, rows=len(needed) * x.shape[0],
                what="evaluating the concepts with the prompt")) from error
        self._joined = (plan, torch.stack(out[2:]))
        return out[:2]

    def post_cfg(self, args: dict) -> torch.Tensor:
        joined, self._joined = self._joined, None
        if self._negative_skipped(args):
            return args["denoised"]  # the host's CFG has no direction here
        x, sigma = args["input"], args["sigma"]
        if joined is not None and joined[0].call == self.denoiser.step:
            plan, concepts = joined
            what = "computing the edit from the concepts evaluated with the prompt"
        else:
            plan, concepts = self._plan(self.denoiser.step), None
            what = "evaluating the concepts in a model call of their own"
        with stop_on_error(step=plan.index, rows=len(plan.needed) * x.shape[0], what=what):
            if plan.needed and concepts is None:
                concepts = self._evaluate(args, plan.needed, plan.call)
            edit = self.guidance.edit(plan.index, rows=plan.needed, scale=plan.scale, x=x,
                                      sigma=sigma, uncond=args["uncond_denoised"],
                                      cond=self._prompt_estimate(args), concepts=concepts)
            if getattr(self.denoiser, "mask", None) is not None:
                edit = edit * self.denoiser.nmask  # inpainting: the preserved area is left alone
            return args["denoised"] + edit

    def _plan(self, call: int) -> "_Plan":
        index = self.guidance.clock.index(call)
        scale = self.guidance.scale_at(self.denoiser)
        return _Plan(call, index, scale, self.guidance.needed(index, scale))

    def _prompt_estimate(self, args: dict) -> torch.Tensor:
        """The prompt's estimate the host's CFG scales. With AND prompts Forge and reForge
        average the sub-prompts' estimates weighted by their strengths and scale the
        difference by the strengths' sum ("edit_strength" in Forge's sampling_function_inner
        and reForge's cfg_function): uncond + sum_i w_i (cond_i - uncond), as on A1111. SEGA reads
        only its shape; Safe Latent Diffusion reads it."""
        cond, uncond = args["cond_denoised"], args["uncond_denoised"]
        if self.guidance.safety is None:
            return cond
        strength = sum(entry.get("strength", 1) for entry in args.get("cond") or [])
        if not args.get("cond") or math.isclose(strength, 1.0):
            return cond
        return uncond + (cond - uncond) * strength

    def _negative_skipped(self, args: dict) -> bool:
        """Whether the host's CFG skips the negative at this call (NGMS, skip early CFG)."""
        if args["uncond"] is None:  # reForge hands over none then (its CFG denoiser L241-243)
            return True
        if self.forge.keep_cfg1_uncond:  # reForge: a negative it kept is a CFG of its scale
            return False
        if "cond_scale" in args:
            # Forge Neo says the scale, and its denoiser skips by setting it to 1
            # (sd_samplers_cfg_denoiser.py L142-148); a CFG scale of 1 is refused before
            # sampling, so 1 here is a skip.
            return math.isclose(args["cond_scale"], 1.0)
        return self.skips_uncond(self.denoiser, args["sigma"])  # Forge's rule, A1111's

    def _conds(self, needed: Sequence[int], call: int) -> List[Any]:
        conds = self.concept_conds(call)
        return [conds[index] for index in needed]

    def _evaluate(self, args: dict, needed: Sequence[int], call: int) -> torch.Tensor:
        """[K, B, C, H, W] x0 of the needed concepts: calls of whole concepts, at most
        max_rows // B of them (at least one), never mixing token lengths."""
        conds = self._conds(needed, call)
        images = args["input"].shape[0]
        per_call = max(self.max_rows // images, 1) if self.max_rows else 0
        if self_attention_replaced(args["model_options"]):
            per_call = 1  # a concept's rows alone in their call, as the negative's are in theirs
        lengths = [text_rows(cond).shape[-2] for cond in conds]
        out = torch.cat([self._call(args, conds[chunk]) for chunk in row_chunks(lengths, per_call)])
        return out.view(len(conds), images, *out.shape[1:])

    def _call(self, args: dict, conds: Sequence[Any]) -> torch.Tensor:
        """One model call: each of `conds` for every image, with the negative entry's inputs."""
        x, sigma = args["input"], args["sigma"]
        entry = self._entry(args["uncond"][0], conds, x.shape[0])
        repeats = len(conds)
        return self.forge.evaluate_negative(args["model"], entry, x.repeat(repeats, 1, 1, 1),
                                            sigma.repeat(repeats), args["model_options"])

    def _entry(self, negative: dict, conds: Sequence[Any], images: int) -> dict:
        """The negative's compiled entry (Forge compiles one: condition.py L122-142; reForge
        forge_sampler.py L8-30) with `conds` stacked for every image in place of its text."""
        text = torch.cat([text_rows(c).expand(images, *text_rows(c).shape[1:]) for c in conds])
        entry = dict(negative)
        model_conds = dict(entry["model_conds"])
        entry["cross_attn"] = text
        model_conds["c_crossattn"] = self.forge.cross_attn(text)
        if isinstance(conds[0], dict):  # SDXL: the concept's pooled vector and size terms
            vector = torch.cat([c["vector"].expand(images, *c["vector"].shape[1:]) for c in conds])
            entry["pooled_output"] = vector
            model_conds["y"] = self.forge.condition(vector)
        entry["model_conds"] = model_conds
        return entry


def post_cfg_function(forge_pass: ForgePass) -> Callable[[dict], torch.Tensor]:
    """A plain function for the UNet patcher: UnetPatcher.clone deep-copies model_options
    (backend/patcher/unet.py L26-35), and a bound method would carry a copy of its object."""
    def post_cfg(args):
        return forge_pass.post_cfg(args)
    post_cfg.forge_pass = forge_pass  # how reForge's hook finds it in the options handed over
    return post_cfg


def calc_cond_batch_function(forge_pass: ForgePass) -> Callable[[dict], List[torch.Tensor]]:
    """reForge's conditioning hook, a plain function for the same reason."""
    def calc_cond_batch(args):
        return forge_pass.calc_cond_batch(args)
    return calc_cond_batch
