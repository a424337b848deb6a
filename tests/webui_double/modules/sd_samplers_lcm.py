"""modules/sd_samplers_lcm.py (v1.10.1): LCMCompVisDenoiser (L9-57), sample_lcm (L60-77),
CFGDenoiserLCM and LCMSampler (L80-96). LCM's denoiser keeps 50 of the 1000 training
timesteps (every 20th, ending at 999), spaces its sigmas evenly in those timesteps, and
returns a boundary-condition mix c_out * x0 + c_skip * x; its sampler makes one model call
per sigma and reports the step after it."""
import k_diffusion.external
import k_diffusion.sampling
import k_diffusion.utils
import torch

from modules import sd_samplers_cfg_denoiser, sd_samplers_kdiffusion, shared


class LCMCompVisDenoiser(k_diffusion.external.DiscreteEpsDDPMDenoiser):
    def __init__(self, model, timesteps=1000, original_timesteps=50):
        self.skip_steps = timesteps // original_timesteps
        kept = [model.alphas_cumprod[timesteps - 1 - i * self.skip_steps] for i in range(original_timesteps)]
        super().__init__(model, torch.stack(kept[::-1]).float(), quantize=None)

    def get_sigmas(self, n=None):
        if n is None:
            return k_diffusion.sampling.append_zero(self.sigmas.flip(0))
        t = torch.linspace(self.sigma_to_t(self.sigma_max), self.sigma_to_t(self.sigma_min), n)
        return k_diffusion.sampling.append_zero(self.t_to_sigma(t))

    def sigma_to_t(self, sigma, quantize=None):
        nearest = (sigma.log() - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)
        return nearest * self.skip_steps + (self.skip_steps - 1)

    def t_to_sigma(self, timestep):
        index = ((timestep - (self.skip_steps - 1)) / self.skip_steps).float()
        return super().t_to_sigma(index.clamp(min=0, max=len(self.sigmas) - 1))

    def get_eps(self, *args, **kwargs):
        return self.inner_model.apply_model(*args, **kwargs)

    def get_scaled_out(self, sigma, output, input):
        sigma_data = 0.5
        scaled = k_diffusion.utils.append_dims(self.sigma_to_t(sigma), output.ndim) * 10.0
        c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
        c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
        return c_out * output + c_skip * input

    def forward(self, input, sigma, **kwargs):
        c_out, c_in = [k_diffusion.utils.append_dims(s, input.ndim) for s in self.get_scalings(sigma)]
        eps = self.get_eps(input * c_in, self.sigma_to_t(sigma), **kwargs)
        return self.get_scaled_out(sigma, input + eps * c_out, input)


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = k_diffusion.sampling.default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


class CFGDenoiserLCM(sd_samplers_cfg_denoiser.CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = LCMCompVisDenoiser(shared.sd_model)
        return self.model_wrap


class LCMSampler(sd_samplers_kdiffusion.KDiffusionSampler):
    def __init__(self, funcname, sd_model):
        super().__init__("sample_euler", sd_model)  # the base looks its function up by name
        self.funcname = self.func = sample_lcm
        self.model_wrap_cfg = CFGDenoiserLCM(self)
        self.model_wrap = self.model_wrap_cfg.inner_model


samplers_lcm = [('LCM', sample_lcm, {})]
