"""An independent reference for guided WebUI generations.

It runs as a plain set of callbacks on the test double, with our script absent: each concept
is evaluated in a model call of its own (no rows are added to the WebUI's batch), the step
index comes from the sampler's own step reports and the noise level where a pass starts, and
SemanticGuidance is applied directly. Nothing of ldg_core.webui_adapter is used.

With a SafetyConfig, Safe Latent Diffusion too: its concept evaluated alone at every call,
SafetyGuidance applied directly with the CFG scale the sampler hands the denoiser, on the
prompt's estimate the WebUI's CFG scales (for AND prompts uncond + sum_i w_i (cond_i - uncond)),
its edit added to SEGA's.
"""
import torch

from ldg_core import GuidanceConfig, SafetyGuidance, SemanticGuidance
from modules import script_callbacks, sd_samplers_common, shared, sd_samplers_timesteps


def _pad(cond, tokens, empty):
    """Pads a [1, T, D] conditioning (or SDXL dict) with empty-prompt chunks to `tokens`."""
    if isinstance(cond, dict):
        return {**cond, "crossattn": _pad(cond["crossattn"], tokens, empty)}
    chunks = (tokens - cond.shape[1]) // empty.shape[1]
    return torch.cat([cond] + [empty] * chunks, dim=1)


def _rows(cond, count):
    if isinstance(cond, dict):
        return {k: v.expand(count, *v.shape[1:]) for k, v in cond.items()}
    return cond.expand(count, *cond.shape[1:])


