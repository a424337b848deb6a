"""LEDITS++ in the WebUI's img2img: invert the init image with the sampler's own step, then
sample from what the inversion found.

The WebUI's img2img sampling ends in one call of the sampler function (`sampler.func`, from
launch_sampling in sample_img2img: sd_samplers_kdiffusion.py L134-187,
sd_samplers_timesteps.py L98-139), with the CFG denoiser, the schedule of the pass and the
init latents already set on the denoiser. While the mode is on, that function is wrapped:
  1. the init latents are inverted (ldg_core.inversion) on that schedule: one call of the
     WebUI's own CFG denoiser per step, at the noised image, with the call counter and the
     sampling step the sampler's own call has there, so prompt schedules, ControlNet's step
     window and the mask blend act on the inversion as on the sampling that follows;
  2. the sampler runs from the inverted start with the noise maps in place of its random
     noise (DDIM: k_diffusion.sampling.torch.randn_like, which the WebUI's DDIM calls,
     sd_samplers_timesteps_impl.py L33; DPM++ 2M SDE: the noise_sampler argument), eta 1.
Without concepts the result is the init latents, up to float rounding.

With a cross-attention mask ("attention", "both"), AttentionMasks records the concept rows'
attention in the UNet's attn2 layers (ldg_core.cross_attention) at the calls that evaluate them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .cross_attention import CrossAttentionRecorder
from .failures import StopSampling, sampling_failure
from .inversion import DDIMRule, DPMpp2MSDERule, NoiseMaps, invert

# The samplers whose noise can be solved for: a noise term added once per step, after a
# deterministic update of the step's one model output. DPM++ 2M SDE Heun differs from DPM++ 2M
# SDE only in its second-order correction, which is deterministic too.
SUPPORTED_SAMPLERS = ("DDIM", "DPM++ 2M SDE", "DPM++ 2M SDE Heun")


def sampler_problem(name: str) -> Optional[str]:
    if name in SUPPORTED_SAMPLERS:
        return None
    return (f"'Keep the image' (LEDITS++ inversion) needs a sampler whose random noise can be "
            f"solved for, one of {', '.join(SUPPORTED_SAMPLERS)}; {name!r} is not one of them")


def ddim_rule(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor,
              eta: float = 1.0) -> DDIMRule:
    """The WebUI DDIM's numbers for its steps over `timesteps`, computed as ddim() computes
    them (sd_samplers_timesteps_impl.py L12-16, L23-28), so inversion and sampling round alike:
    step i uses index len(timesteps) - 1 - i."""
    float64 = torch.float32 if like.device.type in ("mps", "xpu") else torch.float64
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(float64)
    sqrt_one_minus = torch.sqrt(1 - alphas)
    sigmas = eta * np.sqrt((1 - alphas_prev.cpu().numpy()) / (1 - alphas.cpu())
                           * (1 - alphas.cpu() / alphas_prev.cpu().numpy()))
    order = range(len(timesteps) - 1, 0, -1)
    return DDIMRule([alphas[i].item() for i in order], [alphas_prev[i].item() for i in order],
                    [sigmas[i].item() for i in order], [sqrt_one_minus[i].item() for i in order])


class _NoiseMapsAsRandom:
    """Stands in for k_diffusion.sampling.torch while the WebUI's DDIM runs: its randn_like
    returns the next noise map; everything else is torch's."""

    def __init__(self, maps: NoiseMaps):
        self._maps = iter(maps.noise)

    def randn_like(self, x):
        return next(self._maps)

    def __getattr__(self, name):
        return getattr(torch, name)


class _AddResidualAtLast:
    """The CFG denoiser, with NoiseMaps.residual added to its output at its last call (DPM++
    2M SDE's last step returns that output as the image). The denoiser's own call counter
    says which call that is: comparing sigmas on the device would stall it at every step."""

    def __init__(self, model, residual: torch.Tensor, last_call: int):
        self._model, self._residual, self._last_call = model, residual, last_call

    def __call__(self, x, sigma, **kwargs):
        last = self._model.step == self._last_call  # the counter before this call counts it
        out = self._model(x, sigma, **kwargs)
        return out + self._residual if last else out

    def __getattr__(self, name):
        return getattr(self._model, name)


