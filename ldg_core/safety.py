"""Safe Latent Diffusion (SLD, arXiv 2211.05105), one sampling step at a time.

Follows the denoising loop of diffusers' StableDiffusionPipelineSafe operation for operation,
in eps space. Per step, with d = eps_text - eps_safety:

    weight   = where(d >= threshold, 0, min(|d| * scale, 1))          (eq. 6)
    term     = (eps_safety - eps_uncond) * weight + momentum_scale * m  (eq. 4, 7)
    m        = momentum_beta * m + (1 - momentum_beta) * term          (eq. 8, from step 0)
    guided   = eps_uncond + cfg * ((eps_text - eps_uncond) - term)      (eq. 3, step >= warmup)

so the edit returned here is -cfg * term from the warmup on, zero before it. SLD is off, and
its momentum untouched, when scale <= 1 or cfg <= 1, as in the reference. All tensor work is
on the estimates' device, with no host sync and no branching on tensor values.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional, Tuple

import torch

from .config import _as_float, _describe_short
from .guidance import _check_like, _check_pair, _check_same_pass, _check_step
from .safety_config import SafetyConfig


def momentum_matters(config: SafetyConfig) -> bool:
    # The buffer starts at zero and stays there when beta is 1; with a zero scale it is never
    # added to the term. Either way it cannot change an edit, so it need not be kept.
    return config.momentum_scale != 0 and config.momentum_beta != 1


def sld_active(config: SafetyConfig, guidance_scale: float) -> bool:
    """Whether SLD acts at a step with this CFG scale: the reference needs both scales > 1."""
    return config.enabled and guidance_scale > 1.0


def safety_term(config: SafetyConfig, uncond: torch.Tensor, cond: torch.Tensor,
                safety: torch.Tensor, momentum: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The safety term of one step and the momentum after it (None when it cannot matter).

    `momentum` is the buffer as of the start of the step (None: zeros). The momentum is added
    to the term first, then the buffer is updated from that sum, as in the reference.
    """
    difference = cond - safety
    weight = torch.clamp(difference.abs() * config.scale, max=1.0)
    weight = torch.where(difference >= config.threshold, torch.zeros_like(weight), weight)
    term = (safety - uncond) * weight
    if not momentum_matters(config):
        return term, None
    previous = torch.zeros_like(term) if momentum is None else momentum
    term = term + config.momentum_scale * previous
    beta = config.momentum_beta
    return term, beta * previous + (1 - beta) * term


class SafetyGuidance:
    """The state of one sampling pass of Safe Latent Diffusion.

    The guided estimate is  uncond + guidance_scale * (cond - uncond) + edit.
    """

    def __init__(self, config: SafetyConfig, *, end_step: Optional[int] = None,
                 observer: Optional[Callable[[torch.Tensor], None]] = None):
        """`end_step`: the step the pass ends before, if known; it lets needed() skip more.
        `observer(mask)`: sees, at each step where the term is applied, where the safety
        estimate steered (eps_text - eps_safety below the threshold) [B, C, H, W]."""
        if not isinstance(config, SafetyConfig):
            raise ValueError(f"SafetyGuidance needs a SafetyConfig, got {type(config).__name__}")
        if end_step is not None:
            _check_step_index("end_step", end_step)
        self.config = config
        self.end_step = end_step
        self.observer = observer
        self._step: Optional[int] = None
        self._momentum: Optional[torch.Tensor] = None  # as of the start of self._step
        self._pending: Optional[torch.Tensor] = None  # after self._step, from its latest call

    def needed(self, step: int, guidance_scale: Optional[float] = None) -> bool:
        """Whether the safety estimate at `step` can change any result of this pass.

        False when SLD is off (scale <= 1, or the given CFG scale <= 1), and before the warmup
        when the momentum cannot matter (momentum_scale 0, beta 1, or a pass that ends before
        the warmup). The CFG scale is an argument of every step() call, so it is taken here
        per step too; None (not known) assumes a CFG scale that enables SLD, which may ask
        for an estimate that was not needed but never leaves out one that was.
        """
        _check_step_index("step", step)
        if guidance_scale is not None and not sld_active(self.config, _cfg(guidance_scale)):
            return False
        if not self.config.enabled:
            return False
        if step >= self.config.warmup:
            return self.end_step is None or step < self.end_step
        return momentum_matters(self.config) and (
            self.end_step is None or self.config.warmup < self.end_step)

    def step(self, *, step: int, uncond: torch.Tensor, cond: torch.Tensor,
             safety: Optional[torch.Tensor], guidance_scale: float) -> torch.Tensor:
        """The edit for this step, in eps space, shaped like `uncond`.

        `safety` is the estimate for the safety concept; it may be None where
        needed(step, guidance_scale) is False. Inputs are never modified. Calls for the same
        step (two model calls per sampler step) all start from the state as of the start of
        that step; the last one's values carry on to the next step.
        """
        _check_step(step, self._step, self.end_step, engine="SafetyGuidance")
        step = int(step)
        scale = _cfg(guidance_scale)
        _check_pair(uncond, cond)
        needed = self.needed(step, scale)
        if safety is not None:
            _check_like("safety", safety, uncond)
        elif needed:
            raise ValueError(
                f"safety is None, but the safety estimate is needed at step {step} (see "
                "needed(step, guidance_scale))")
        if step != self._step:
            if self._step is not None:
                self._momentum = self._pending
            self._step = step
        self._pending = self._momentum
        if not needed:
            return torch.zeros_like(uncond)
        if self._momentum is not None:
            _check_same_pass(uncond, self._momentum, engine="SafetyGuidance")
        term, self._pending = safety_term(self.config, uncond, cond, safety, self._momentum)
        if step < self.config.warmup:
            return torch.zeros_like(uncond)
        if self.observer is not None:
            self.observer(cond - safety < self.config.threshold)
        return term * -scale


def _check_step_index(name: str, step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {step!r}")


def _cfg(guidance_scale: float) -> float:
    # A Python number, not a tensor: whether SLD acts is decided on the host, without a sync.
    number = _as_float(guidance_scale)
    if number is None:
        raise ValueError("guidance_scale must be a finite number (the CFG scale), got "
                         f"{_describe_short(guidance_scale)}")
    return number

