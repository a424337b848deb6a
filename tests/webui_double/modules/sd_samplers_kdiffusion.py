"""modules/sd_samplers_kdiffusion.py (v1.10.1): the sampler table (L11-27, without Restart),
CFGDenoiserKDiffusion (L55-67), get_sigmas (L79-133, default schedulers only),
sample_img2img (L135-187) and sample (L189-236), driving the real k-diffusion samplers; the
eta that Sampler.initialize passes (sd_samplers_common.py L293, L303-307)."""
import inspect

import k_diffusion.external
import k_diffusion.sampling
import torch

from modules import sd_samplers_cfg_denoiser, sd_samplers_common, shared

samplers_k_diffusion = [
    ('DPM++ 2M', 'sample_dpmpp_2m', {'scheduler': 'karras'}),
    ('DPM++ SDE', 'sample_dpmpp_sde', {'scheduler': 'karras', "second_order": True, "brownian_noise": True}),
    ('DPM++ 2M SDE', 'sample_dpmpp_2m_sde', {'scheduler': 'exponential', "brownian_noise": True}),
    ('DPM++ 2M SDE Heun', 'sample_dpmpp_2m_sde', {'scheduler': 'exponential', "brownian_noise": True, "solver_type": "heun"}),
    ('DPM++ 2S a', 'sample_dpmpp_2s_ancestral', {'scheduler': 'karras', "uses_ensd": True, "second_order": True}),
    ('DPM++ 3M SDE', 'sample_dpmpp_3m_sde', {'scheduler': 'exponential', 'discard_next_to_last_sigma': True, "brownian_noise": True}),
    ('Euler a', 'sample_euler_ancestral', {"uses_ensd": True}),
    ('Euler', 'sample_euler', {}),
    ('LMS', 'sample_lms', {}),
    ('Heun', 'sample_heun', {"second_order": True}),
    ('DPM2', 'sample_dpm_2', {'scheduler': 'karras', 'discard_next_to_last_sigma': True, "second_order": True}),
    ('DPM2 a', 'sample_dpm_2_ancestral', {'scheduler': 'karras', 'discard_next_to_last_sigma': True, "uses_ensd": True, "second_order": True}),
    ('DPM fast', 'sample_dpm_fast', {"uses_ensd": True}),
    ('DPM adaptive', 'sample_dpm_adaptive', {"uses_ensd": True}),
]


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            model = shared.sd_model
            denoiser = k_diffusion.external.CompVisVDenoiser if model.parameterization == "v" else k_diffusion.external.CompVisDenoiser
            self.model_wrap = denoiser(model)
        return self.model_wrap


class KDiffusionSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model):
        super().__init__(funcname)
        self.func = getattr(k_diffusion.sampling, funcname)
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_sigmas(self, p, steps):
        discard = self.config.options.get('discard_next_to_last_sigma', False)
        steps += 1 if discard else 0
        scheduler = self.config.options.get('scheduler')
        sigma_min, sigma_max = self.model_wrap.sigmas[0].item(), self.model_wrap.sigmas[-1].item()
        if scheduler == 'karras':
            sigmas = k_diffusion.sampling.get_sigmas_karras(n=steps, sigma_min=sigma_min, sigma_max=sigma_max)
        elif scheduler == 'exponential':
            sigmas = k_diffusion.sampling.get_sigmas_exponential(n=steps, sigma_min=sigma_min, sigma_max=sigma_max)
        else:
            sigmas = self.model_wrap.get_sigmas(steps)
        if discard:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas.cpu()

    def _kwargs(self, p, sigma_sched, x, sigmas, img2img):
        kwargs = self.initialize(p)  # eta: opts.eta_ancestral
        parameters = inspect.signature(self.func).parameters
        if 'sigma_min' in parameters:
            kwargs['sigma_min'] = sigma_sched[-2] if img2img else self.model_wrap.sigmas[0].item()
            kwargs['sigma_max'] = sigma_sched[0] if img2img else self.model_wrap.sigmas[-1].item()
        if 'n' in parameters:
            kwargs['n'] = len(sigma_sched) - 1
        if 'sigmas' in parameters:
            kwargs['sigmas'] = sigma_sched
        if self.config.options.get('solver_type') == 'heun':
            kwargs['solver_type'] = 'heun'
        return kwargs

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        xi = x + noise * sigma_sched[0]
        self.last_latent = x
        kwargs = self._kwargs(p, sigma_sched, x, sigmas, img2img=True)
        self.model_wrap_cfg.init_latent = x
        args = self._args(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(t_enc + 1, lambda: self.func(self.model_wrap_cfg, xi, extra_args=args, disable=True, callback=self.callback_state, **kwargs))

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps)
        x = x * sigmas[0]
        self.last_latent = x
        kwargs = self._kwargs(p, sigmas, x, sigmas, img2img=False)
        if 'n' in kwargs:
            kwargs['n'] = steps
        args = self._args(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(steps, lambda: self.func(self.model_wrap_cfg, x, extra_args=args, disable=True, callback=self.callback_state, **kwargs))
