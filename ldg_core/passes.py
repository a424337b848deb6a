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
from .guidance import SemanticGuidance, concepts_needed
from .spaces import eps_from_output, output_change


class GuidancePass:
    """The engine's state for one pass, its step clock and the sampler's space."""

    def __init__(self, config: GuidanceConfig, *, clock: StepClock, eps_outputs: bool,
                 observer: Optional[Callable[[int, torch.Tensor], None]] = None):
        """`eps_outputs`: the sampler hands over eps (True) or x0 (False).
        `observer(index, mask)`: sees each acting concept's threshold mask (concept maps)."""
        self.engine = SemanticGuidance(config, end_step=clock.end_step, observer=observer)
        self.clock = clock
        self.eps_outputs = eps_outputs

    @property
    def config(self) -> GuidanceConfig:
        return self.engine.config

    def can_act(self) -> bool:
        """Whether any concept can change any edit in this pass's steps."""
        return can_act(self.config, self.clock.offset, self.clock.end_step)

    def needed(self, step: int) -> Tuple[int, ...]:
        """The concepts to evaluate at `step`, in order."""
        return self.engine.needed(step)

    def edit(self, step: int, *, x: torch.Tensor, sigma: torch.Tensor, uncond: torch.Tensor,
             cond: torch.Tensor, concepts: Optional[torch.Tensor]) -> torch.Tensor:
        """The change of the combined output for this step's model outputs.

        All outputs are for rows whose inputs were the images' `x` [B, C, H, W] and `sigma`
        [B]: `uncond` and `cond` [B, C, H, W], `concepts` [K, B, C, H, W] for needed(step)
        (None when K is 0).
        """
        def eps(out):
            return eps_from_output(out, x, sigma, self.eps_outputs)
        edit = self.engine.step(step=step, uncond=eps(uncond), cond=eps(cond),
                                concepts=None if concepts is None else eps(concepts))
        return output_change(edit, sigma, self.eps_outputs)


def can_act(config: GuidanceConfig, first_step: int, end_step: int) -> bool:
    """Whether any concept can change any edit in steps [first_step, end_step)."""
    return any(concepts_needed(config, i, end_step) for i in range(first_step, end_step))


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
