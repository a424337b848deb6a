"""One generation of the WebUI with guidance: checks, conditioning, callbacks and clean-up.

The script hands in the WebUI modules it uses (`WebUIModules`), so nothing here imports the
WebUI and the same code runs against the test double of its contract.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

from .concept_maps import ConceptMapRecorder, batch_overlays
from .clock import REFUSED_SAMPLERS, step_clock
from .config import GuidanceConfig
from .safety_config import SafetyConfig
from .failures import GuidanceError, StopSampling, sampling_failure
from .text_form import safety_to_text, to_text
from .ui_args import MAX_ROWS_OPTION
from .forge import (ForgeFunctions, ForgePass, calc_cond_batch_function, join_problem,
                    post_cfg_function)
from .guidance import SemanticGuidance
from .inversion import LeditsGuidance
from .passes import GuidancePass
from .webui_adapter import PassGuidance, WebUIFunctions, token_count
from .paste import KEEP_IMAGE_KEY, KEEP_IMAGE_MASK_TEXT
from .webui_inversion import (AttentionMasks, InvertingSampler, concept_tokens,
                              mask_token_problem, sampler_problem as inversion_problem)

log = logging.getLogger("latent_diffusion_guidance")

INFOTEXT_KEY = "Latent Diffusion Guidance"
SAFETY_KEY = "Safe Latent Diffusion"
SEPARATE_CALL_KEY = "Latent Diffusion Guidance rows"
# Image parameters by which neighbours that read the CFG denoiser's rows announce themselves.
ROW_READING_EXTENSIONS = {"Dynamic thresholding enabled": "Dynamic Thresholding",
                          "RP Active": "Regional Prompter"}
_ATTRIBUTE = "latent_diffusion_guidance"  # where a processing object keeps its Generation


@dataclass(frozen=True)
class WebUIModules:
    shared: Any  # modules.shared (opts, sd_model)
    script_callbacks: Any
    prompt_parser: Any
    sd_samplers_common: Any  # setup_img2img_steps
    sd_samplers_cfg_denoiser: Any  # catenate_conds, pad_cond
    sd_samplers_timesteps: Any  # CompVisSampler: the samplers that hand over eps
    forge: Optional[ForgeFunctions] = None  # Forge / Forge Neo: guidance as a post-CFG function
    prompt_tokens: Optional[Callable[[str], int]] = None  # a text's token count (sd_hijack)


def model_problem(model: Any) -> Optional[str]:
    # Forge names what its UNet predicts (backend/modules/k_prediction.py): flow models
    # (SD3, Flux, Chroma, ...) are 'const', EDM models 'edm'; reForge has ComfyUI's model
    # types (ldm_patched/modules/model_base.py ModelType: EPS, V_PREDICTION, FLOW, ...).
    unet_model = getattr(getattr(getattr(model, "forge_objects", None), "unet", None), "model", None)
    kind = getattr(getattr(unet_model, "predictor", None), "prediction_type", None) or {
        "EPS": "epsilon", "V_PREDICTION": "v_prediction"}.get(
        getattr(getattr(unet_model, "model_type", None), "name", "EPS"), "const")
    if kind not in ("epsilon", "v_prediction"):
        return (f"{type(model).__name__} models are not supported: they predict "
                f"{'a flow' if kind == 'const' else kind + ' outputs'}, not noise estimates, "
                "and the method's concept directions are differences of noise estimates")
    if getattr(model, "is_sd3", False):
        return ("SD3 models are not supported: they are flow-matching models, whose outputs are "
                "not noise estimates")
    if getattr(model, "cond_stage_key", None) == "edit":
        return "instruct-pix2pix edit models are not supported: their calls have a third block"
    return None


def no_negative_problem(p: Any, forge: ForgeFunctions) -> Optional[str]:
    """Passes without a negative estimate, said before the first pass runs. Forge computes
    none at a CFG scale of 1 (processing.py L499-501), nor in a hires pass at a Hires CFG
    Scale of 1 (L1586-1588). reForge keeps it at 1 when told to, but drops the hires pass's
    negative at a Hires CFG Scale below 0, or of 0 with a CFG scale of 0 (L1640-1643)."""
    hires_cfg = getattr(p, "hr_cfg", None) if getattr(p, "enable_hr", False) else None
    if forge.keep_cfg1_uncond:
        if hires_cfg is not None and (hires_cfg < 0 or hires_cfg == 0 == p.cfg_scale):
            return _no_negative(forge.name, "Hires CFG Scale", f"{hires_cfg:g}", "set it above 0")
        return None
    if p.cfg_scale == 1:
        return _no_negative(forge.name, "CFG scale")
    if hires_cfg == 1:
        return _no_negative(forge.name, "Hires CFG Scale")
    return None


def _no_negative(host: str, setting: str, value: str = "1",
                 remedy: str = "raise it above 1") -> str:
    return (f"{host} computes no estimate of the negative prompt at a {setting} of {value} "
            f"(modules/processing.py), and concepts are directions from it: {remedy}, "
            "or turn guidance off")


def keep_image_problem(p: Any, forge: Optional[ForgeFunctions]) -> Optional[str]:
    """Why LEDITS++'s 'Keep the image' cannot run for `p`, said before sampling."""
    if not hasattr(p, "init_images"):  # img2img's field (processing.py L1558)
        return ("'Keep the image' (LEDITS++ inversion) works in img2img, which has an image to "
                "keep; turn it off in txt2img")
    if forge is not None:
        return (f"'Keep the image' (LEDITS++ inversion) is not available on {forge.name} yet; "
                "turn it off, or use AUTOMATIC1111 WebUI 1.10")
    if getattr(p, "refiner_checkpoint", None) not in (None, "", "None", "none"):  # L882
        return ("'Keep the image' (LEDITS++ inversion) cannot run with a refiner: the refiner "
                "would take over during the inversion and sampling would not retrace it; turn "
                "the refiner off")
    return inversion_problem(p.sampler_name)


