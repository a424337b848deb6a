"""The toy model's pipelines: text-to-image (prompt -> conditioning -> sampler -> image), and
image-to-image with DPM++ 2M SDE, plain or keeping the image (LEDITS++ inversion, through the
same InvertingSampler as in the WebUI)."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file

from ..config import GuidanceConfig
from ..guidance import SemanticGuidance
from ..inversion import LeditsGuidance
from ..safety_config import SafetyConfig
from ..webui_inversion import InvertingSampler
from .host import SAMPLERS, CFGDenoiser, attach_guidance, attach_safety
from .model import LATENT_CHANNELS, LATENT_SIZE, ToyModel, image_to_latent, latent_to_image

WEIGHTS = os.path.join(os.path.dirname(__file__), "toy_model.safetensors")


class _EpsModel(torch.nn.Module):
    """The UNet as k-diffusion's DDPM wrappers call it: (x, t, cond=context) -> eps."""

    def __init__(self, model: ToyModel):
        super().__init__()
        self.model = model

    def forward(self, x, t, cond):
        return self.model(x, t, cond)


class ToyPipeline:
    def __init__(self, model: ToyModel):
        self.model = model.eval().requires_grad_(False)
        self._eps_model = _EpsModel(self.model)
        self._k_model = None  # k-diffusion's wrapper, made on first use (importing it is slow)

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        return self.model.encode([prompt])

    @torch.no_grad()
    def generate(self, prompt: str, *, seed: int, steps: int = 20, cfg_scale: float = 7.0,
                 sampler: str = "euler", guidance: Optional[GuidanceConfig] = None,
                 negative_prompt: str = "", safety: Optional[SafetyConfig] = None
                 ) -> np.ndarray:
        """uint8 [32, 32, 3]. The same arguments give the same image. `safety`: Safe Latent
        Diffusion away from its concept, alone or with `guidance` (their edits add)."""
        return self.generate_latent(prompt, seed=seed, steps=steps, cfg_scale=cfg_scale,
                                    sampler=sampler, guidance=guidance,
                                    negative_prompt=negative_prompt, safety=safety)[1]

    @torch.no_grad()
    def generate_latent(self, prompt, *, seed, steps=20, cfg_scale=7.0, sampler="euler",
                        guidance=None, negative_prompt="", observer=None, safety=None):
        """(latent, image); `observer(concept index, mask)` sees every mask the engine applies
        (ldg_core.concept_maps.ConceptMapRecorder.observe records concept maps)."""
        if safety is not None and not isinstance(safety, SafetyConfig):
            raise ValueError(f"safety must be a SafetyConfig or None, got {type(safety).__name__}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
        if not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps must be an integer of at least 2, got {steps!r}")
        cond, uncond = self.encode(prompt), self.encode(negative_prompt)
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((1, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE), generator=gen)
        ddim = sampler == "ddim"
        denoiser = CFGDenoiser(self._eps_model if ddim else self._k_diffusion_model(), steps)
        if guidance is not None:
            concepts = [self.encode(c.prompt) for c in guidance.concepts]
            attach_guidance(denoiser, guidance, sampler, 1, concepts, self.encode(""), steps,
                            observer)
        if safety is not None:
            attach_safety(denoiser, safety, sampler, self.encode(safety.concept), steps,
                          cfg_scale)
        args = {"cond": cond, "uncond": uncond, "cond_scale": cfg_scale}
        if ddim:
            latent = self._ddim(denoiser, noise, steps, args)
        else:
            latent = self._k_diffusion(denoiser, noise, steps, sampler, args, gen)
        return latent, latent_to_image(latent)[0].numpy()

    def _k_diffusion_model(self):
        if self._k_model is None:
            from k_diffusion.external import DiscreteEpsDDPMDenoiser
            self._k_model = DiscreteEpsDDPMDenoiser(self._eps_model, self.model.alphas_cumprod,
                                                    quantize=False)
        return self._k_model

    def _k_diffusion(self, denoiser, noise, steps, sampler, args, gen):
        import k_diffusion.sampling as k
        sigmas = self._k_model.get_sigmas(steps)
        function = getattr(k, SAMPLERS[sampler][0])
        extra = {}
        if sampler in ("euler_a", "dpmpp_2m_sde"):  # their fresh noise comes from the seed too
            extra["noise_sampler"] = lambda sigma, next_sigma: torch.randn(
                noise.shape, generator=gen)
        return function(denoiser, noise * sigmas[0], sigmas, extra_args=args, disable=True,
                        **extra)

    @torch.no_grad()
    def edit(self, image: np.ndarray, prompt: str, *, seed: int, steps: int = 20,
             strength: float = 0.75, cfg_scale: float = 7.0, keep_image: bool = True,
             guidance: Optional[GuidanceConfig] = None, negative_prompt: str = "") -> np.ndarray:
        """img2img of `image` (uint8 [32, 32, 3]) with DPM++ 2M SDE at denoising `strength`,
        as the WebUI runs it (the last int(strength * steps) + 1 sigmas of the schedule).
        keep_image: LEDITS++, the image is inverted first and the concepts edit it with
        LEDITS++'s edit; otherwise plain img2img, the concepts guided with SEGA."""
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength!r}")
        import k_diffusion.sampling as k
        x0 = image_to_latent(torch.from_numpy(np.ascontiguousarray(image))[None])
        k_model = self._k_diffusion_model()
        t_enc = int(min(strength, 0.999) * steps)
        schedule = k_model.get_sigmas(steps)[steps - t_enc - 1:]
        denoiser = CFGDenoiser(k_model, steps)
        denoiser.init_latent = x0
        if guidance is not None:
            concepts = [self.encode(c.prompt) for c in guidance.concepts]
            attach_guidance(denoiser, guidance, "dpmpp_2m_sde", 1, concepts, self.encode(""),
                            steps, t_enc=t_enc,
                            engine=LeditsGuidance if keep_image else SemanticGuidance)
        args = {"cond": self.encode(prompt), "uncond": self.encode(negative_prompt),
                "cond_scale": cfg_scale}
        sampler = _Sampler(k.sample_dpmpp_2m_sde)
        gen = torch.Generator().manual_seed(seed)
        extra = {}
        if keep_image:
            callbacks = denoiser.callbacks
            InvertingSampler(sampler, seeds=lambda: [seed], quiet=lambda on: setattr(
                denoiser, "callbacks", None if on else callbacks))
            x = x0  # replaced by the inverted start
        else:
            x = x0 + torch.randn(x0.shape, generator=gen) * schedule[0]
            extra["noise_sampler"] = lambda sigma, next_sigma: torch.randn(x0.shape, generator=gen)
        latent = sampler.func(denoiser, x, sigmas=schedule, extra_args=args, disable=True,
                              eta=1.0, **extra)
        return latent_to_image(latent)[0].numpy()

    def _ddim(self, denoiser, noise, steps, args):
        """DDIM with eta 0 on the WebUI's timesteps (sd_samplers_timesteps.py L94,
        sd_samplers_timesteps_impl.ddim): steps - 1 model calls."""
        alphas_cumprod = self.model.alphas_cumprod.double()
        timesteps = torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)
        alphas = alphas_cumprod[timesteps]
        alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))]
        x = noise
        for i in range(len(timesteps) - 1):
            index = len(timesteps) - 1 - i
            eps = denoiser(x, timesteps[index].expand(x.shape[0]), **args)
            a_t, a_prev = alphas[index].item(), alphas_prev[index].item()
            x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
            x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        return x


class _Sampler:
    """What InvertingSampler wraps: an object whose `func` is the sampler function."""

    def __init__(self, func):
        self.func = func


def load(path: str = WEIGHTS) -> ToyPipeline:
    """The shipped toy model on the CPU."""
    model = ToyModel()
    model.load_state_dict(load_file(path))
    return ToyPipeline(model)
