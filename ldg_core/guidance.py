"""Semantic Guidance (SEGA, arXiv 2301.12247), one sampling step at a time.

The math follows the denoising loop of diffusers' SemanticStableDiffusionPipeline operation for
operation (see ../shared/docs/guidance-algorithm.md), in eps space. Everything here is tensor
work on the estimates' own device: no host sync and no branching on tensor values, so it runs
inside a sampler's step without stalling an accelerator.
"""

from __future__ import annotations

import numbers
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from .config import Concept, GuidanceConfig

Estimates = Union[torch.Tensor, Sequence[torch.Tensor], None]


def is_cooled(concept: Concept, step: int) -> bool:
    return concept.cooldown is not None and step >= concept.cooldown


def momentum_matters(config: GuidanceConfig) -> bool:
    # The momentum buffer starts at zero and stays there when beta is 1; with a zero scale it is
    # never added. Either way it cannot change an edit, so it need not be computed.
    return config.momentum_scale != 0 and config.momentum_beta != 1


def concepts_needed(config: GuidanceConfig, step: int,
                    end_step: Optional[int] = None) -> Tuple[int, ...]:
    """Indices of the concepts whose estimate at `step` can change any edit, in order.

    A concept with scale 0 or weight <= 0 adds exactly zero at every step, a cooled one adds
    nothing, and before its warmup it only feeds the momentum buffer. That buffer is applied
    only once every concept is past its warmup: in a pass that ends (at `end_step`, when
    known) before then, it never matters.
    """
    full_phase = max((c.warmup for c in config.concepts), default=0)
    feeds_momentum = momentum_matters(config) and (end_step is None or full_phase < end_step)
    return tuple(
        index for index, c in enumerate(config.concepts)
        if c.scale != 0 and c.weight > 0 and not is_cooled(c, step)
        and (step >= c.warmup or feeds_momentum))


def masked_guidance(estimate: torch.Tensor, uncond: torch.Tensor, concept: Concept) -> torch.Tensor:
    """The concept's guidance term: its scaled direction where it is strongest, else zero.

    The quantile is taken per image and channel over H*W, after the scale, in float32 (what
    torch.quantile needs), and the comparison keeps ties, as the reference does.
    """
    return guidance_and_mask(estimate, uncond, concept)[0]


def guidance_and_mask(estimate: torch.Tensor, uncond: torch.Tensor,
                      concept: Concept) -> Tuple[torch.Tensor, torch.Tensor]:
    """masked_guidance's term, and its mask: where the concept passed its threshold."""
    direction = estimate - uncond
    if concept.reverse:
        direction = direction * -1
    direction = direction * concept.scale
    mask = at_or_above_quantile(direction.abs(), concept.threshold)
    return torch.where(mask, direction, torch.zeros_like(direction)), mask


def at_or_above_quantile(magnitude: torch.Tensor, threshold: float) -> torch.Tensor:
    """Where `magnitude` [B, C, H, W] is at or above its `threshold` quantile over H*W, per
    image and channel: taken in float32 (what torch.quantile needs), ties kept, as the
    references do."""
    flat = magnitude.flatten(start_dim=2)
    if flat.dtype != torch.float32:
        flat = flat.to(torch.float32)
    cutoff = torch.quantile(flat, threshold, dim=2).to(magnitude.dtype)
    return magnitude >= cutoff[:, :, None, None]


def _weights_in(dtype: torch.dtype, raw: Sequence[float], normalise: bool) -> list:
    """Weights clamped at 0 (and normalised) with the rounding of `dtype`, as the reference
    does them in a tensor of the estimates' dtype; computed on the host from the settings."""
    weights = torch.tensor(raw, dtype=dtype).clamp_min(0)
    total = weights.sum()
    if normalise and total > 0:  # all zero: the reference's 0 / 0, which we leave at zero
        weights = weights / total
    return weights.tolist()


def _weighted_sum(terms: Mapping[int, torch.Tensor], weights: Mapping[int, float],
                  like: torch.Tensor) -> torch.Tensor:
    total = torch.zeros_like(like)
    for index, term in terms.items():
        total.add_(term, alpha=weights[index])
    return total


