"""Semantic guidance inside the WebUI's CFG denoiser, one sampling pass at a time.

The WebUI's CFG denoiser (modules/sd_samplers_cfg_denoiser.py, v1.10.1) lays out the rows of
every model call as [prompt rows (AND sub-prompts included)] + [uncond rows, one per image],
and lets callbacks change them. For each call this adapter
  1. on_cfg_denoiser: appends one row per image for each concept the engine needs at this
     step, after the prompt rows and before the uncond rows (same x, sigma and image
     conditioning as the uncond rows, so a concept differs from uncond only by its text);
  2. on_cfg_denoised: reads those rows back, turns them into eps and asks SemanticGuidance
     for the edit;
  3. on_cfg_after_cfg: adds the edit to the combined result, in the sampler's own space.
Where added rows cannot be used (a concept longer than the prompt rows), the concept rows are
evaluated instead in a separate call of the same inner model from on_cfg_denoised: the same
inputs, so the same estimates, for one extra model call per step. The same path caps memory:
with a limit on rows per model call ("Max rows per UNet call"), a call that the concept rows
would push past it is left as the WebUI made it, and the concept rows are evaluated in extra
calls of at most that many rows each.
Nothing of the WebUI is imported here: what is needed of it comes in as `WebUIFunctions`.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from .failures import StopSampling, is_out_of_memory, sampling_failure
from .passes import GuidancePass, row_chunks


@dataclass(frozen=True)
class WebUIFunctions:
    """The pieces of the WebUI the adapter uses, handed in by the script (or a test double)."""

    reconstruct_cond_batch: Callable[[Any, int], Any]  # prompt_parser.reconstruct_cond_batch
    catenate_conds: Callable[[list], Any]  # sd_samplers_cfg_denoiser.catenate_conds
    pad_cond: Callable[[Any, int, torch.Tensor], Any]  # sd_samplers_cfg_denoiser.pad_cond
    empty_cond: Callable[[], torch.Tensor]  # the model's cond_stage_model_empty_prompt
    skips_uncond: Callable[[Any, torch.Tensor], bool]  # (denoiser, sigma): uncond skipped?
    condition: Callable[[Any, torch.Tensor], dict]  # the inner model's cond (make_condition_dict)


def token_count(cond: Any) -> int:
    return (cond["crossattn"] if isinstance(cond, dict) else cond).shape[-2]


def _rows_of(cond: Any, count: int) -> Any:
    """`count` copies of a one-row conditioning, keeping its type (DictWithShape for SDXL)."""
    if isinstance(cond, dict):
        return type(cond)({k: v.expand(count, *v.shape[1:]) for k, v in cond.items()})
    return cond.expand(count, *cond.shape[1:])


@dataclass
class _Call:
    index: int
    needed: Tuple[int, ...]
    prompt_rows: int  # rows before ours
    images: int
    x: torch.Tensor  # the images' x and sigma (the uncond rows' inputs)
    sigma: torch.Tensor
    denoiser: Any
    image_cond: Optional[torch.Tensor] = None  # kept for a separate call
    tokens: int = 0  # the prompt rows' token length
    extra_calls: bool = False  # concept rows evaluated in calls of their own
    scale: float = 1.0  # the call's CFG scale
    edit: Optional[torch.Tensor] = None


class PassGuidance:
    """Guidance for one sampling pass of one generation; its on_* methods are the callbacks."""

    def __init__(self, guidance: GuidancePass, *, owner: Any, concept_schedules: Sequence[Any],
                 first_prompt_rows: Sequence[int], webui: WebUIFunctions,
                 separate_call: bool = False, max_rows: int = 0,
                 prompt_rows: Optional[Sequence[Sequence[Tuple[int, float]]]] = None):
        """`prompt_rows`: per image, its prompt rows and their weights (AND prompts), which
        give Safe Latent Diffusion the prompt's estimate the WebUI's CFG scales; None: one
        row of weight 1 per image, at `first_prompt_rows`."""
        self.guidance = guidance  # the step, the concepts to evaluate, the edit
        self.separate_call = separate_call
        self.max_rows = max(int(max_rows), 0)  # rows per model call of ours; 0 = no limit
        self.clock = guidance.clock
        self.owner = owner  # the processing object our script set up; other passes are left alone
        self.schedules = list(concept_schedules)  # per concept, as get_learned_conditioning gives
        self.first_prompt_rows = list(first_prompt_rows)  # each image's first prompt row
        self.prompt_rows = None if prompt_rows is None or all(
            len(rows) == 1 and rows[0][1] == 1 for rows in prompt_rows) else [
            list(rows) for rows in prompt_rows]
        self.webui = webui
        self._call: Optional[_Call] = None
        # Told, right before the model calls that evaluate concept rows, which rows those are
        # (numbered across those calls: row -> (concept, image)), with the call's _Call.
        self.on_concept_rows: Optional[Callable[[Dict[int, Tuple[int, int]], _Call], None]] = None

    def replace_schedules(self, concept_schedules: Sequence[Any]) -> None:
        """New conditioning for the same concepts (the SDXL refiner took over mid-pass)."""
        self.schedules = list(concept_schedules)

    # -- the callbacks -----------------------------------------------------------------------

    def webui_call_failure(self, error: BaseException) -> Optional[str]:
        """What to tell the user when the WebUI's own model call raised `error` with our concept
        rows in it: running out of memory is then ours to explain. None otherwise."""
        call = self._call
        if call is None or call.extra_calls or not call.needed or not is_out_of_memory(error):
            return None
        return sampling_failure(error, step=call.index, rows=len(call.needed) * call.images,
                                what="evaluating the concepts with the prompt")

    def on_cfg_denoiser(self, params) -> None:
        self._call = None
        denoiser = getattr(params, "denoiser", None)
        if denoiser is None or getattr(denoiser, "p", None) is not self.owner:
            return
        with _stop_on_error(self, self.clock.index(denoiser.step), "adding the concept rows"):
            self._begin_call(params, denoiser)

    def _begin_call(self, params, denoiser) -> None:
        images = params.text_uncond.shape[0]
        prompt_rows = params.text_cond.shape[0]
        if params.x.shape[0] != prompt_rows + images:
            self._fail(f"the model call has {params.x.shape[0]} rows where {prompt_rows} prompt "
                       f"rows + {images} negative rows were expected")
        sigma_images = params.sigma[-images:]
        if self.webui.skips_uncond(denoiser, sigma_images):
            return  # the WebUI drops CFG at this step; without an uncond there is no direction
        index = self.clock.index(denoiser.step)
        scale = self.guidance.scale_at(denoiser)
        needed = self.guidance.needed(index, scale)
        # Past the row limit, the WebUI's call stays as it is and concepts get calls of their own.
        over_limit = 0 < self.max_rows < params.x.shape[0] + len(needed) * images
        extra_calls = self.separate_call or over_limit
        if not extra_calls and _is_marked(token_count(params.text_cond), self.webui.empty_cond()):
            # ControlNet caches per-row state at the first call's row count (hook.py
            # L547, L700-708): keep every concept's rows at every call of the pass.
            needed = tuple(range(self.guidance.rows))
        self._call = _Call(index, needed, prompt_rows, images, params.x[-images:], sigma_images,
                           denoiser, params.image_cond[-images:], token_count(params.text_cond),
                           extra_calls=extra_calls, scale=scale)
        if needed and not extra_calls:
            self._add_concept_rows(params, denoiser.step)
            self._announce_rows(first=prompt_rows)

    def on_cfg_denoised(self, params) -> None:
        call = self._call
        if call is None:
            return
        what = ("evaluating the concepts in a model call of their own" if call.extra_calls
                else "reading the concept rows")
        with _stop_on_error(self, call.index, what):
            self._finish_call(params, call)

    def _finish_call(self, params, call: _Call) -> None:
        out, k, b = params.x, len(call.needed), call.images
        uncond = out[-b:]
        concepts = None
        if k and call.extra_calls:
            self._announce_rows(first=0)
            concepts = self._evaluate_concepts(params.inner_model)
        elif k:
            concepts = out[call.prompt_rows:call.prompt_rows + k * b].view(k, *uncond.shape)
        call.edit = self.guidance.edit(call.index, rows=call.needed, scale=call.scale, x=call.x,
                                       sigma=call.sigma, uncond=uncond,
                                       cond=self._prompt_estimate(out, uncond), concepts=concepts)

    def _prompt_estimate(self, out: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """Each image's prompt estimate: its prompt row, or, for AND prompts with Safe Latent
        Diffusion on, the WebUI's combined direction at CFG scale 1, uncond + sum_i w_i
        (cond_i - uncond), computed as combine_denoised computes it
        (sd_samplers_cfg_denoiser.py L80-87), so that SLD's guided result stays "the WebUI's
        CFG result + edit". SEGA reads only the estimate's shape."""
        if self.prompt_rows is None or self.guidance.safety is None:
            return out[self.first_prompt_rows]
        combined = torch.clone(uncond)
        for image, rows in enumerate(self.prompt_rows):
            for row, weight in rows:
                combined[image] += (out[row] - uncond[image]) * weight
        return combined

    def on_cfg_after_cfg(self, params) -> None:
        call, self._call = self._call, None
        if call is None or call.edit is None:
            return
        with _stop_on_error(self, call.index, "adding the edit"):
            self._apply_edit(params, call)

    def _apply_edit(self, params, call: _Call) -> None:
        edit = call.edit
        if getattr(call.denoiser, "mask", None) is not None:
            edit = edit * call.denoiser.nmask  # inpainting: the preserved area is left alone
        params.x = params.x + edit

    # -- helpers -----------------------------------------------------------------------------

    def _announce_rows(self, first: int) -> None:
        """on_concept_rows for the call's concept rows, laid out from row `first` concept by
        concept, image by image (the safety concept's row is not a concept's)."""
        call = self._call
        if self.on_concept_rows is None:
            return
        count = len(self.guidance.config.concepts)
        self.on_concept_rows({first + j * call.images + image: (concept, image)
                              for j, concept in enumerate(call.needed) if concept < count
                              for image in range(call.images)}, call)

    def _add_concept_rows(self, params, call_number: int) -> None:
        call = self._call
        k, b = len(call.needed), call.images
        tokens = token_count(params.text_cond)
        rows = []
        for index in call.needed:  # one by one: concepts may differ in length
            cond = self.webui.reconstruct_cond_batch([self.schedules[index]], call_number)
            rows.append(_rows_of(self._pad_to(cond, tokens), b))
        params.text_cond = self.webui.catenate_conds([params.text_cond] + rows)
        if isinstance(rows[0], dict) and not isinstance(params.text_cond, type(rows[0])):
            params.text_cond = type(rows[0])(params.text_cond)  # keep DictWithShape
        params.x = _insert_before_last(params.x, b, k)
        params.sigma = _insert_before_last(params.sigma, b, k)
        params.image_cond = _insert_before_last(params.image_cond, b, k)

    def _evaluate_concepts(self, inner_model) -> torch.Tensor:
        """The needed concepts' rows, [K, B, C, H, W], from model calls of their own with the
        uncond rows' inputs: one call per concept, or with a row limit, calls of at most
        max_rows rows (concept by concept, image by image; a call never mixes token lengths).
        """
        call = self._call
        conds = [self._concept_cond(index) for index in call.needed]
        b = call.images
        if not self.max_rows:
            return torch.stack([self._evaluate(inner_model, [(c, b)], slice(None)) for c in conds])
        rows = [(j, i) for j in range(len(conds)) for i in range(b)]
        outputs = []
        for chunk in row_chunks([token_count(conds[j]) for j, _ in rows], self.max_rows):
            chunk = rows[chunk]
            groups = [(conds[j], len(list(group)))
                      for j, group in itertools.groupby(chunk, key=lambda row: row[0])]
            outputs.append(self._evaluate(inner_model, groups, [i for _, i in chunk]))
        out = torch.cat(outputs)
        return out.view(len(conds), b, *out.shape[1:])

    def _concept_cond(self, index: int) -> Any:
        """A concept's one-row conditioning for this call, padded (and marked) as it would be
        among the prompt rows; in a separate call, a longer concept keeps its own length and
        gets only the mark."""
        call = self._call
        cond = self.webui.reconstruct_cond_batch([self.schedules[index]], call.denoiser.step)
        if self.separate_call and token_count(cond) >= call.tokens:
            return self._mark_like(cond, call.tokens)
        return self._pad_to(cond, call.tokens)

    def _evaluate(self, inner_model, groups: Sequence[Tuple[Any, int]], images) -> torch.Tensor:
        """One model call: `count` rows of each (cond, count) group, in order, whose inputs are
        those of the uncond rows of `images` (indices, or a slice)."""
        call = self._call
        conds = [_rows_of(cond, count) for cond, count in groups]
        cond = conds[0] if len(conds) == 1 else self.webui.catenate_conds(conds)
        if isinstance(conds[0], dict) and not isinstance(cond, type(conds[0])):
            cond = type(conds[0])(cond)  # keep DictWithShape
        condition = self.webui.condition(cond, call.image_cond[images])
        return inner_model(call.x[images], call.sigma[images], cond=condition)

    def _mark_like(self, conds: Any, tokens: int) -> Any:
        """`conds` with ControlNet's uncond mark where the prompt rows (`tokens` long) have one."""
        empty = self.webui.empty_cond()
        if _is_marked(tokens, empty) and not _is_marked(token_count(conds), empty):
            return _with_uncond_mark(conds)
        return conds

    def _pad_to(self, conds: Any, tokens: int) -> Any:
        conds = self._mark_like(conds, tokens)
        have, empty = token_count(conds), self.webui.empty_cond()
        if have == tokens:
            return conds
        repeats, rest = divmod(tokens - have, empty.shape[-2])
        if have > tokens or rest:
            self._fail(f"a concept has {have} tokens and the prompt {tokens}: concept rows "
                       "cannot be matched to the prompt rows")
        return self.webui.pad_cond(conds, repeats, empty)

    def _fail(self, why: str) -> None:
        """The rows are not as we laid them out: stop, rather than go on unguided."""
        self._call = None
        raise StopSampling(f"{why}. Another extension probably changes the model call's rows; "
                           "turn it or guidance off")


