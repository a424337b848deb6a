"""modules/sd_samplers_common.py: SamplerData.total_steps (L14-19), setup_img2img_steps
(L22-31), TorchHijack (L205-226), Sampler.callback_state / launch_sampling / initialize
(L256-307, trimmed: the hijack and the eta of samplers that take one)."""
import inspect
from collections import namedtuple

import k_diffusion.sampling
import torch

from modules import shared


class SamplerData(namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])):
    def total_steps(self, steps):
        return steps * 2 if self.options.get("second_order", False) else steps


def setup_img2img_steps(p, steps=None):
    if shared.opts.img2img_fix_steps or steps is not None:
        requested_steps = (steps or p.steps)
        steps = int(requested_steps / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        t_enc = requested_steps - 1
    else:
        steps = p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
    return steps, t_enc


class InterruptedException(BaseException):
    pass


class TorchHijack:
    """Stands in for torch in k_diffusion.sampling: randn_like draws the image's noise."""

    def __init__(self, p):
        self.rng = p.rng

    def __getattr__(self, item):
        if item == 'randn_like':
            return self.randn_like
        if hasattr(torch, item):
            return getattr(torch, item)
        raise AttributeError(item)

    def randn_like(self, x):
        return self.rng.next()


class Sampler:
    eta_option_field = 'eta_ancestral'  # L245

    def __init__(self, funcname):
        self.funcname = funcname
        self.func = funcname
        self.config = None
        self.s_min_uncond = None
        self.p = None
        self.model_wrap_cfg = None
        self.sampler_extra_args = None
        self.step_reports = []  # the i of every callback, for the tests
        self.last_latent = None

    def callback_state(self, d):
        self.last_latent = d["denoised"]
        self.step_reports.append(d["i"])
        shared.state.sampling_step = d["i"]

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        shared.state.sampling_steps = steps
        shared.state.sampling_step = 0
        try:
            return func()
        except InterruptedException:
            return self.last_latent

    def _args(self, p, conditioning, unconditional_conditioning, image_conditioning):
        self.sampler_extra_args = {'cond': conditioning, 'image_cond': image_conditioning,
                                   'uncond': unconditional_conditioning, 'cond_scale': p.cfg_scale,
                                   's_min_uncond': self.s_min_uncond}
        return self.sampler_extra_args

    def initialize(self, p):
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.mask = getattr(p, "mask", None)
        self.model_wrap_cfg.nmask = getattr(p, "nmask", None)
        self.model_wrap_cfg.step = 0
        self.s_min_uncond = getattr(p, "s_min_uncond", 0.0)
        k_diffusion.sampling.torch = TorchHijack(p)
        kwargs = {}
        if 'eta' in inspect.signature(self.func).parameters:
            eta = getattr(p, "eta", None)
            kwargs['eta'] = eta if eta is not None else getattr(shared.opts, self.eta_option_field, 0.0)
        return kwargs
