"""modules/sd_samplers_timesteps.py and sd_samplers_timesteps_impl.py (v1.10.1): DDIM (impl
L11-41, with eta and its noise from k_diffusion.sampling.torch.randn_like, L16, L27-34), DDIM CFG++ (impl L44-81), PLMS (impl L84-143), and UniPC's model calls and
step reports (see unipc()); CompVisTimestepsDenoiser / VDenoiser (L25-45),
CFGDenoiserTimesteps (L48-72), CompVisSampler (L75-160)."""
import k_diffusion.sampling
import numpy as np
import torch

from modules import sd_samplers_cfg_denoiser, sd_samplers_common, shared


def _alphas(model, timesteps):
    alphas_cumprod = model.inner_model.inner_model.alphas_cumprod
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    return alphas, alphas_prev, torch.sqrt(1 - alphas)


@torch.no_grad()
def ddim(model, x, timesteps, extra_args=None, callback=None, disable=None, eta=0.0):
    alphas, alphas_prev, sqrt_one_minus_alphas = _alphas(model, timesteps)
    sigmas = eta * np.sqrt((1 - alphas_prev.cpu().numpy()) / (1 - alphas.cpu()) * (1 - alphas.cpu() / alphas_prev.cpu().numpy()))
    s_in, s_x = x.new_ones((x.shape[0])), x.new_ones((x.shape[0], 1, 1, 1))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in, **extra_args)
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sigma_t = sigmas[index].item() * s_x
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1. - a_prev - sigma_t ** 2).sqrt() * e_t
        noise = sigma_t * k_diffusion.sampling.torch.randn_like(x)
        x = a_prev.sqrt() * pred_x0 + dir_xt + noise
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': 0, 'sigma_hat': 0, 'denoised': pred_x0})
    return x


@torch.no_grad()
def ddim_cfgpp(model, x, timesteps, extra_args=None, callback=None, disable=None, eta=0.0):
    alphas, alphas_prev, sqrt_one_minus_alphas = _alphas(model, timesteps)
    model.cond_scale_miltiplier = 1 / 12.5
    model.need_last_noise_uncond = True
    s_in, s_x = x.new_ones((x.shape[0])), x.new_ones((x.shape[0], 1, 1, 1))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in, **extra_args)
        last_noise_uncond = model.last_noise_uncond
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_alphas[index].item() * s_x * e_t) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1. - a_prev).sqrt() * last_noise_uncond
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': 0, 'sigma_hat': 0, 'denoised': pred_x0})
    return x


@torch.no_grad()
def unipc(model, x, timesteps, extra_args=None, callback=None, disable=None, is_img2img=False):
    """UniPC's model calls and step reports, with a plain DDIM update in place of its solver.

    sd_samplers_timesteps_impl.py L146-176 runs UniPC.sample (uni_pc.py L746-800, multistep)
    with steps = len(timesteps): N steps on its own time grid (skip type time_uniform:
    linspace(t_T, 1/1000, N + 1), t_T 1 or, for img2img, timesteps[-1] / 1000 + 1/1000). It
    evaluates the model at grid[0] before its loop; update s = 1..N evaluates it at grid[s]
    (the corrector, whose output the next update reuses), except the last, then reports step
    s - 1 (UniPCCFG.after_update). So N calls, none at the final point, whatever the order,
    variant or lower-order-final options; the input time is (t - 1/1000) * 1000."""
    alphas_cumprod = model.inner_model.inner_model.alphas_cumprod
    steps = len(timesteps)
    t_start = timesteps[-1] / 1000 + 1 / 1000 if is_img2img else 1.0
    grid = torch.linspace(float(t_start), 1. / 1000, steps + 1)
    s_in = x.new_ones((x.shape[0]))

    def call(x, t):
        return model(x, (t - 1. / 1000) * 1000. * s_in, **extra_args)

    def alpha(t):
        return alphas_cumprod[min(int((t - 1. / 1000) * 1000), 999)].item()

    e_t = call(x, float(grid[0]))
    for step in range(1, steps + 1):
        a_t, a_next = alpha(float(grid[step - 1])), alpha(float(grid[step]))
        pred_x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t ** 0.5
        x = a_next ** 0.5 * pred_x0 + (1 - a_next) ** 0.5 * e_t
        if step < steps:
            e_t = call(x, float(grid[step]))
        if callback is not None:
            callback({'x': x, 'i': step - 1, 'sigma': 0, 'sigma_hat': 0, 'denoised': pred_x0})
    return x