def image_noise(seeds, x0: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """Each step's noise for the noised images: per image, a generator of the image's seed,
    so an image inverts the same whether it is alone or in a batch."""
    generators = [torch.Generator().manual_seed(int(seed) + 1) for seed in seeds]

    def noise(step: int) -> torch.Tensor:
        return torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators]).to(
            x0.device, x0.dtype)
    return noise


class InvertingSampler:
    """Wraps one WebUI sampler's function for the passes of one generation."""

    def __init__(self, sampler: Any, seeds: Callable[[], Any],
                 quiet: Callable[[bool], None], state: Any = None):
        """`seeds()`: the current batch's seeds. `quiet(on)`: tells guidance that the calls
        now made are the inversion's (no edit there). `state`: the WebUI's shared.state, whose
        sampling_step the callbacks report."""
        self.sampler, self.seeds, self.quiet, self.state = sampler, seeds, quiet, state
        if not callable(vars(sampler).get("func")):
            raise ValueError("'Keep the image' (LEDITS++ inversion) wraps the sampler's own "
                             "function, and this sampler has none; choose DDIM or DPM++ 2M SDE")
        self.original = sampler.__dict__["func"]
        self.last_maps_bytes = 0  # the benchmark reports it

        def run(model, x, *args, **kwargs):
            if getattr(sampler, "ldg_inverting", False):
                # A wrapper of ours that another extension wrapped in turn, from an earlier
                # batch: the outer one inverts, this one only passes the call on.
                return self.original(model, x, *args, **kwargs)
            sampler.ldg_inverting = True
            try:
                return self._run(model, x, *args, **kwargs)
            finally:
                sampler.ldg_inverting = False
        # The WebUI picks the arguments it passes by the function's signature
        # (inspect.signature(self.func), sd_samplers_kdiffusion.py L151): keep the original's.
        self.wrapper = functools.update_wrapper(run, self.original)
        sampler.func = self.wrapper

    def restore(self) -> None:
        if self.sampler.__dict__.get("func") is self.wrapper:
            self.sampler.func = self.original

    def _run(self, model, x, *args, **kwargs):
        timesteps = kwargs.get("timesteps")
        x0 = model.init_latent
        if timesteps is not None:  # the WebUI's DDIM: eps outputs at timesteps
            rule = ddim_rule(model.inner_model.inner_model.alphas_cumprod, timesteps, x0)
            times = [timesteps[len(timesteps) - 1 - i].item() for i in range(rule.steps)]
        else:  # k-diffusion: denoised outputs at sigmas
            sigmas = kwargs["sigmas"]
            rule = DPMpp2MSDERule(sigmas, kwargs.get("solver_type", "midpoint"))
            times = [sigmas[i] for i in range(rule.steps)]
        extra_args = kwargs.get("extra_args") or {}
        s_in = x0.new_ones((x0.shape[0],))

        def call(step: int, latent: torch.Tensor) -> torch.Tensor:
            model.step = step  # the call counter the sampler's own call would have here
            if self.state is not None:  # and the step its callback would have reported
                self.state.sampling_step = max(step - 1, 0)  # (callback_state, L256-263)
            return model(latent, times[step] * s_in, **extra_args)

        self.quiet(True)
        try:
            maps = invert(rule, x0, call, image_noise(self.seeds(), x0))
        except Exception as error:  # sd_samplers_common.InterruptedException is not one
            raise StopSampling(sampling_failure(error, step=model.step, rows=0,
                                                what="inverting the image")) from error
        finally:
            self.quiet(False)
            model.step = 0
            if self.state is not None:
                self.state.sampling_step = 0
        self.last_maps_bytes = maps.nbytes()
        kwargs["eta"] = 1.0
        if "s_noise" in kwargs:
            kwargs["s_noise"] = 1.0
        # The image's parameters: not the eta or extra noise the user set, which had no effect.
        for key in ("Eta DDIM", "Eta", "Extra noise"):
            getattr(getattr(model, "p", None), "extra_generation_params", {}).pop(key, None)
        if timesteps is not None:
            return self._run_ddim(model, maps, args, kwargs)
        stream = iter(z for z in maps.noise if z is not None)
        kwargs["noise_sampler"] = lambda sigma, sigma_next: next(stream)
        if maps.residual is not None:
            model = _AddResidualAtLast(model, maps.residual, rule.steps - 1)
        return self.original(model, maps.start, *args, **kwargs)

    def _run_ddim(self, model, maps: NoiseMaps, args, kwargs: Dict[str, Any]):
        import k_diffusion.sampling  # the WebUI's DDIM draws its noise through this module

        hijack = k_diffusion.sampling.torch
        k_diffusion.sampling.torch = _NoiseMapsAsRandom(maps)
        try:
            return self.original(model, maps.start, *args, **kwargs)
        finally:
            k_diffusion.sampling.torch = hijack


