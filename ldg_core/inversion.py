"""LEDITS++ (arXiv 2311.16711): edit a real image by inverting it, then guiding.

A stochastic sampler steps  x_next = mean(x, model output) + scale * z  with fresh noise z.
Edit-friendly inversion (Huberman-Spiegelglas et al., arXiv 2304.06140, as diffusers'
LEditsPPPipelineStableDiffusion.invert does it) noises the image independently to every
step's noise level, then solves each step's z so that the sampler, fed those z, lands on the
next noised image. Sampling again with the same z and no edit reproduces the image; concepts
added on top change only what they touch.

A rule is one sampler's update in that sampler's own arithmetic, so that the latents the
inversion computes are, bit for bit, those the host's sampler computes from the same inputs:
  DDIMRule         the WebUI's DDIM with eta 1 (sd_samplers_timesteps_impl.py ddim), eps
                   outputs, latents x = sqrt(a) x0 + sqrt(1 - a) eps; diffusers' DDIMScheduler
                   takes the same step.
  DPMpp2MSDERule   k-diffusion's sample_dpmpp_2m_sde (sampling.py), denoised outputs, latents
                   x = x0 + sigma eps; diffusers' DPMSolverMultistepScheduler with
                   "sde-dpmsolver++", order 2, takes the same step in its own latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Sequence

import torch

from .config import Concept
from .config import check_mask
from .cross_attention import ATTENTION_ONLY_ABOVE_TIMESTEP, attention_mask
from .guidance import _by_index, _check_pair, at_or_above_quantile, is_cooled


class DDIMRule:
    """DDIM with noise, one step per timestep pair. The per-step numbers are the host's own:
    `alphas[i]` (a_t), `alphas_prev[i]` (a_prev), `sigmas[i]` (the noise's scale) and
    `sqrt_one_minus[i]` (sqrt(1 - a_t)) for the i-th step taken, as python floats."""

    eps_outputs = True

    def __init__(self, alphas: Sequence[float], alphas_prev: Sequence[float],
                 sigmas: Sequence[float], sqrt_one_minus: Sequence[float]):
        if not len(alphas) == len(alphas_prev) == len(sigmas) == len(sqrt_one_minus):
            raise ValueError("DDIMRule needs one of each number per step")
        if any(s <= 0 for s in sigmas):
            raise ValueError("DDIM inversion needs noise at every step (eta > 0)")
        self.alphas, self.alphas_prev = list(alphas), list(alphas_prev)
        self.sigmas, self.sqrt_one_minus = list(sigmas), list(sqrt_one_minus)

    @classmethod
    def from_schedule(cls, alphas: Sequence[float], alphas_prev: Sequence[float],
                      eta: float = 1.0) -> "DDIMRule":
        """From a_t and a_prev per step, with DDIM's noise scale (arXiv 2010.02502 eq. 16)."""
        sigmas = [eta * math.sqrt((1 - p) / (1 - a) * (1 - a / p))
                  for a, p in zip(alphas, alphas_prev)]
        return cls(alphas, alphas_prev, sigmas, [math.sqrt(1 - a) for a in alphas])

    @property
    def steps(self) -> int:
        return len(self.alphas)

    def reset(self) -> None:
        pass  # one-step method: nothing carries over

    def noised(self, x0: torch.Tensor, step: int, noise: torch.Tensor) -> torch.Tensor:
        """The image at step `step`'s noise level."""
        a = self.alphas[step]
        return x0 * math.sqrt(a) + noise * math.sqrt(1 - a)

    @staticmethod
    def _per_image(value: float, like: torch.Tensor) -> torch.Tensor:
        """`value` as the host's DDIM has it: times ones of the latents' dtype, [B, 1, 1, 1]."""
        return value * like.new_ones((like.shape[0], 1, 1, 1))

    def mean(self, step: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a_t, a_prev, sigma_t, sqrt_one_minus_at = (
            self._per_image(values[step], x) for values in
            (self.alphas, self.alphas_prev, self.sigmas, self.sqrt_one_minus))
        pred_x0 = (x - sqrt_one_minus_at * eps) / a_t.sqrt()
        dir_xt = (1. - a_prev - sigma_t ** 2).sqrt() * eps
        return a_prev.sqrt() * pred_x0 + dir_xt

    def has_noise(self, step: int) -> bool:
        return True

    def add_noise(self, step: int, mean: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return mean + self._per_image(self.sigmas[step], mean) * z

    def solve_noise(self, step: int, mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (target - mean) / self._per_image(self.sigmas[step], mean)


class DPMpp2MSDERule:
    """DPM-Solver++(2M) SDE with eta 1 and s_noise 1, on k-diffusion's sigmas (a tensor whose
    last entry is 0, where the step returns the denoised estimate and adds no noise)."""

    eps_outputs = False

    def __init__(self, sigmas: torch.Tensor, solver_type: str = "midpoint"):
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
        self.sigmas, self.solver_type = sigmas, solver_type
        self.reset()

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def reset(self) -> None:
        self._old_denoised, self._h_last = None, None

    def noised(self, x0: torch.Tensor, step: int, noise: torch.Tensor) -> torch.Tensor:
        return x0 + noise * self.sigmas[step].to(x0.device, x0.dtype)

    def mean(self, step: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        """sample_dpmpp_2m_sde's step before its noise; call once per step, in order."""
        sigmas = self.sigmas
        if sigmas[step + 1] == 0:
            result, h = denoised, None
        else:
            t, s = -sigmas[step].log(), -sigmas[step + 1].log()
            h = s - t
            eta_h = h  # eta 1
            result = sigmas[step + 1] / sigmas[step] * (-eta_h).exp() * x \
                + (-h - eta_h).expm1().neg() * denoised
            if self._old_denoised is not None:
                r = self._h_last / h
                if self.solver_type == "heun":
                    result = result + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) \
                        * (1 / r) * (denoised - self._old_denoised)
                else:
                    result = result + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) \
                        * (denoised - self._old_denoised)
        self._old_denoised, self._h_last = denoised, h
        return result

    def has_noise(self, step: int) -> bool:
        return bool(self.sigmas[step + 1] != 0)

    def _noise_factors(self, step: int):
        t, s = -self.sigmas[step].log(), -self.sigmas[step + 1].log()
        eta_h = s - t  # eta 1
        return self.sigmas[step + 1], (-2 * eta_h).expm1().neg().sqrt()

    def add_noise(self, step: int, mean: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        sigma_next, factor = self._noise_factors(step)
        return mean + z * sigma_next * factor * 1.0  # "* s_noise", as the host rounds it

    def solve_noise(self, step: int, mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sigma_next, factor = self._noise_factors(step)
        return (target - mean) / (sigma_next * factor)


@dataclass
class NoiseMaps:
    """What sampling needs to land on the image: the first latent, each step's noise (None
    where the step adds none) and what the last step falls short of the image (DPM++ 2M SDE's
    last step returns the denoised estimate: adding `residual` to it gives the image back)."""

    start: torch.Tensor
    noise: List[Optional[torch.Tensor]]
    residual: Optional[torch.Tensor] = None

    def nbytes(self) -> int:
        tensors = [self.start, self.residual] + self.noise
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def invert(rule, x0: torch.Tensor, model: Callable[[int, torch.Tensor], torch.Tensor],
           noise: Callable[[int], torch.Tensor]) -> NoiseMaps:
    """Edit-friendly inversion of the latents `x0` [B, C, H, W] under `rule`.

    `model(step, x)` is the model's output at step `step` (the sampler's combined estimate:
    what the host's sampler gets from its denoiser there), `noise(step)` the random noise that
    sets the noised image at step `step`'s level (drawn once per step, in step order). One
    model call per step; only one noised image is held at a time.
    """
    if rule.steps == 0:  # a pass with no step (DDIM at the lowest strengths) returns its start
        return NoiseMaps(start=x0.clone(), noise=[])
    rule.reset()
    x = start = rule.noised(x0, 0, noise(0))
    maps: List[Optional[torch.Tensor]] = []
    residual = None
    for step in range(rule.steps):
        mean = rule.mean(step, x, model(step, x))
        last = step + 1 == rule.steps
        target = x0 if last else rule.noised(x0, step + 1, noise(step + 1))
        if rule.has_noise(step):
            z = rule.solve_noise(step, mean, target)
            x = rule.add_noise(step, mean, z)  # the host's own rounding: no drift
        else:
            z, residual = None, target - mean
            x = mean + residual
        maps.append(z)
    rule.reset()
    return NoiseMaps(start=start, noise=maps, residual=residual)


# -- LEDITS++'s edit term ------------------------------------------------------------------------

def ledits_mask(term: torch.Tensor, threshold: float) -> torch.Tensor:
    """Where a concept's scaled direction is strongest: its magnitude summed over channels,
    at or above the `threshold` quantile of each image's H*W positions, for every channel
    (LEDITS++'s noise mask; SEGA's is per channel)."""
    magnitude = term.abs().sum(dim=1, keepdim=True).repeat(1, term.shape[1], 1, 1)
    return at_or_above_quantile(magnitude, threshold)


def concepts_acting(concepts: Sequence[Concept], step: int) -> List[int]:
    """The concepts whose term is not zero at `step`: past warmup, not cooled, a scale and a
    weight above 0 (a weight at or below 0 leaves the concept out, as in SEGA)."""
    return [i for i, c in enumerate(concepts)
            if step >= c.warmup and not is_cooled(c, step) and c.scale != 0 and c.weight > 0]


def ledits_edit(concepts: Sequence[Concept], step: int, uncond: torch.Tensor,
                estimates: Mapping[int, torch.Tensor],
                observer: Optional[Callable[[int, torch.Tensor], None]] = None, *,
                mask: str = "noise", attention: Optional[Callable[[int], torch.Tensor]] = None,
                timestep: Optional[float] = None) -> torch.Tensor:
    """LEDITS++'s edit at `step`, in eps: the sum over the acting concepts of their scaled
    direction from `uncond`, kept where the concept's mask is true, times the concept's weight
    (1 in the reference). `estimates` maps concept index to eps for concepts_acting(concepts,
    step). `mask` (one of config.MASKS): "noise", ledits_mask; "attention", the
    cross-attention mask of `attention(i)`, concept i's map [B, h, w]; "both", their
    intersection, or the attention mask alone while `timestep` (the step's model timestep, a
    number or a one-element tensor, read on its device) is above ATTENTION_ONLY_ABOVE_TIMESTEP,
    as the reference's use_intersect_mask does.
    """
    check_mask(mask)
    if mask == "both" and timestep is None:
        raise ValueError("the mask 'both' needs the step's timestep")
    if mask == "both":  # no host branch on the timestep: it may sit on the device
        noisy = (torch.as_tensor(timestep, device=uncond.device)
                 > ATTENTION_ONLY_ABOVE_TIMESTEP).reshape(-1)[0]
    edit = torch.zeros_like(uncond)
    for i in concepts_acting(concepts, step):
        concept = concepts[i]
        term = estimates[i] - uncond
        if concept.reverse:
            term = term * -1
        term = term * concept.scale
        if mask == "noise":
            keep = ledits_mask(term, concept.threshold)
        else:
            keep = attention_mask(attention(i), concept.threshold, term.shape[-2:], term.shape[1])
        if mask == "both":  # the attention mask alone while the step is noisy
            keep = keep & (ledits_mask(term, concept.threshold) | noisy)
        if observer is not None:
            observer(i, keep)
        term = torch.where(keep, term, torch.zeros_like(term))
        edit += term if concept.weight == 1 else term * concept.weight
    return edit


class LeditsGuidance:
    """LEDITS++'s edit for one sampling pass, with SemanticGuidance's interface (needed(),
    step()), so a host pass can use either. No state carries between steps: LEDITS++ has no
    momentum. With a cross-attention mask, the host hands over where the step's maps come from
    (use_attention)."""

    def __init__(self, config, *, end_step: Optional[int] = None,
                 observer: Optional[Callable[[int, torch.Tensor], None]] = None):
        # end_step: part of the interface; with no state across steps nothing depends on it
        self.config, self.end_step, self.observer = config, end_step, observer
        self.mask = "noise"
        self._attention: Optional[Callable[[int], torch.Tensor]] = None
        self._timestep: Optional[Callable[[], float]] = None

    def use_attention(self, mask: str, attention: Callable[[int], torch.Tensor],
                      timestep: Callable[[], Any]) -> None:
        """`attention(i)`: concept i's map at the current step; `timestep()`: its timestep."""
        check_mask(mask)
        self.mask, self._attention, self._timestep = mask, attention, timestep

    def needed(self, step: int):
        return tuple(concepts_acting(self.config.concepts, step))

    def step(self, *, step: int, uncond: torch.Tensor, cond: torch.Tensor,
             concepts) -> torch.Tensor:
        _check_pair(uncond, cond)
        estimates = _by_index(concepts, self.needed(step), len(self.config.concepts), uncond)
        timestep = self._timestep() if self.mask == "both" else None
        return ledits_edit(self.config.concepts, step, uncond, estimates, self.observer,
                           mask=self.mask, attention=self._attention, timestep=timestep)