def sampler_names(p: Any) -> List[str]:
    names = [p.sampler_name]
    hr_name = getattr(p, "hr_sampler_name", None)
    if getattr(p, "enable_hr", False) and hr_name and hr_name != "Use same sampler":
        names.append(hr_name)
    return names


class Generation:
    """Guidance state of one processing object `p`, across its batches and passes."""

    def __init__(self, p: Any, config: GuidanceConfig, modules: WebUIModules, cache: list,
                 concept_maps: bool = False, safety: Optional[SafetyConfig] = None,
                 keep_image: bool = False, keep_image_mask: str = "noise"):
        self.p = p
        self.keep_image = keep_image  # LEDITS++: invert the init image, then edit it
        self.keep_image_mask = keep_image_mask  # where its concepts act (config.MASKS)
        self.attention: Optional[AttentionMasks] = None  # the pass's cross-attention recorder
        self.inverter: Optional[InvertingSampler] = None
        self.inverting = False  # the model calls now made are the inversion's
        self.noise_map_bytes = 0  # the largest inversion's noise maps (benchmarks)
        self.config = config  # may hold no concept when only Safe Latent Diffusion is on
        self.safety = safety
        self.m = modules
        self.cache = cache  # a get_conds_with_caching cell, kept by the script across generations
        self.current: Optional[PassGuidance] = None
        self.encoded_for: Any = None
        self.registered = False
        self._forge_unets = None  # Forge: (the pass's UNet, our patched clone of it)
        self._pass_key = None  # the pass last set up: (its sampler, hires)
        # Concept maps: per batch, the recorders of its passes; None when the option is off.
        self.map_batches: Optional[List[List[ConceptMapRecorder]]] = [] if concept_maps else None

    @classmethod
    def of(cls, p: Any) -> Optional["Generation"]:
        generation = getattr(p, _ATTRIBUTE, None)
        return generation if generation is not None and generation.p is p else None

    # -- set-up before sampling --------------------------------------------------------------

    @classmethod
    def attach(cls, p: Any, config: Optional[GuidanceConfig], modules: WebUIModules,
               cache: list, error: Optional[Exception] = None,
               concept_maps: bool = False, safety: Optional[SafetyConfig] = None,
               keep_image: bool = False, keep_image_mask: str = "noise") -> Optional["Generation"]:
        """Prepares `p` (from the script's process()). Disabled: touches nothing at all.
        `safety`: Safe Latent Diffusion's settings, alone (config None) or with concepts.
        `keep_image`: img2img's LEDITS++ mode, which acts with no concept too."""
        if error is None and config is None and safety is None and not keep_image:
            return None
        problem = str(error) if error is not None else model_problem(modules.shared.sd_model)
        for name in [] if problem else sampler_names(p):
            if name in REFUSED_SAMPLERS:
                problem = f"the sampler {name!r} is not supported: {REFUSED_SAMPLERS[name]}"
        if not problem and modules.forge is not None:
            problem = next((f"the sampler {name!r} is not supported on {modules.forge.name}: {why}"
                            for name in sampler_names(p)
                            for why in [modules.forge.sampler_problem(name)] if why), None)
            problem = problem or no_negative_problem(p, modules.forge)
        if not problem and keep_image:
            problem = keep_image_problem(p, modules.forge)
        if problem:
            _refuse_sampling(p, GuidanceError(problem))
            return None
        generation = cls(p, config if config is not None else GuidanceConfig(), modules, cache,
                         concept_maps, safety, keep_image, keep_image_mask)
        setattr(p, _ATTRIBUTE, generation)
        if keep_image:
            p.extra_generation_params[KEEP_IMAGE_KEY] = KEEP_IMAGE_MASK_TEXT[keep_image_mask]
        if config is not None:
            p.extra_generation_params[INFOTEXT_KEY] = to_text(config)
        if safety is not None:
            p.extra_generation_params[SAFETY_KEY] = safety_to_text(safety)
        generation._wrap_sample()
        return generation

    def _wrap_sample(self) -> None:
        # Sampling is the one place from which an exception stops a generation, and the place
        # to clean up after: postprocess never runs when sampling raises or is interrupted.
        p, sample = self.p, self.p.sample

        def sample_with_guidance(*args, **kwargs):
            try:
                return sample(*args, **kwargs)
            except StopSampling as stop:  # our code failed mid-sampling: one message, no image
                raise GuidanceError(stop.message) from stop.__cause__
            except Exception as error:  # the WebUI's own call failed; with our rows in it?
                why = self.current.webui_call_failure(error) if self.current else None
                if why:
                    raise GuidanceError(why) from error
                raise
            finally:
                self.unregister()
        p.sample = sample_with_guidance

    def start_pass(self, c: Any, uc: Any = None) -> None:
        """From process_before_every_sampling: the first pass, or the hires pass, begins.
        On Forge it comes twice before the hires pass, and only the second counts
        (processing.py L1510, L1522): each call sets the pass up anew."""
        try:
            guidance = self._new_pass(c, uc)
            if self.keep_image:  # with or without concepts: the image is kept
                self._invert_in(self.p.sampler)
                if self.keep_image_mask != "noise" and guidance.guidance.can_act():
                    self._attend(guidance)
        except GuidanceError as error:
            return self._refuse_pass(error)
        except Exception as error:  # no image and a message, rather than an unguided image
            if not isinstance(error, ValueError):
                log.exception("Latent Diffusion Guidance could not set up this pass")
                error = f"could not set up guidance: {error!r}"
            return self._refuse_pass(GuidanceError(str(error)))
        self.current = guidance
        if guidance.guidance.can_act():
            self.register()
        else:
            self._release_hooks()  # the inversion, when on, stays: it keeps the image

    def _new_pass(self, c: Any, uc: Any):
        p, sampler, forge = self.p, self.p.sampler, self.m.forge
        if forge is not None and uc is None:
            raise GuidanceError(_no_negative(
                forge.name, "Hires CFG Scale" if getattr(p, "is_hr_pass", False) else "CFG scale"))
        if forge is None:
            for problem in two_row_controlnet_units(p):
                raise GuidanceError(problem)
        blocking = self._units_that_cannot_follow() if self.keep_image else []
        if blocking:  # the inversion's calls come first, without concept rows
            raise GuidanceError(f"'Keep the image' (LEDITS++ inversion) cannot run next to "
                                f"ControlNet {', '.join(blocking)}: it keeps per-row state from "
                                "the pass's first model call, and the inversion's calls come "
                                "first; turn that unit or the mode off")
        timesteps = isinstance(sampler, self.m.sd_samplers_timesteps.CompVisSampler)
        steps, schedule = self._schedule()
        second_order = sampler.config.options.get("second_order", False) or (
            forge is not None and sampler.config.name in forge.two_call_samplers)
        clock = step_clock(sampler.config.name, steps=steps, second_order=second_order,
                           timestep_count=len(sampler.get_timesteps(p, steps)) if timesteps else None,
                           img2img_schedule=schedule)
        conds = self._encode()
        # Forge hands every sampler's outputs over in x0; on A1111 timestep samplers give eps.
        guidance = GuidancePass(self.config, clock=clock, eps_outputs=timesteps and forge is None,
                                observer=self._map_observer(), safety=self.safety,
                                guidance_scale=self._cfg_scale(),
                                engine=LeditsGuidance if self.keep_image else SemanticGuidance)
        if forge is not None:
            return ForgePass(guidance, denoiser=sampler.model_wrap_cfg, forge=forge,
                             concept_conds=lambda call: [
                                 self.m.prompt_parser.reconstruct_cond_batch([schedule], call)
                                 for schedule in conds],
                             skips_uncond=self._skips_uncond, max_rows=self._row_limit(),
                             on_separate_call=self._say_separate_call)
        repeats = [len(rows) for rows in c.batch]
        first_rows = [0] + list(itertools.accumulate(repeats))[:-1]
        return PassGuidance(
            guidance, owner=p, concept_schedules=conds, first_prompt_rows=first_rows,
            prompt_rows=[[(first + i, row.weight) for i, row in enumerate(rows)]
                         for first, rows in zip(first_rows, c.batch)],
            webui=self._functions(), separate_call=self._separate_call_needed(c, conds),
            max_rows=self._max_rows(sum(repeats) + len(repeats), len(repeats)))

    def _cfg_scale(self) -> float:
        """The CFG scale the host applies in the coming pass, Safe Latent Diffusion's s_g: the
        Hires CFG Scale in a hires pass where the host has one (Forge, reForge). The CFG
        denoiser's multiplier (DDIM CFG++: 1 / 12.5, set when its sampling starts) is applied
        at each call by the host modules (`scaled_cfg`)."""
        p = self.p
        scale = p.cfg_scale
        if getattr(p, "is_hr_pass", False) and getattr(p, "hr_cfg", None) is not None \
                and self.m.forge is not None:
            scale = p.hr_cfg
        return float(scale)

    def _map_observer(self) -> Optional[Callable]:
        """A recorder's observer for this pass's concept maps (None when maps are off)."""
        if self.map_batches is None:
            return None
        p = self.p
        key = (p.sampler, getattr(p, "is_hr_pass", False))  # the object: an id can be reused
        if self._pass_key is not None and key[0] is self._pass_key[0] and key[1] == self._pass_key[1]:
            self.map_batches[-1].pop()  # the same pass set up again (Forge's hires pass)
        elif not key[1] or not self.map_batches:
            self.map_batches.append([])  # a new batch starts with its first pass
        self._pass_key = key
        recorder = ConceptMapRecorder()
        self.map_batches[-1].append(recorder)
        return recorder.observe

    def concept_map_overlays(self, images: List[Any]) -> List[Tuple[int, int, Any]]:
        """(image index, concept index, RGB uint8 overlay) for `images`, the generation's
        finished images as RGB uint8 arrays, batch after batch; [] when maps are off."""
        result = []
        for number, passes in enumerate(self.map_batches or []):
            size = self.p.batch_size
            batch = images[number * size:(number + 1) * size]
            result += [(number * size + b, index, picture)
                       for b, index, picture in batch_overlays(passes, batch)]
        return result

    def _row_limit(self) -> int:
        """The Settings' row limit for our model calls (0 = none)."""
        limit = getattr(self.m.shared.opts, MAX_ROWS_OPTION, 0) or 0
        try:
            return max(int(limit), 0)
        except (TypeError, ValueError):
            raise GuidanceError(f"the setting 'Max rows per UNet call' must be a whole number "
                                f">= 0, got {limit!r}")

    def _max_rows(self, webui_rows: int, images: int) -> int:
        """The row limit on A1111. Next to a ControlNet unit whose per-row state cannot follow
        rows in other calls, a limit the concept rows would pass stops the generation (every
        concept's rows are in every call there)."""
        limit = self._row_limit()
        rows = webui_rows + self._rows() * images
        blocking = self._units_that_cannot_follow() if 0 < limit < rows else []
        if blocking:
            raise GuidanceError(f"'Max rows per UNet call' is {limit}, below the {rows} rows of a "
                                "model call with every concept, so concepts would need extra "
                                f"model calls, which {_cannot_follow(blocking)}: raise the limit "
                                "(0 = none), or turn that unit or guidance off")
        return limit

    def _rows(self) -> int:
        """Conditionings per image the pass may evaluate: the concepts, and the safety one."""
        return len(self.config.concepts) + (self.safety is not None)

    def _units_that_cannot_follow(self) -> List[str]:
        model = getattr(self.m.shared.sd_model, "model", None)
        inpainting = getattr(model, "conditioning_key", None) == "hybrid"  # 9-channel UNet input
        return controlnet_units_that_cannot_follow(self.p, inpainting)

    def _schedule(self):
        """(steps of the full schedule, img2img (steps, t_enc) or None) for the coming pass."""
        p = self.p
        if getattr(p, "is_hr_pass", False):
            schedule = self.m.sd_samplers_common.setup_img2img_steps(
                p, getattr(p, "hr_second_pass_steps", 0) or p.steps)
        elif getattr(p, "init_latent", None) is not None:
            schedule = self.m.sd_samplers_common.setup_img2img_steps(p)
        else:
            return p.steps, None
        return schedule[0], schedule

    def _encode(self) -> list:
        """The concepts' conditioning, on the same clock as the prompt's own (processing.py
        L493-503 for a first pass, L1500-1511 for the hires pass), cached like it."""
        p, m = self.p, self.m
        prompts = [c.prompt for c in self.config.concepts]
        if self.safety is not None:  # one more conditioning, after the concepts'
            prompts.append(self.safety.concept)
        if getattr(p, "is_hr_pass", False):
            width, height = p.hr_upscale_to_x, p.hr_upscale_to_y
            hr_steps = getattr(p, "hr_second_pass_steps", 0) or p.steps
            steps, hires_steps = p.firstpass_steps, p.sampler.config.total_steps(hr_steps)
        else:
            width, height = p.width, p.height
            steps, hires_steps = p.sampler.config.total_steps(p.steps), None
        texts = m.prompt_parser.SdConditioning(prompts, width=width, height=height)
        self.encoded_for = _model_key(m.shared.sd_model)
        return p.get_conds_with_caching(m.prompt_parser.get_learned_conditioning, texts, steps,
                                        [self.cache], p.extra_network_data, hires_steps)

    def _say_separate_call(self, why: str) -> None:
        """On reForge: concepts cannot join its model call. Said once per generation."""
        if SEPARATE_CALL_KEY not in self.p.extra_generation_params:
            log.warning("Latent Diffusion Guidance evaluates concepts in a separate model "
                        "call: %s.", why)
        self.p.extra_generation_params[SEPARATE_CALL_KEY] = "separate call"

    def _separate_call_needed(self, c: Any, conds: list) -> bool:
        """Whether concept rows must be evaluated in a call of their own rather than join the
        prompt rows' call. Said once, and written into the image parameters."""
        reasons = self._separate_call_reasons(c, conds)
        # Active units, not marks: ControlNet marks cached prompt conds in place, and those
        # marks outlive the generation that made them.
        blocking = self._units_that_cannot_follow() if reasons else []
        if blocking:
            # A call of other rows would break those units' per-row caches: better no image
            # than a wrong one. Plain control models follow (they compute from each call).
            remedy = ("shorten the concept or lengthen the prompt" if "longer than the prompt"
                      in reasons[0] else "turn that extension off")
            raise GuidanceError(f"{'; '.join(reasons)}, so concepts would need a separate model "
                                f"call, which {_cannot_follow(blocking)}: {remedy}, or turn "
                                "that unit or guidance off")
        if reasons:
            if SEPARATE_CALL_KEY not in self.p.extra_generation_params:
                # WARNING, since the WebUI's console hides INFO: it costs a model call per step.
                log.warning("Latent Diffusion Guidance evaluates concepts in a separate model "
                            "call: %s.", "; ".join(reasons))
            self.p.extra_generation_params[SEPARATE_CALL_KEY] = "separate call"
        return bool(reasons)

    def _separate_call_reasons(self, c: Any, conds: list) -> List[str]:
        reasons = []
        # Padding the prompt rows to a longer concept's length would change the image itself.
        prompt_tokens = min(token_count(s.cond) for rows in c.batch for row in rows
                            for s in row.schedules)
        longer = [i + 1 for i, schedule in enumerate(conds)
                  if max(token_count(s.cond) for s in schedule) > prompt_tokens]
        names = [f"concept {i}" if i <= len(self.config.concepts) else "the safety concept"
                 for i in longer]
        if longer:
            reasons.append(f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} longer "
                           f"than the prompt ({prompt_tokens} tokens)")
        # Extensions that read every row but the uncond ones, or split rows by position
        # (../shared/docs/extension-interplay.md): rows of ours would be misread there.
        for key, name in ROW_READING_EXTENSIONS.items():
            if self.p.extra_generation_params.get(key):
                reasons.append(f"{name} reads the model call's rows")
        return reasons

    def _functions(self) -> WebUIFunctions:
        m = self.m
        return WebUIFunctions(
            reconstruct_cond_batch=m.prompt_parser.reconstruct_cond_batch,
            catenate_conds=m.sd_samplers_cfg_denoiser.catenate_conds,
            pad_cond=m.sd_samplers_cfg_denoiser.pad_cond,
            empty_cond=lambda: m.shared.sd_model.cond_stage_model_empty_prompt,
            skips_uncond=self._skips_uncond, condition=self._condition)

    def _condition(self, cond: Any, image_cond: Any) -> dict:
        """The inner model's conditioning for rows that use the uncond rows' image_cond, as
        the WebUI's make_condition_dict builds it (sd_samplers_cfg_denoiser.py L193-201)."""
        if getattr(self.m.shared.sd_model.model, "conditioning_key", None) == "crossattn-adm":
            return {"c_crossattn": [cond], "c_adm": image_cond}
        if isinstance(cond, dict):
            return {**cond, "c_concat": [image_cond]}
        return {"c_crossattn": [cond], "c_concat": [image_cond]}

    def _skips_uncond(self, denoiser: Any, sigma: Any) -> bool:
        """The WebUI's own rule (sd_samplers_cfg_denoiser.py L219-224)."""
        opts = self.m.shared.opts
        if opts.skip_early_cond != 0 and denoiser.step / denoiser.total_steps <= opts.skip_early_cond:
            return True
        s_min_uncond = getattr(denoiser.sampler, "s_min_uncond", 0) or 0
        if not (s_min_uncond > 0 and (denoiser.step % 2 or opts.s_min_uncond_all)):
            return False
        return bool(sigma[0] < s_min_uncond)

    def _refuse_pass(self, error: GuidanceError) -> None:
        # Inside p.sample already: make this pass's sampling call raise instead of running.
        self.current = None
        self.unregister()
        sampler = self.p.sampler

        def refuse(*args, **kwargs):
            _forget_cached_conds(self.p)
            raise error
        sampler.sample = sampler.sample_img2img = refuse

    def _invert_in(self, sampler: Any) -> None:
        """LEDITS++: the pass's sampler inverts the init latents before it samples."""
        if self.inverter is not None and self.inverter.sampler is sampler:
            return
        if self.inverter is not None:
            self.inverter.restore()

        def quiet(on: bool) -> None:
            self.inverting = on
        self.inverter = InvertingSampler(sampler, seeds=lambda: self.p.seeds, quiet=quiet,
                                         state=getattr(self.m.shared, "state", None))

    def _attend(self, guidance: PassGuidance) -> None:
        """The cross-attention mask: a recorder on the UNet, armed for each call's concept
        rows; refused before sampling for a concept it cannot read."""
        m, p = self.m, self.p
        steps = p.sampler.config.total_steps(p.steps)
        tokens = [concept_tokens(c.prompt, steps, m.prompt_parser, m.prompt_tokens)
                  for c in self.config.concepts]
        problem = mask_token_problem(tokens)
        if problem:
            raise GuidanceError(problem)
        timesteps = isinstance(p.sampler, m.sd_samplers_timesteps.CompVisSampler)
        if self.attention is not None:  # an earlier batch's
            self.attention.recorder.detach()
        self.attention = AttentionMasks(m.shared.sd_model.model.diffusion_model, tokens,
                                        timesteps, need_timestep=self.keep_image_mask == "both")
        attention = self.attention
        guidance.guidance.engine.use_attention(self.keep_image_mask, attention.attention,
                                               lambda: attention.timestep)
        guidance.on_concept_rows = attention.arm
        attention.recorder.attach()

    # -- callbacks ---------------------------------------------------------------------------

    def register(self) -> None:
        if self.m.forge is not None:
            # Forge resets the UNet before every pass (processing.py L1373, L1518, L1851):
            # the pass's post-CFG function goes on a clone of it, as Forge's own PAG does.
            unet = self.p.sd_model.forge_objects.unet
            patched = unet.clone()
            patched.set_model_sampler_post_cfg_function(
                post_cfg_function(self.current),
                disable_cfg1_optimization=self.m.forge.keep_cfg1_uncond)
            if self.m.forge.evaluate_lists is not None:  # reForge: join its model call
                problem = join_problem(patched.model_options, self.current.max_rows)
                if problem:
                    self._say_separate_call(problem)
                else:
                    patched.set_model_sampler_calc_cond_batch_function(
                        calc_cond_batch_function(self.current))
            self.p.sd_model.forge_objects.unet = patched
            self._forge_unets = (unet, patched)
            return
        if self.registered:
            return
        cb = self.m.script_callbacks
        cb.on_cfg_denoiser(self.on_cfg_denoiser, name=_ATTRIBUTE)
        cb.on_cfg_denoised(self.on_cfg_denoised, name=_ATTRIBUTE)
        cb.on_cfg_after_cfg(self.on_cfg_after_cfg, name=_ATTRIBUTE)
        self.registered = True

    def unregister(self) -> None:
        if self.inverter is not None:
            self.inverter.restore()
            self.noise_map_bytes = max(self.noise_map_bytes, self.inverter.last_maps_bytes)
            self.inverter = None
        self._release_hooks()

    def _release_hooks(self) -> None:
        """Takes our post-CFG function (Forge) or our callbacks (A1111) away, and the
        cross-attention recorder's hooks."""
        if self.attention is not None:
            self.attention.recorder.detach()
            self.attention = None
        if self._forge_unets is not None:
            unet, patched = self._forge_unets
            if self.p.sd_model.forge_objects.unet is patched:
                self.p.sd_model.forge_objects.unet = unet
            self._forge_unets = None
        if not self.registered:
            return
        for callback in (self.on_cfg_denoiser, self.on_cfg_denoised, self.on_cfg_after_cfg):
            self.m.script_callbacks.remove_callbacks_for_function(callback)
        self.registered = False

    def on_cfg_denoiser(self, params) -> None:
        current = self.current
        if current is None or self.inverting:  # the inversion's calls get no edit
            return
        if _model_key(self.m.shared.sd_model) != self.encoded_for:  # the SDXL refiner took over
            try:
                current.replace_schedules(self._encode())
            except Exception as error:
                raise StopSampling(sampling_failure(
                    error, step=current.clock.index(params.denoiser.step), rows=0,
                    what="encoding the concepts for the refiner")) from error
        current.on_cfg_denoiser(params)

    def on_cfg_denoised(self, params) -> None:
        if self.current is not None:
            self.current.on_cfg_denoised(params)
        if self.attention is not None:
            self.attention.recorder.disarm()  # the step's maps are used: let them go

    def on_cfg_after_cfg(self, params) -> None:
        if self.current is not None:
            self.current.on_cfg_after_cfg(params)