# -- the cross-attention mask ------------------------------------------------------------------

# The UNet's blocks by their module names: ldm's and sgm's UNetModel, which the WebUI runs
# (openaimodel.py: input_blocks, middle_block, output_blocks), and diffusers' names (the UNet
# of the test double).
BLOCK_PLACES = {"input_blocks": "down", "middle_block": "mid", "output_blocks": "up",
                "down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}
MASK_TOKENS = 75  # one chunk of the WebUI's prompt encoding: tokens 1..75, after the start


def cross_attention_layers(unet: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """(place, module) for the UNet's cross-attention layers (attn2), in call order."""
    return [(BLOCK_PLACES.get(name.split(".")[0], "other"), module)
            for name, module in unet.named_modules() if name.rsplit(".", 1)[-1] == "attn2"]


TokenSchedule = List[Tuple[int, int]]  # (end_at_step, token count) per text of a schedule


def concept_tokens(prompt: str, steps: int, prompt_parser: Any,
                   count: Callable[[str], int]) -> TokenSchedule:
    """A concept's token count for each text of its prompt schedule (prompt_parser.py
    L28-135), counted as the WebUI's token counter counts (sd_hijack.get_prompt_lengths)."""
    schedules = prompt_parser.get_learned_conditioning_prompt_schedules([prompt], steps)
    return [(end, count(text)) for end, text in schedules[0]]


def tokens_at(schedule: TokenSchedule, step: int) -> int:
    """The count of the text the concept's conditioning has at call `step`, picked as
    reconstruct_cond_batch picks it (prompt_parser.py L270-304: the first entry whose end is
    at or after the step, else the first)."""
    return next((count for end, count in schedule if step <= end), schedule[0][1])


def mask_token_problem(tokens: Sequence[TokenSchedule]) -> Optional[str]:
    for number, schedule in enumerate(tokens, start=1):
        count = max(count for _, count in schedule)
        if count > MASK_TOKENS:
            return (f"concept {number} has {count} tokens, and the cross-attention mask reads "
                    f"at most {MASK_TOKENS} (one chunk of the prompt encoding; a BREAK ends a "
                    "chunk early): shorten it, or choose the noise mask")
    return None


class AttentionMasks:
    """The cross-attention mask for one pass: a recorder on the WebUI's UNet, armed for the
    concept rows of each CFG denoiser call (PassGuidance.on_concept_rows)."""

    def __init__(self, unet: torch.nn.Module, tokens: Sequence[TokenSchedule], timesteps: bool,
                 need_timestep: bool):
        """`tokens`: each concept's token counts (concept_tokens); `timesteps`: the sampler's
        denoiser gets timesteps (DDIM), not sigmas; `need_timestep`: the mask ("both") reads
        the timestep."""
        self.recorder = CrossAttentionRecorder(unet, cross_attention_layers(unet))
        self.tokens = dict(enumerate(tokens))
        self.timesteps, self.need_timestep = timesteps, need_timestep
        self.images, self.timestep = 0, None

    def arm(self, rows: Dict[int, Tuple[int, int]], call: Any) -> None:
        self.images = call.images
        step = call.denoiser.step  # the call number the concepts' conditioning is picked by
        tokens = {concept: tokens_at(schedule, step) for concept, schedule in self.tokens.items()}
        self.recorder.arm(rows, tokens, tuple(call.x.shape[-2:]))
        if self.need_timestep:  # for "both": kept on the device, no read back
            sigma = call.sigma[:1]
            self.timestep = sigma if self.timesteps else call.denoiser.inner_model.sigma_to_t(sigma)

    def attention(self, concept: int) -> torch.Tensor:
        return self.recorder.attention(concept, self.images)