@torch.no_grad()
def plms(model, x, timesteps, extra_args=None, callback=None, disable=None):
    alphas, alphas_prev, sqrt_one_minus_alphas = _alphas(model, timesteps)
    s_in, s_x = x.new_ones([x.shape[0]]), x.new_ones((x.shape[0], 1, 1, 1))
    old_eps = []

    def step(x, e_t, index):
        a_t, a_prev = alphas[index].item() * s_x, alphas_prev[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_alphas[index].item() * s_x * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1. - a_prev).sqrt() * e_t, pred_x0

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        ts = timesteps[index].item() * s_in
        t_next = timesteps[max(index - 1, 0)].item() * s_in
        e_t = model(x, ts, **extra_args)
        if len(old_eps) == 0:
            x_prev, pred_x0 = step(x, e_t, index)
            e_t_next = model(x_prev, t_next, **extra_args)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev, pred_x0 = step(x, e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        x = x_prev
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': 0, 'sigma_hat': 0, 'denoised': pred_x0})
    return x


class CompVisTimestepsDenoiser(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class CompVisTimestepsVDenoiser(CompVisTimestepsDenoiser):
    def forward(self, input, timesteps, **kwargs):
        v = self.inner_model.apply_model(input, timesteps, **kwargs)
        a = self.inner_model.alphas_cumprod[timesteps.to(torch.int), None, None, None]
        return torch.sqrt(a) * v + torch.sqrt(1 - a) * input


class CFGDenoiserTimesteps(sd_samplers_cfg_denoiser.CFGDenoiser):
    def __init__(self, sampler):
        super().__init__(sampler)
        self.alphas = shared.sd_model.alphas_cumprod
        self.mask_before_denoising = True

    @property
    def inner_model(self):
        if self.model_wrap is None:
            v = shared.sd_model.parameterization == "v"
            self.model_wrap = (CompVisTimestepsVDenoiser if v else CompVisTimestepsDenoiser)(shared.sd_model)
        return self.model_wrap


samplers_timesteps = [('DDIM', ddim, {}), ('DDIM CFG++', ddim_cfgpp, {}), ('PLMS', plms, {}),
                      ('UniPC', unipc, {})]


class CompVisSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model):
        super().__init__(funcname)
        self.eta_option_field = 'eta_ddim'  # L79
        self.model_wrap_cfg = CFGDenoiserTimesteps(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_timesteps(self, p, steps):
        return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        timesteps = self.get_timesteps(p, steps)
        timesteps_sched = timesteps[:t_enc]
        a = shared.sd_model.alphas_cumprod[timesteps[t_enc]]
        xi = x * torch.sqrt(a) + noise * torch.sqrt(1 - a)
        extra = self.initialize(p)
        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        args = self._args(p, conditioning, unconditional_conditioning, image_conditioning)
        if self.func is unipc:
            extra['is_img2img'] = True
        return self.launch_sampling(t_enc + 1, lambda: self.func(self.model_wrap_cfg, xi, timesteps=timesteps_sched, extra_args=args, disable=True, callback=self.callback_state, **extra))

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        timesteps = self.get_timesteps(p, steps)
        extra = self.initialize(p)
        self.last_latent = x
        args = self._args(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(steps, lambda: self.func(self.model_wrap_cfg, x, timesteps=timesteps, extra_args=args, disable=True, callback=self.callback_state, **extra))