@contextlib.contextmanager
def _stop_on_error(guidance: PassGuidance, step: int, what: str):
    """Turns an error of ours during sampling into StopSampling, with words for the user."""
    try:
        yield
    except Exception as error:
        call, guidance._call = guidance._call, None
        rows = len(call.needed) * call.images if call is not None else 0
        raise StopSampling(sampling_failure(error, step=step, rows=rows, what=what)) from error


# ControlNet marks every prompt conditioning with one extra leading token filled with +1024
# (cond) or -1024 (uncond) so its UNet hook can tell rows apart (sd-webui-controlnet
# scripts/hook.py L22-24, L36-74). Concept rows get the uncond mark: a concept estimate must
# differ from the uncond estimate only by its text, so control acts on both alike.
UNCOND_MARK = -1024.0


def _is_marked(tokens: int, empty: torch.Tensor) -> bool:
    return tokens % empty.shape[-2] == 1


def _with_uncond_mark(cond: Any) -> Any:
    if isinstance(cond, dict):  # SDXL: only the cross-attention context is marked
        return type(cond)({**cond, "crossattn": _with_uncond_mark(cond["crossattn"])})
    return torch.cat([torch.zeros_like(cond[:, :1]) + UNCOND_MARK, cond], dim=1)


def _insert_before_last(t: torch.Tensor, last: int, repeats: int) -> torch.Tensor:
    """[head] + [t[-last:]] * repeats + [t[-last:]]: concept rows copy the uncond rows' inputs."""
    tail = t[-last:]
    return torch.cat([t[:-last]] + [tail] * repeats + [tail])