def guidance_step(config: GuidanceConfig, step: int, uncond: torch.Tensor,
                  estimates: Mapping[int, torch.Tensor], momentum: Optional[torch.Tensor],
                  end_step: Optional[int] = None,
                  observer: Optional[Callable[[int, torch.Tensor], None]] = None
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One step of SEGA: (edit, momentum after this step).

    `estimates` maps concept index to its estimate and must hold every index of
    concepts_needed(config, step); others are ignored. `momentum` is the buffer as of the start
    of this step (None: zeros, the start of a pass). `observer(index, mask)`, if given, sees
    the threshold mask [B, C, H, W] of each concept that acts at this step (past its warmup,
    not cooled): what concept maps count.
    """
    concepts = config.concepts
    needed = concepts_needed(config, step, end_step)
    terms = {}
    for i in needed:
        terms[i], mask = guidance_and_mask(estimates[i], uncond, concepts[i])
        if observer is not None and step >= concepts[i].warmup:
            observer(i, mask)
    past_warmup = [i for i, c in enumerate(concepts) if step >= c.warmup]
    full_phase = len(past_warmup) == len(concepts)

    # Momentum and the full phase use the raw weights of every concept; cooled ones weigh 0.
    raw = [0.0 if is_cooled(c, step) else c.weight for c in concepts]
    weights = dict(enumerate(_weights_in(uncond.dtype, raw, normalise=False)))
    combined = _weighted_sum(terms, weights, uncond) if terms or full_phase else None

    next_momentum = None
    if momentum_matters(config):
        previous = torch.zeros_like(uncond) if momentum is None else momentum
        combined = combined if combined is not None else torch.zeros_like(uncond)
        combined = combined + config.momentum_scale * previous
        beta = config.momentum_beta
        next_momentum = beta * previous + (1 - beta) * combined

    if full_phase:
        return combined, next_momentum
    if not past_warmup:
        return torch.zeros_like(uncond), next_momentum
    # Partial phase: only the concepts past warmup, weights normalised over them, no momentum.
    # Where every weight here is 0 the reference divides 0 by 0 and its image turns NaN; we
    # apply no edit instead.
    normalised = _weights_in(uncond.dtype, [raw[i] for i in past_warmup], normalise=True)
    normalised = dict(zip(past_warmup, normalised))
    partial_terms = {i: t for i, t in terms.items() if i in normalised}
    return _weighted_sum(partial_terms, normalised, uncond), next_momentum


class SemanticGuidance:
    """The state of one sampling pass: feed it each step's estimates, get the edit back.

    The guided estimate is  uncond + guidance_scale * (cond - uncond) + edit.
    """

    def __init__(self, config: GuidanceConfig, *, end_step: Optional[int] = None,
                 observer: Optional[Callable[[int, torch.Tensor], None]] = None):
        """`end_step`: the step the pass ends before, if known; it lets needed() skip more.
        `observer(index, mask)`: sees each acting concept's threshold mask (concept maps)."""
        if not isinstance(config, GuidanceConfig):
            raise ValueError(f"SemanticGuidance needs a GuidanceConfig, got {type(config).__name__}")
        self.config = config
        self.end_step = end_step
        self.observer = observer
        self._step: Optional[int] = None
        self._momentum: Optional[torch.Tensor] = None  # as of the start of self._step
        self._pending: Optional[torch.Tensor] = None  # after self._step, from its latest call

    def needed(self, step: int) -> Tuple[int, ...]:
        """Concept indices whose estimates step() needs at `step`; only these need evaluating."""
        return concepts_needed(self.config, step, self.end_step)

    def step(self, *, step: int, uncond: torch.Tensor, cond: torch.Tensor,
             concepts: Estimates) -> torch.Tensor:
        """The edit for this step's estimates, in eps space, shaped like `uncond`.

        `concepts` is either every concept's estimate, [N, B, C, H, W] (or a list of N
        [B, C, H, W] tensors), or only those of needed(step), in that order, [K, B, C, H, W]
        (or K tensors; None or an empty tensor when K is 0). Inputs are never modified.
        Calls for the same step (two model calls per sampler step) all start from the state
        as of the start of that step; the last one's values carry on to the next step.
        """
        _check_step(step, self._step, self.end_step)
        step = int(step)
        _check_pair(uncond, cond)
        needed = self.needed(step)
        estimates = _by_index(concepts, needed, len(self.config.concepts), uncond)
        if step != self._step:
            if self._pending is not None:
                self._momentum = self._pending
            self._step = step
        if self._momentum is not None:
            _check_same_pass(uncond, self._momentum)
        edit, self._pending = guidance_step(self.config, step, uncond, estimates, self._momentum,
                                            self.end_step, self.observer)
        return edit


def _check_step(step: int, current: Optional[int], end_step: Optional[int],
                engine: str = "SemanticGuidance") -> None:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if end_step is not None and step >= end_step:
        raise ValueError(f"step {step} is past the end of this pass (end_step {end_step})")
    if current is not None and step < current:
        raise ValueError(
            f"step {step} came after step {current}: steps must not go back within one "
            f"sampling pass; use a new {engine} for each pass")


def _check_same_pass(uncond: torch.Tensor, momentum: torch.Tensor,
                     engine: str = "SemanticGuidance") -> None:
    if (uncond.shape, uncond.dtype, uncond.device) != (momentum.shape, momentum.dtype,
                                                         momentum.device):
        raise ValueError(
            f"uncond is {_describe_tensor(uncond)}, but this sampling pass started with "
            f"{_describe_tensor(momentum)}: use a new {engine} for each pass")


def _describe_tensor(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype} on {t.device}"


def _check_pair(uncond: torch.Tensor, cond: torch.Tensor) -> None:
    if not isinstance(uncond, torch.Tensor) or uncond.dim() != 4 or not uncond.is_floating_point():
        got = _describe_tensor(uncond) if isinstance(uncond, torch.Tensor) else type(uncond).__name__
        raise ValueError(f"uncond must be a floating-point tensor [B, C, H, W], got {got}")
    _check_like("cond", cond, uncond)


def _check_like(name: str, tensor: torch.Tensor, uncond: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a tensor like uncond ({_describe_tensor(uncond)}), "
                         f"got {type(tensor).__name__}")
    if (tensor.shape != uncond.shape or tensor.dtype != uncond.dtype
            or tensor.device != uncond.device):
        raise ValueError(f"{name} must match uncond ({_describe_tensor(uncond)}), "
                         f"got {_describe_tensor(tensor)}")


def _by_index(concepts: Estimates, needed: Tuple[int, ...], count: int,
              uncond: torch.Tensor) -> Dict[int, torch.Tensor]:
    """Maps concept index to estimate for the two accepted forms (all N, or the needed K)."""
    if concepts is None or (isinstance(concepts, torch.Tensor) and concepts.numel() == 0):
        rows = []
    elif isinstance(concepts, torch.Tensor):
        if concepts.dim() != 5:
            raise ValueError("concepts must be [N, B, C, H, W] or [K, B, C, H, W], got "
                             + _describe_tensor(concepts))
        rows = list(concepts.unbind(0))
    elif isinstance(concepts, (list, tuple)):
        rows = list(concepts)
    else:
        raise ValueError(f"concepts must be a tensor or a list of tensors, got "
                         f"{type(concepts).__name__}")
    if len(rows) == count:
        indices = range(count)
    elif len(rows) == len(needed):
        indices = needed
    else:
        raise ValueError(
            f"concepts holds {len(rows)} estimates; expected {count} (every concept) or "
            f"{len(needed)} (the concepts needed at this step: {list(needed)})")
    for index, row in zip(indices, rows):
        _check_like(f"concepts[{index}]" if len(rows) == count else f"the estimate of concept "
                    f"{index}", row, uncond)
    return dict(zip(indices, rows))
