"""modules/processing.py (v1.10.1), the parts the extension meets: get_conds_with_caching
(L460-490), setup_conds (L493-503), txt2img sample with the hires pass (L1307-1463,
calculate_hr_conds L1500-1511), img2img sample with the mask blend (L1759-1785), the
per-batch image noise (p.rng, L949, L1336, L1429-1430, L1760: rng.py ImageRNG L99-130, without
subseeds), and process_images' hook order (process, then per batch setup_conds and sample, then postprocess)."""
import torch

from modules import prompt_parser, sd_samplers, shared


class Processing:
    cached_c, cached_uc = [None, None], [None, None]  # shared by every p (L188-189, L251-252)

    def __init__(self, **kw):
        self.prompt, self.negative_prompt = "a cat", ""
        self.seed, self.steps, self.cfg_scale = 1, 8, 7.0
        self.width = self.height = 64
        self.batch_size, self.n_iter = 1, 1
        self.sampler_name, self.hr_sampler_name = "Euler", None
        self.denoising_strength = 0.75
        self.init_latent = self.mask = self.nmask = None
        self.enable_hr, self.hr_scale, self.hr_second_pass_steps = False, 2, 0
        self.hr_prompt = self.hr_negative_prompt = ""
        self.s_min_uncond = 0.0
        self.is_hr_pass = False
        self.extra_generation_params = {}
        self.extra_network_data = {}
        self.scripts = None
        self.sampler = None
        self.cached_c, self.cached_uc = Processing.cached_c, Processing.cached_uc
        for key, value in kw.items():
            setattr(self, key, value)
        self.is_img2img = self.init_latent is not None
        self.rng = None
        if self.is_img2img:
            self.init_images = []  # StableDiffusionProcessingImg2Img's field (L1558)
            self.sampler = sd_samplers.create_sampler(self.sampler_name, shared.sd_model)

    # conditioning ------------------------------------------------------------------------
    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
        cached_params = (tuple(required_prompts), required_prompts.width, required_prompts.height,
                         steps, hires_steps, id(shared.sd_model), shared.sd_model.sd_checkpoint_info,
                         shared.sd_model.salt, shared.sd_model.is_sdxl, shared.opts.use_old_scheduling)
        for cache in caches:
            if cache[0] is not None and cached_params == cache[0]:
                return cache[1]
        cache = caches[0]
        cache[1] = function(shared.sd_model, required_prompts, steps, hires_steps, shared.opts.use_old_scheduling)
        cache[0] = cached_params
        return cache[1]

    def _texts(self, prompts, negative, width, height):
        return prompt_parser.SdConditioning(prompts, width=width, height=height, is_negative_prompt=negative)

    def setup_conds(self):
        config = sd_samplers.find_sampler_config(self.sampler_name)
        total_steps = config.total_steps(self.steps)
        self.firstpass_steps = total_steps
        self.uc = self.get_conds_with_caching(prompt_parser.get_learned_conditioning, self._texts(self.negative_prompts, True, self.width, self.height), total_steps, [self.cached_uc], self.extra_network_data)
        self.c = self.get_conds_with_caching(prompt_parser.get_multicond_learned_conditioning, self._texts(self.prompts, False, self.width, self.height), total_steps, [self.cached_c], self.extra_network_data)

    def get_conds(self):
        return (self.hr_c, self.hr_uc) if self.is_hr_pass else (self.c, self.uc)

    def calculate_hr_conds(self):
        config = sd_samplers.find_sampler_config(self.hr_sampler_name or self.sampler_name)
        steps = self.hr_second_pass_steps or self.steps
        total_steps = config.total_steps(steps)
        w, h = self.hr_upscale_to_x, self.hr_upscale_to_y
        self.hr_uc = self.get_conds_with_caching(prompt_parser.get_learned_conditioning, self._texts([self.hr_negative_prompt or self.negative_prompt] * self.batch_size, True, w, h), self.firstpass_steps, [[None, None]], self.extra_network_data, total_steps)
        self.hr_c = self.get_conds_with_caching(prompt_parser.get_multicond_learned_conditioning, self._texts([self.hr_prompt or self.prompt] * self.batch_size, False, w, h), self.firstpass_steps, [[None, None]], self.extra_network_data, total_steps)

    # sampling ----------------------------------------------------------------------------
    def latent_shape(self, width, height):
        return (self.batch_size, 4, height // 8, width // 8)

    def sample(self, conditioning, unconditional_conditioning, seeds, prompts):
        if self.is_img2img:
            return self._sample_img2img(conditioning, unconditional_conditioning)
        self.sampler = sd_samplers.create_sampler(self.sampler_name, shared.sd_model)
        x = self.rng.next()
        self.scripts.process_before_every_sampling(p=self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning, image_conditioning=self.image_cond(x))
        if not self.enable_hr:
            return samples
        return self._sample_hr_pass(samples)

    def image_cond(self, x):
        return x.new_zeros(x.shape[0], 5, 1, 1)

    def _sample_hr_pass(self, samples):
        self.is_hr_pass = True
        self.hr_upscale_to_x, self.hr_upscale_to_y = self.width * self.hr_scale, self.height * self.hr_scale
        samples = torch.nn.functional.interpolate(samples, scale_factor=self.hr_scale, mode="nearest")
        self.sampler = sd_samplers.create_sampler(self.hr_sampler_name or self.sampler_name, shared.sd_model)
        self.rng = ImageRNG(samples.shape[1:], self.seeds)
        noise = self.rng.next()
        self.calculate_hr_conds()
        self.scripts.process_before_every_sampling(p=self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc, steps=self.hr_second_pass_steps or self.steps, image_conditioning=self.image_cond(samples))
        self.sampler = None
        self.is_hr_pass = False
        return samples

    def _sample_img2img(self, conditioning, unconditional_conditioning):
        x = self.rng.next()
        self.scripts.process_before_every_sampling(p=self, x=self.init_latent, noise=x, c=conditioning, uc=unconditional_conditioning)
        samples = self.sampler.sample_img2img(self, self.init_latent, x, conditioning, unconditional_conditioning, image_conditioning=self.image_cond(x))
        if self.mask is not None:
            samples = samples * self.nmask + self.init_latent * self.mask
        return samples


class ImageRNG:
    """One generator per image's seed; next() draws every image's next noise, on the model's
    device (the WebUI's devices.randn)."""

    def __init__(self, shape, seeds):
        self.shape = shape
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def next(self):
        noise = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return noise.to(getattr(shared.sd_model, "device", "cpu"))


def process_images(p, scripts):
    """Returns the final latents of every batch, concatenated."""
    p.scripts = scripts
    scripts.process(p)
    outputs = []
    for n in range(p.n_iter):
        p.iteration = n
        p.seeds = [p.seed + n * p.batch_size + i for i in range(p.batch_size)]
        p.prompts = [p.prompt] * p.batch_size
        p.negative_prompts = [p.negative_prompt] * p.batch_size
        shape = p.init_latent.shape if p.is_img2img else p.latent_shape(p.width, p.height)
        p.rng = ImageRNG(shape[1:], p.seeds)
        p.setup_conds()
        outputs.append(p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds, prompts=p.prompts))
    result = torch.cat(outputs)
    scripts.postprocess(p, result)
    return result
