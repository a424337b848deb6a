"""Latent Diffusion Guidance: the WebUI entry point. Thin by design: the work is in ldg_core."""

import gradio as gr

from modules import (prompt_parser, script_callbacks, scripts, sd_samplers_cfg_denoiser,
                     sd_samplers_common, sd_samplers_timesteps, shared)

from ldg_core import MAX_CONCEPTS
from ldg_core.ui_args import DIRECTIONS, GLOBAL_DEFAULTS, NEVER, SLOT_DEFAULTS, config_from_args
from ldg_core.webui_generation import MAX_ROWS_OPTION, Generation, WebUIModules

TITLE = "Latent Diffusion Guidance"
MODULES = WebUIModules(shared=shared, script_callbacks=script_callbacks,
                       prompt_parser=prompt_parser, sd_samplers_common=sd_samplers_common,
                       sd_samplers_cfg_denoiser=sd_samplers_cfg_denoiser,
                       sd_samplers_timesteps=sd_samplers_timesteps)
VISIBLE_SLOTS = 3
SETTINGS_SECTION = ("latent_diffusion_guidance", TITLE)
_conds_cache = [None, None]  # concept conditioning, kept across generations like the WebUI's


def on_ui_settings():
    """The extension's section of the WebUI Settings."""
    shared.opts.add_option(MAX_ROWS_OPTION, shared.OptionInfo(
        0, "Max rows per UNet call (0 = no limit)", gr.Number, {"precision": 0, "minimum": 0},
        section=SETTINGS_SECTION).info(
        "caps memory: concept rows that would make a model call larger are evaluated in extra "
        "calls of at most this many rows; same image, slower"))


script_callbacks.on_ui_settings(on_ui_settings)


class LatentDiffusionGuidanceScript(scripts.Script):
    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        # The same components in the same order every time (ldg_core.ui_args): positional API
        # arguments depend on it.
        with gr.Accordion(TITLE, open=False, elem_id=self.elem_id("accordion")):
            enabled = gr.Checkbox(label="Enable", value=GLOBAL_DEFAULTS["enabled"])
            with gr.Row():
                momentum_scale = gr.Number(label="Momentum scale",
                                           value=GLOBAL_DEFAULTS["momentum_scale"])
                momentum_beta = gr.Slider(label="Momentum beta", minimum=0.0, maximum=1.0,
                                          step=0.01, value=GLOBAL_DEFAULTS["momentum_beta"])
            slots = []
            for slot in range(MAX_CONCEPTS):
                slots.extend(self._slot_ui(slot, visible=slot < VISIBLE_SLOTS))
        return [enabled, momentum_scale, momentum_beta] + slots

    def _slot_ui(self, slot, visible):
        d = SLOT_DEFAULTS
        with gr.Group(visible=visible):
            with gr.Row():
                slot_enabled = gr.Checkbox(label=f"Concept {slot + 1}", value=d["slot_enabled"])
                direction = gr.Radio(label="Direction", choices=list(DIRECTIONS),
                                     value=d["direction"])
            prompt = gr.Textbox(label="Concept prompt", lines=2, value=d["prompt"])
            with gr.Row():
                scale = gr.Number(label="Scale", value=d["scale"])
                threshold = gr.Slider(label="Threshold", minimum=0.0, maximum=1.0, step=0.01,
                                      value=d["threshold"])
                warmup = gr.Number(label="Warmup", value=d["warmup"], precision=0)
                cooldown = gr.Number(label=f"Cooldown ({NEVER} = never)", value=d["cooldown"],
                                     precision=0)
                weight = gr.Number(label="Weight", value=d["weight"])
        return [slot_enabled, prompt, direction, scale, threshold, warmup, cooldown, weight]

    def process(self, p, *args):
        try:
            config, error = config_from_args(args), None
        except ValueError as bad:
            config, error = None, bad
        Generation.attach(p, config, MODULES, _conds_cache, error)

    def process_before_every_sampling(self, p, *args, **kwargs):
        generation = Generation.of(p)
        if generation is not None:
            generation.start_pass(kwargs["c"])

    def postprocess(self, p, processed, *args):
        generation = Generation.of(p)
        if generation is not None:
            generation.unregister()