class ReferenceGuidance:
    def __init__(self, config: GuidanceConfig, safety=None):
        self.config, self.p = config, None
        self.safety_config, self.safety = safety, None
        self.guidance = None
        self.reports_at_last_call = 0
        self.offset = None
        self.calls = 0
        self.safety_masks = []  # where SLD's threshold let the safety estimate act, per step

    # the generation and its passes ---------------------------------------------------------
    def process(self, p, *args):
        self.p = p
        self.register()

    def process_before_every_sampling(self, p, *args, **kwargs):
        self.guidance = SemanticGuidance(self.config)
        self.safety = SafetyGuidance(self.safety_config) if self.safety_config else None
        self.reports_at_last_call = 0
        self.offset = None
        self.calls = 0

    def postprocess(self, p, processed, *args):
        self.unregister()

    def register(self):
        script_callbacks.on_cfg_denoiser(self.on_denoiser, name="reference")
        script_callbacks.on_cfg_denoised(self.on_denoised, name="reference")
        script_callbacks.on_cfg_after_cfg(self.on_after_cfg, name="reference")

    def unregister(self):
        for fn in (self.on_denoiser, self.on_denoised, self.on_after_cfg):
            script_callbacks.remove_callbacks_for_function(fn)

    # step index ------------------------------------------------------------------------------
    def _offset(self, denoiser, level):
        """Where this pass joins a txt2img run of the full schedule, found by noise level."""
        p, sampler = self.p, denoiser.sampler
        if getattr(p, "is_hr_pass", False):
            steps, t_enc = sd_samplers_common.setup_img2img_steps(p, p.hr_second_pass_steps or p.steps)
        elif p.init_latent is not None:
            steps, t_enc = sd_samplers_common.setup_img2img_steps(p)
        else:
            return 0
        if isinstance(sampler, sd_samplers_timesteps.CompVisSampler):
            full = sampler.get_timesteps(p, steps)
            if sampler.config.name == "UniPC":
                # UniPC's img2img grid starts near, not at, a point of the full run's grid
                # (sd_samplers_timesteps_impl.py unipc: "likely off by a bit"): its t_enc
                # points are taken as the last t_enc of the full run's len(full).
                return len(full) - t_enc
            calls = [float(full[len(full) - 1 - i]) for i in range(len(full) - 1)]
        else:
            calls = [float(s) for s in sampler.get_sigmas(p, steps)[:-1]]
        return min(range(len(calls)), key=lambda i: abs(calls[i] - float(level)))

    def _index(self, denoiser, level):
        if self.offset is None:
            self.offset = self._offset(denoiser, level)
        reports = len(denoiser.sampler.step_reports)
        self.calls += 1
        if denoiser.sampler.config.name == "UniPC":
            # One call at each point of UniPC's grid: the first before any report, each later
            # one inside the update that then reports (uni_pc.py UniPC.sample).
            return self.offset + (reports + 1 if self.calls > 1 else 0)
        # k-diffusion reports a step right after its first model call: a call that follows a
        # report in a two-call sampler is the second call of the step just reported.
        second_call = (reports > self.reports_at_last_call
                       and denoiser.sampler.config.options.get("second_order", False))
        self.reports_at_last_call = reports
        return self.offset + reports - (1 if second_call else 0)

    # callbacks -------------------------------------------------------------------------------
    def on_denoiser(self, params):
        b = params.text_uncond.shape[0]
        self.call = dict(denoiser=params.denoiser, x=params.x[-b:], sigma=params.sigma[-b:],
                         image_cond=params.image_cond[-b:], b=b,
                         tokens=self._tokens(params.text_cond, params.text_uncond),
                         first_rows=None, cond_rows=params.text_cond.shape[0])

    @staticmethod
    def _tokens(cond, uncond):
        """Token length the prompt rows are evaluated at: the WebUI pads cond rows to a longer
        negative prompt when pad_cond_uncond is on (sd_samplers_cfg_denoiser.py L231-238)."""
        count = lambda c: (c["crossattn"] if isinstance(c, dict) else c).shape[1]
        if shared.opts.pad_cond_uncond:
            return max(count(cond), count(uncond))
        return count(cond)

    def _eps(self, out, denoiser, x, sigma):
        if isinstance(denoiser.sampler, sd_samplers_timesteps.CompVisSampler):
            return out
        return (x - out) / sigma.view(-1, 1, 1, 1)

    def _evaluate(self, denoiser, cond):
        call = self.call
        x, sigma, ic = call["x"], call["sigma"], call["image_cond"]
        if isinstance(cond, dict):
            condition = {**cond, "c_concat": [ic]}
        else:
            condition = {"c_crossattn": [cond], "c_concat": [ic]}
        out = denoiser.inner_model(x, sigma, cond=condition)
        return self._eps(out, denoiser, x, sigma)

    def on_denoised(self, params):
        call, model = self.call, shared.sd_model
        denoiser, b = call["denoiser"], call["b"]
        out = params.x
        uncond = self._eps(out[-b:], denoiser, call["x"], call["sigma"])
        repeats = [len(rows) for rows in denoiser.sampler.sampler_extra_args["cond"].batch]
        first = [sum(repeats[:i]) for i in range(b)]
        cond = self._eps(out[first], denoiser, call["x"], call["sigma"])
        empty = model.cond_stage_model_empty_prompt
        estimates = []
        for concept in self.config.concepts:
            text = model.get_learned_conditioning([concept.prompt])
            text = _pad(text, call["tokens"], empty)
            estimates.append(self._evaluate(denoiser, _rows(text, b)))
        index = self._index(denoiser, call["sigma"][0])
        call["edit"] = (self.guidance.step(step=index, uncond=uncond, cond=cond,
                                           concepts=torch.stack(estimates))
                        if estimates else torch.zeros_like(uncond))
        if self.safety is not None:
            batch = denoiser.sampler.sampler_extra_args["cond"].batch
            # Combined in the model's output space, as combine_denoised does at scale 1: SLD's
            # mask and clamp are not continuous, so the rounding must be the WebUI's.
            prompt = out[-b:].clone()
            for i, rows in enumerate(batch):
                for j, row in enumerate(rows):
                    prompt[i] += (out[first[i] + j] - out[-b:][i]) * row.weight
            prompt = self._eps(prompt, denoiser, call["x"], call["sigma"])
            if all(len(rows) == 1 and rows[0].weight == 1 for rows in batch):
                prompt = cond
            text = model.get_learned_conditioning([self.safety_config.concept])
            safety = self._evaluate(denoiser, _rows(_pad(text, call["tokens"], empty), b))
            scale = (denoiser.sampler.sampler_extra_args["cond_scale"]
                     * denoiser.cond_scale_miltiplier)
            call["edit"] = call["edit"] + self.safety.step(
                step=index, uncond=uncond, cond=prompt, safety=safety, guidance_scale=scale)
            if index >= self.safety_config.warmup and scale > 1 and self.safety_config.scale > 1:
                # SLD's mask, as the pipeline computes it: the scale is 0 where
                # eps_text - eps_safety >= threshold (pipeline_stable_diffusion_safe.py)
                self.safety_masks.append(prompt - safety < self.safety_config.threshold)

    def on_after_cfg(self, params):
        call = self.call
        edit = call["edit"]
        if not isinstance(call["denoiser"].sampler, sd_samplers_timesteps.CompVisSampler):
            edit = -call["sigma"].view(-1, 1, 1, 1) * edit
        if call["denoiser"].mask is not None:
            edit = edit * call["denoiser"].nmask
        params.x = params.x + edit
