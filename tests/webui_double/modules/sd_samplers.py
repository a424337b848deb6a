"""modules/sd_samplers.py: the sampler list (L14-19: k-diffusion, timesteps, LCM), find_sampler_config
and create_sampler (L24-44)."""
from modules import sd_samplers_common, sd_samplers_kdiffusion, sd_samplers_lcm, sd_samplers_timesteps

all_samplers = (
    [sd_samplers_common.SamplerData(name, lambda model, f=func: sd_samplers_kdiffusion.KDiffusionSampler(f, model), [], options)
     for name, func, options in sd_samplers_kdiffusion.samplers_k_diffusion]
    + [sd_samplers_common.SamplerData(name, lambda model, f=func: sd_samplers_timesteps.CompVisSampler(f, model), [], options)
       for name, func, options in sd_samplers_timesteps.samplers_timesteps]
    + [sd_samplers_common.SamplerData(name, lambda model, f=func: sd_samplers_lcm.LCMSampler(f, model), [], options)
       for name, func, options in sd_samplers_lcm.samplers_lcm])
all_samplers_map = {x.name: x for x in all_samplers}


def find_sampler_config(name):
    return all_samplers_map.get(name) if name is not None else all_samplers[0]


def create_sampler(name, model):
    config = find_sampler_config(name)
    assert config is not None, f"bad sampler name: {name}"
    sampler = config.constructor(model)
    sampler.config = config
    return sampler
