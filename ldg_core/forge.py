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
ComfyUI's calc_cond_batch (L206-355), which returns one output per list: there the concepts go
in a list of their own in the negative's position. Nothing of either host is imported here:
what is needed comes in as `ForgeFunctions`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, List, Sequence

import torch

from .failures import StopSampling, sampling_failure
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


def text_rows(cond: Any) -> torch.Tensor:
    return cond["crossattn"] if isinstance(cond, dict) else cond


class ForgePass:
    """Guidance for one sampling pass in Forge; `post_cfg(args)` is Forge's post-CFG call."""

    def __init__(self, guidance: GuidancePass, *, denoiser: Any, concept_conds: Callable[[int], List[Any]],
                 forge: ForgeFunctions, skips_uncond: Callable[[Any, torch.Tensor], bool],
                 max_rows: int = 0):
        """`denoiser`: the pass's CFG denoiser (its `step` counts the calls of the pass).
        `concept_conds(call)`: every concept's one-row conditioning at that call (schedules
        follow the prompt's clock). `max_rows`: rows per model call of ours, 0 = no limit; a
        call holds whole concepts (batch size rows each), since Forge matches per-image
        conditioning (image conditioning, ControlNet hints) to rows by repeating it."""
        self.guidance = guidance
        self.denoiser = denoiser
        self.concept_conds = concept_conds
        self.forge = forge
        self.skips_uncond = skips_uncond
        self.max_rows = max(int(max_rows), 0)

    def webui_call_failure(self, error: BaseException) -> None:
        return None  # concepts never share Forge's own model call: its failures stay Forge's

    def post_cfg(self, args: dict) -> torch.Tensor:
        call = self.denoiser.step
        step = self.guidance.clock.index(call)
        x, sigma = args["input"], args["sigma"]
        if args["uncond"] is None:  # refused before sampling; never an unguided image
            raise StopSampling(f"{self.forge.name} gave no negative-prompt estimate at step "
                               f"{step}, and concepts are directions from it")
        if self.skips_uncond(self.denoiser, sigma):
            return args["denoised"]  # the WebUI's CFG skips the negative here: no direction
        needed = self.guidance.needed(step)
        with _stop_on_error(step, len(needed) * x.shape[0]):
            concepts = self._evaluate(args, needed, call) if needed else None
            edit = self.guidance.edit(step, x=x, sigma=sigma, uncond=args["uncond_denoised"],
                                      cond=args["cond_denoised"], concepts=concepts)
            if getattr(self.denoiser, "mask", None) is not None:
                edit = edit * self.denoiser.nmask  # inpainting: the preserved area is left alone
            return args["denoised"] + edit

    def _evaluate(self, args: dict, needed: Sequence[int], call: int) -> torch.Tensor:
        """[K, B, C, H, W] x0 of the needed concepts: calls of whole concepts, at most
        max_rows // B of them (at least one), never mixing token lengths."""
        conds = self.concept_conds(call)
        conds = [conds[index] for index in needed]
        images = args["input"].shape[0]
        per_call = max(self.max_rows // images, 1) if self.max_rows else 0
        lengths = [text_rows(cond).shape[-2] for cond in conds]
        out = torch.cat([self._call(args, conds[chunk]) for chunk in row_chunks(lengths, per_call)])
        return out.view(len(conds), images, *out.shape[1:])

    def _call(self, args: dict, conds: Sequence[Any]) -> torch.Tensor:
        """One model call: each of `conds` for every image, with the negative entry's inputs."""
        x, sigma = args["input"], args["sigma"]
        images = x.shape[0]
        text = torch.cat([text_rows(c).expand(images, *text_rows(c).shape[1:]) for c in conds])
        entry = dict(args["uncond"][0])  # Forge compiles one negative entry (condition.py L122-142)
        model_conds = dict(entry["model_conds"])
        entry["cross_attn"] = text
        model_conds["c_crossattn"] = self.forge.cross_attn(text)
        if isinstance(conds[0], dict):  # SDXL: the concept's pooled vector and size terms
            vector = torch.cat([c["vector"].expand(images, *c["vector"].shape[1:]) for c in conds])
            entry["pooled_output"] = vector
            model_conds["y"] = self.forge.condition(vector)
        entry["model_conds"] = model_conds
        repeats = len(conds)
        return self.forge.evaluate_negative(args["model"], entry, x.repeat(repeats, 1, 1, 1),
                                            sigma.repeat(repeats), args["model_options"])


def post_cfg_function(forge_pass: ForgePass) -> Callable[[dict], torch.Tensor]:
    """A plain function for the UNet patcher: UnetPatcher.clone deep-copies model_options
    (backend/patcher/unet.py L26-35), and a bound method would carry a copy of its object."""
    def post_cfg(args):
        return forge_pass.post_cfg(args)
    return post_cfg


@contextlib.contextmanager
def _stop_on_error(step: int, rows: int):
    try:
        yield
    except Exception as error:
        raise StopSampling(sampling_failure(
            error, step=step, rows=rows,
            what="evaluating the concepts in a model call of their own")) from error