def _enabled_controlnet_units(p: Any) -> List[Tuple[int, Callable[[str], Any]]]:
    """A field reader for each enabled unit in the ControlNet script's arguments (units are
    objects, or dicts from the API; sd-webui-controlnet internal_controlnet/external_code.py
    L126-160, L398-416)."""
    runner = getattr(p, "scripts", None)
    controlnet = next((s for s in getattr(runner, "alwayson_scripts", [])
                       if str(getattr(s, "title", str)()).lower() == "controlnet"), None)
    if controlnet is None:
        return []
    units = (getattr(p, "script_args", None) or [])[controlnet.args_from:controlnet.args_to]
    readers = [(lambda key, u=unit: u.get(key)) if isinstance(unit, dict) else
               (lambda key, u=unit: getattr(u, key, None)) for unit in units]
    return [(number, field) for number, field in enumerate(readers, start=1) if field("enabled")]


# ControlNet modes that keep per-row state made at the first model call of a pass and reuse it
# at every later call (sd-webui-controlnet scripts/hook.py, UnetHook forward:
# used_hint_cond_latent is encoded at that call's row count for attention injection
# (reference_only, reference_adain, reference_adain+attn), inpaint_only and tile_colorfix, and
# used_hint_inpaint_hijack for inpainting checkpoints). A model call with another row count
# breaks them. Everything else (control models, T2I adapters, ControlLLLite, IP-Adapter, which
# picks its image embedding per row from the marks) is computed afresh in each call.
ROW_CACHING_MODES = ("reference", "inpaint_only", "colorfix")


