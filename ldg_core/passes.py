"""One sampling pass of guidance, whatever the host.

Every host asks the same questions at each model call: which step is this, which concepts must
be evaluated now, and what edit do these outputs give, in the sampler's own space. The answers
are here; how concept estimates are obtained (rows added to the host's call, a call of their
own, a batched conditioning list) and where the edit is added is each host's.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .clock import StepClock
from .config import GuidanceConfig
from .guidance import SemanticGuidance
from .safety import SafetyGuidance
from .safety_config import SafetyConfig
from .spaces import eps_from_output, output_change


class GuidancePass:
    """The engines' state for one pass, its step clock and the sampler's space.

    Rows are numbered as the host evaluates them: the SEGA concepts 0..N-1, then, with Safe
    Latent Diffusion on, its safety concept as row N. Both edits are computed in eps space,
    added, and turned into the sampler's space once.
    """

    def __init__(self, config: GuidanceConfig, *, clock: StepClock, eps_outputs: bool,
                 observer: Optional[Callable[[int, torch.Tensor], None]] = None,
                 safety: Optional[SafetyConfig] = None, guidance_scale: float = 7.0,
                 engine: Callable = SemanticGuidance):
        """`eps_outputs`: the sampler hands over eps (True) or x0 (False).
        `observer(index, mask)`: sees each acting concept's threshold mask (concept maps;
        index N for the safety concept). `safety`: Safe Latent Diffusion's settings, or None.
        `guidance_scale`: the CFG scale the host applies in this pass (SLD's s_g).
        `engine`: the concepts' method, SemanticGuidance or inversion.LeditsGuidance (the same
        interface)."""
        self.engine = engine(config, end_step=clock.end_step, observer=observer)
        self.safety = (None if safety is None else
                       SafetyGuidance(safety, end_step=clock.end_step,
                                      observer=None if observer is None else
                                      (lambda mask: observer(len(config.concepts), mask))))
        self.cfg_scale = float(guidance_scale)
        self.clock = clock
        self.eps_outputs = eps_outputs

    @property
    def config(self) -> GuidanceConfig:
        return self.engine.config

    def scale_at(self, denoiser) -> float:
        """The CFG scale of the denoiser's current call: the pass's, times the CFG denoiser's
        multiplier (DDIM CFG++ sets 1 / 12.5 on it when its sampling starts,
        sd_samplers_timesteps_impl)."""
        multiplier = getattr(denoiser, "cond_scale_miltiplier", 1.0)
        return self.cfg_scale * float(1.0 if multiplier is None else multiplier)

    @property
    def rows(self) -> int:
        """How many rows (conditionings) the pass may evaluate: concepts, then safety."""
        return len(self.config.concepts) + (self.safety is not None)

    def can_act(self) -> bool:
        """Whether any concept, or the safety concept, can change any edit in this pass."""
        first, end = self.clock.offset, self.clock.end_step
        return any(self.engine.needed(i) for i in range(first, end)) or (
            self.safety is not None and any(
                self.safety.needed(i, self.cfg_scale) for i in range(first, end)))

    def needed(self, step: int, scale: float) -> Tuple[int, ...]:
        """The rows to evaluate at `step` of a call at CFG scale `scale`, in order (the safety
        concept last)."""
        needed = self.engine.needed(step)
        if self.safety is not None and self.safety.needed(step, scale):
            needed += (len(self.config.concepts),)
        return needed

    def edit(self, step: int, *, rows: Sequence[int], scale: float, x: torch.Tensor,
             sigma: torch.Tensor, uncond: torch.Tensor, cond: torch.Tensor,
             concepts: Optional[torch.Tensor]) -> torch.Tensor:
        """The change of the combined output for this step's model outputs, at CFG scale
        `scale` (the call's, as needed() was asked).

        All outputs are for rows whose inputs were the images' `x` [B, C, H, W] and `sigma`
        [B]: `uncond` and `cond` [B, C, H, W] (`cond`: the prompt's estimate, the one the
        host's CFG scales), `concepts` [K, B, C, H, W] for the K `rows` (needed(step, scale),
        or every row; None when K is 0).
        """
        def eps(out):
            return eps_from_output(out, x, sigma, self.eps_outputs)
        count = len(self.config.concepts)
        estimates = None if concepts is None or len(concepts) == 0 else list(eps(concepts).unbind(0))
        safety = None
        if estimates is not None and self.safety is not None and rows[-1] == count:
            safety = estimates.pop()
        uncond, cond = eps(uncond), eps(cond)
        if count:
            edit = self.engine.step(step=step, uncond=uncond, cond=cond, concepts=estimates or None)
        else:
            edit = torch.zeros_like(uncond)
        if self.safety is not None:
            edit = edit + self.safety.step(step=step, uncond=uncond, cond=cond, safety=safety,
                                           guidance_scale=scale)
        return output_change(edit, sigma, self.eps_outputs)


def row_chunks(keys: Sequence, max_rows: int) -> List[slice]:
    """Consecutive runs of rows, at most `max_rows` long (0: no limit), each of one key (rows
    of different token lengths cannot share a model call)."""
    chunks, start = [], 0
    while start < len(keys):
        end = start + 1
        while end < len(keys) and (not max_rows or end - start < max_rows) \
                and keys[end] == keys[start]:
            end += 1
        chunks.append(slice(start, end))
        start = end
    return chunks