def controlnet_units_that_cannot_follow(p: Any, inpainting_model: bool) -> List[str]:
    """'unit N (mode)' for each enabled ControlNet unit that cannot follow concept rows
    evaluated in a model call of their own."""
    found = []
    for number, field in _enabled_controlnet_units(p):
        mode = str(field("module") or "")
        if any(name in mode for name in ROW_CACHING_MODES) or (
                inpainting_model and mode.startswith("inpaint")):
            found.append(f"unit {number} ({mode})")
    return found


def _cannot_follow(units: List[str]) -> str:
    return (f"ControlNet {', '.join(units)} cannot follow (it keeps per-row state from the "
            "first model call of the pass)")


def two_row_controlnet_units(p: Any) -> List[str]:
    """Enabled ControlNet units that assume exactly two rows per image: AnimateDiff batches,
    SparseCtrl models and multi-image (merge) inputs duplicate their control once for cond
    and once for uncond (sd-webui-controlnet scripts/controlnet.py L948-1009), so concept
    rows would not get a control of their own."""
    problems = []
    for number, field in _enabled_controlnet_units(p):
        mode = getattr(field("input_mode"), "value", field("input_mode"))
        kind = ("an AnimateDiff batch" if field("animatediff_batch") else
                "a SparseCtrl model" if "sparsectrl" in str(field("model") or "").lower() else
                "merged multiple inputs" if mode == "merge" else None)
        if kind:
            problems.append(f"ControlNet unit {number} uses {kind}, which assumes exactly two "
                            "rows per image; turn that unit or guidance off")
    return problems


def _model_key(model: Any) -> tuple:
    return id(model), getattr(model, "sd_checkpoint_info", None)


def _refuse_sampling(p: Any, error: GuidanceError) -> None:
    """Makes this generation's sampling call raise `error` before any step: the WebUI logs and
    ignores exceptions from script hooks, but not from sampling (webui-contract.md)."""
    def refuse(*args, **kwargs):
        _forget_cached_conds(p)
        raise error
    p.sample = refuse


def _forget_cached_conds(p: Any) -> None:
    """A refused generation must leave nothing behind. ControlNet marks the WebUI's cached
    prompt conditioning in place when sampling starts and clears those caches only from inside
    the UNet (sd-webui-controlnet scripts/hook.py L109-110, L458-470): with no model call, its
    marks would reach the next generation. Emptying the caches costs one encoding."""
    for name in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
        cache = getattr(p, name, None)
        if isinstance(cache, list) and len(cache) == 2:
            cache[0] = cache[1] = None
