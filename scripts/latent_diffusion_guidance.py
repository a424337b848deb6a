"""Latent Diffusion Guidance: the WebUI entry point. Thin by design: the work is in ldg_core.

Here: the UI (accordion, slots, presets), the Settings option, image-parameter pasting, X/Y/Z
axes and the per-generation hooks, each handing over to ldg_core at once. The sampling side
(torch) is imported on first use, so the UI builds without it.
"""

import logging

import gradio as gr

from modules import script_callbacks, scripts, shared
from modules.ui_components import InputAccordion

from ldg_core import MAX_CONCEPTS
from ldg_core.config import MASKS
from ldg_core.hosts import NAMES as HOST_NAMES, detect_host, describe_host
from ldg_core.paste import paste_from_params
from ldg_core.presets import all_presets, find_preset, save_user_preset, user_presets_path
from ldg_core.script_args import (GLOBAL_OVERRIDES, KEEP_IMAGE_OVERRIDES, SAFETY_OVERRIDES,
                                  settings_from_args)
from ldg_core.safety_config import PRESETS as SLD_PRESETS
from ldg_core.ui_args import (DIRECTIONS, GLOBAL_DEFAULTS, KEEP_IMAGE, NEVER, SAFETY_CONFIGS,
                              SAFETY_DEFAULTS, SAFETY_END, SAFETY_NUMBERS, SAFETY_START,
                              SLOT_DEFAULTS, SLOT_FIELDS, SLOTS_END, MAX_ROWS_OPTION,
                              args_from_config, config_from_args, safety_from_args,
                              safety_values)

log = logging.getLogger("latent_diffusion_guidance")

TITLE = "Latent Diffusion Guidance"
SECTION = ("latent_diffusion_guidance", TITLE)
SLOTS_OPTION = "ldg_visible_slots"
DEFAULT_VISIBLE_SLOTS = 3
XYZ_ATTRIBUTE = "latent_diffusion_guidance_xyz"  # a cell's axis values, on its processing copy
_conds_cache = [None, None]  # concept conditioning, kept across generations like the WebUI's
_modules = []  # the WebUI modules the sampling side uses, looked up once
HOST = detect_host()
print(f"Latent Diffusion Guidance: {describe_host(HOST)}")


def visible_slots():
    count = shared.opts.data.get(SLOTS_OPTION, DEFAULT_VISIBLE_SLOTS)
    try:
        return min(max(int(count), 1), MAX_CONCEPTS)
    except (TypeError, ValueError):
        return DEFAULT_VISIBLE_SLOTS


def presets_path():
    from modules import paths_internal  # the WebUI's data directory (--data-dir)
    return user_presets_path(paths_internal.data_path)


def presets():
    """Built-in and user presets; a broken user file is reported and the built-ins remain."""
    try:
        return all_presets(presets_path())
    except ValueError as error:
        log.warning("Latent Diffusion Guidance: %s; only the built-in presets are offered", error)
        return all_presets()


class LatentDiffusionGuidanceScript(scripts.Script):
    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        # The same components in the same order every time (ldg_core.ui_args): positional API
        # arguments depend on it. Slots past the Settings count exist too, hidden.
        shown = visible_slots()
        with InputAccordion(GLOBAL_DEFAULTS["enabled"], label=TITLE,
                            elem_id=self.elem_id("ldg")) as enabled:
            with gr.Row(elem_classes=["ldg-row"]):
                preset = gr.Dropdown(label="Preset", choices=list(presets()), value=None,
                                     elem_id=self.elem_id("ldg_preset"),
                                     elem_classes=["ldg-preset"])
                preset_name = gr.Textbox(label="Save current as", placeholder="preset name",
                                         elem_id=self.elem_id("ldg_preset_name"),
                                         elem_classes=["ldg-preset-name"])
                save = gr.Button("Save preset", elem_id=self.elem_id("ldg_save"),
                                 elem_classes=["ldg-save"])
            preset_status = gr.Markdown("", elem_classes=["ldg-status"])
            with gr.Row(elem_classes=["ldg-row"]):
                momentum_scale = gr.Number(label="Momentum scale",
                                           value=GLOBAL_DEFAULTS["momentum_scale"],
                                           elem_id=self.elem_id("ldg_momentum_scale"),
                                           elem_classes=["ldg-momentum-scale"])
                momentum_beta = gr.Slider(label="Momentum beta", minimum=0.0, maximum=1.0,
                                          step=0.01, value=GLOBAL_DEFAULTS["momentum_beta"],
                                          elem_id=self.elem_id("ldg_momentum_beta"),
                                          elem_classes=["ldg-momentum-beta"])
                concept_maps = gr.Checkbox(label="Show where each concept acted", value=False,
                                           elem_id=self.elem_id("ldg_concept_maps"),
                                           elem_classes=["ldg-concept-maps"])
            slots, groups = [], []
            for slot in range(MAX_CONCEPTS):
                group, fields = self._slot_ui(slot, visible=slot < shown)
                groups.append(group)
                slots.extend(fields)
            safety = self._safety_ui()
            keep_image = gr.Checkbox(
                label="Keep the image (LEDITS++ inversion)", value=False, visible=is_img2img,
                elem_id=self.elem_id("ldg_keep_image"), elem_classes=["ldg-keep-image"],
                info="inverts the init image first, so only what the concepts touch changes; "
                     "sampler DDIM or DPM++ 2M SDE, one extra model call per step")
            keep_image_mask = gr.Radio(
                label="Where concepts act (LEDITS++ mask)", choices=list(MASKS), value="noise",
                visible=is_img2img, interactive=True, elem_id=self.elem_id("ldg_keep_image_mask"),
                elem_classes=["ldg-keep-image-mask"])
        args = ([enabled, momentum_scale, momentum_beta] + slots + [concept_maps] + safety
                + [keep_image, keep_image_mask])
        self._wire_presets(preset, preset_name, save, preset_status, args, groups)
        self._wire_paste(args, groups, is_img2img)
        return args

    def _safety_ui(self):
        """Safe Latent Diffusion's part: on/off, the configuration, the safety concept and
        SLD's five numbers, in ui_args.SAFETY_FIELDS order."""
        d = SAFETY_DEFAULTS

        def ids(field):
            return {"elem_id": self.elem_id(f"ldg_{field}"),
                    "elem_classes": [f"ldg-{field.replace('_', '-')}"]}
        with gr.Group(elem_classes=["ldg-slot", "ldg-sld"]):
            with gr.Row(elem_classes=["ldg-row", "ldg-head"]):
                on = gr.Checkbox(label="Safe Latent Diffusion", value=d["sld_enabled"], scale=0,
                                 min_width=200, **ids("sld_enabled"))
                config = gr.Dropdown(label="Configuration", choices=list(SAFETY_CONFIGS),
                                     value=d["sld_config"], scale=1, **ids("sld_config"))
            concept = gr.Textbox(label="Safety concept (steered away from)", lines=2,
                                 value=d["sld_concept"], **ids("sld_concept"))
            with gr.Row(elem_classes=["ldg-row", "ldg-numbers"]):
                numbers = [
                    gr.Number(label="SLD scale", value=d["sld_scale"], **ids("sld_scale")),
                    gr.Number(label="SLD threshold", value=d["sld_threshold"],
                              **ids("sld_threshold")),
                    gr.Number(label="SLD warmup", value=d["sld_warmup"], precision=0,
                              **ids("sld_warmup")),
                    gr.Number(label="SLD momentum scale", value=d["sld_momentum_scale"],
                              **ids("sld_momentum_scale")),
                    gr.Slider(label="SLD momentum beta", minimum=0.0, maximum=1.0, step=0.01,
                              value=d["sld_momentum_beta"], **ids("sld_momentum_beta"))]
            gr.Markdown(
                "Safe Latent Diffusion (SLD, arXiv 2211.05105) exactly as diffusers' "
                "`StableDiffusionPipelineSafe` runs it; it adds to the concepts above. The "
                "presets \"Safety: weak\" ... \"max\" are not SLD: they remove a concept of our "
                "own wording with semantic guidance.", elem_classes=["ldg-status"])

        def pick(name):  # a named configuration shows its numbers; custom keeps them
            if name not in SLD_PRESETS:
                return [gr.update()] * len(numbers)
            return [gr.update(value=SLD_PRESETS[name][key]) for key in SAFETY_NUMBERS.values()]
        config.change(fn=pick, inputs=[config], outputs=numbers, show_progress=False)
        return [on, config, concept] + numbers

    def _slot_ui(self, slot, visible):
        d, n = SLOT_DEFAULTS, slot + 1

        def ids(field):
            return {"elem_id": self.elem_id(f"ldg_slot{n}_{field}"), "elem_classes": [f"ldg-{field}"]}
        with gr.Group(visible=visible, elem_classes=["ldg-slot"]) as group:
            with gr.Row(elem_classes=["ldg-row", "ldg-head"]):
                slot_enabled = gr.Checkbox(label=f"Concept {n}", value=d["slot_enabled"],
                                           scale=0, min_width=110, **ids("slot_enabled"))
                prompt = gr.Textbox(label="Concept prompt", show_label=False, lines=2,
                                    value=d["prompt"], scale=4,
                                    placeholder=f"concept {n}: the whole text is one concept, "
                                                "commas included", **ids("prompt"))
                direction = gr.Radio(label="Direction", show_label=False, choices=list(DIRECTIONS),
                                     value=d["direction"], scale=0, min_width=160,
                                     **ids("direction"))
            with gr.Row(elem_classes=["ldg-row", "ldg-numbers"]):
                scale = gr.Number(label="Scale", value=d["scale"], **ids("scale"))
                threshold = gr.Slider(label="Threshold", minimum=0.0, maximum=1.0, step=0.005,
                                      value=d["threshold"], **ids("threshold"))
                warmup = gr.Number(label="Warmup", value=d["warmup"], precision=0, **ids("warmup"))
                cooldown = gr.Number(label=f"Cooldown ({NEVER} never)", value=d["cooldown"],
                                     precision=0, **ids("cooldown"))
                weight = gr.Number(label="Weight", value=d["weight"], **ids("weight"))
        return group, [slot_enabled, prompt, direction, scale, threshold, warmup, cooldown,
                       weight]

    def _wire_presets(self, preset, preset_name, save, status, args, groups):
        settings = args[1:SLOTS_END]  # momentum scale, beta and every slot field
        safety = args[SAFETY_START:SAFETY_END]  # Safe Latent Diffusion's fields

        def fill(name):
            if not name:
                return [gr.update()] * (len(settings) + len(groups))
            found = find_preset(name, presets())
            config = found.config
            values = args_from_config(config)[1:1 + len(settings)]
            shown = [gr.update(visible=True) if i < len(config.concepts) else gr.update()
                     for i in range(len(groups))]
            # A preset with an SLD part sets it; one without leaves SLD as it is.
            sld = ([gr.update(value=v) for v in safety_values(found.safety)]
                   if found.safety is not None else [gr.update()] * len(safety))
            return [gr.update(value=v) for v in values] + shown + sld
        preset.change(fn=fill, inputs=[preset], outputs=settings + groups + safety,
                      show_progress=False)

        def store(name, *values):
            try:
                slots, sld = values[:len(settings)], values[len(settings):]
                config = config_from_args([True, *slots])
                whole = [True, *slots] + [False] * (SAFETY_START - SLOTS_END) + list(sld)
                safety_config = safety_from_args(whole)
                if config is None and safety_config is None:
                    raise ValueError("a preset needs at least one concept with a prompt, or "
                                     "Safe Latent Diffusion on")
                save_user_preset(presets_path(), name, config, safety=safety_config)
            except ValueError as error:
                return gr.update(), f"Not saved: {error}"
            return gr.update(choices=list(presets()), value=name.strip()), f"Saved {name.strip()!r}."
        save.click(fn=store, inputs=[preset_name] + settings + safety, outputs=[preset, status],
                   show_progress=False)

    def _wire_paste(self, args, groups, is_img2img):
        """Image parameters -> fields (ldg_core.paste); each field asks for its own value.
        txt2img's hidden "Keep the image" box is never ticked by a paste (an img2img image's
        parameters would otherwise refuse every txt2img run, with the box out of sight)."""
        last = []

        def paste(params):
            if not last or last[0] is not params:  # one parse (and one warning) per paste
                result = paste_from_params(params)
                if result.warning:
                    log.warning("%s", result.warning)
                last[:] = [params, result]
            return last[1]

        def field(position):
            def value(params):
                result = paste(params)
                if position not in result.values:
                    return gr.update()
                keep_in_txt2img = position == KEEP_IMAGE and not is_img2img
                return gr.update(value=False if keep_in_txt2img else result.values[position])
            return value

        def shown(slot):
            return lambda params: gr.update(visible=True) if slot < paste(params).concepts \
                else gr.update()
        pasted = [i for i in range(len(args)) if i < SLOTS_END or i >= SAFETY_START]
        self.infotext_fields = ([(args[i], field(i)) for i in pasted]
                                + [(group, shown(s)) for s, group in enumerate(groups)])

    def process(self, p, *args):
        from ldg_core.webui_generation import (INFOTEXT_KEY, KEEP_IMAGE_KEY, SAFETY_KEY,
                                               SEPARATE_CALL_KEY, Generation)
        for key in (INFOTEXT_KEY, SAFETY_KEY, SEPARATE_CALL_KEY, KEEP_IMAGE_KEY):  # earlier cell's
            p.extra_generation_params.pop(key, None)
        try:
            settings = settings_from_args(args, presets(), getattr(p, XYZ_ATTRIBUTE, None))
            config, maps, safety, keep, error = (settings.config, settings.concept_maps,
                                                 settings.safety, settings.keep_image, None)
            mask = settings.keep_image_mask
        except ValueError as bad:
            config, maps, safety, keep, mask, error = None, False, None, False, "noise", bad
        Generation.attach(p, config, webui_modules(), _conds_cache, error, concept_maps=maps,
                          safety=safety, keep_image=keep, keep_image_mask=mask)

    def process_before_every_sampling(self, p, *args, **kwargs):
        from ldg_core.webui_generation import Generation
        generation = Generation.of(p)
        if generation is not None:
            generation.start_pass(kwargs["c"], kwargs.get("uc"))

    def postprocess(self, p, processed, *args):
        from ldg_core.webui_generation import Generation
        generation = Generation.of(p)
        if generation is None:
            return
        generation.unregister()
        if generation.map_batches and hasattr(processed, "images"):
            add_concept_maps(p, processed, generation)


def webui_modules():
    if not _modules:
        from modules import (prompt_parser, sd_samplers_cfg_denoiser, sd_samplers_common,
                             sd_samplers_timesteps)

        from ldg_core.webui_generation import WebUIModules
        _modules.append(WebUIModules(
            shared=shared, script_callbacks=script_callbacks, prompt_parser=prompt_parser,
            sd_samplers_common=sd_samplers_common,
            sd_samplers_cfg_denoiser=sd_samplers_cfg_denoiser,
            sd_samplers_timesteps=sd_samplers_timesteps,
            forge=forge_functions() if HOST != "a1111" else None, prompt_tokens=prompt_tokens))
    return _modules[0]


def prompt_tokens(text):
    """The WebUI's token count of a text, as its token counter has it (sd_hijack.py L324-333;
    SD 1.x, 2.x and SDXL alike, sd_models_xl.py L73-86)."""
    from modules import sd_hijack
    return sd_hijack.model_hijack.get_prompt_lengths(text)[0]


def forge_functions():
    """How concepts are evaluated where the model runs in the host's own sampling code."""
    from ldg_core.forge import REFORGE_TWO_CALL, ForgeFunctions, reforge_sampler_problem
    if HOST in ("forge", "neo"):
        from backend.sampling import condition, sampling_function
        return ForgeFunctions(
            HOST_NAMES[HOST], lambda model, entry, x, sigma, options: sampling_function.
            calc_cond_uncond_batch(model, [], [entry], x, sigma, options)[1],
            cross_attn=condition.ConditionCrossAttn, condition=condition.Condition)
    from ldm_patched.modules import conds, samplers
    return ForgeFunctions(
        "reForge", lambda model, entry, x, sigma, options: samplers.calc_cond_batch(
            model, [None, [entry]], x, sigma, options)[1],
        cross_attn=conds.CONDCrossAttn, condition=conds.CONDRegular, keep_cfg1_uncond=True,
        evaluate_lists=samplers.calc_cond_batch, sampler_problem=reforge_sampler_problem,
        two_call_samplers=REFORGE_TWO_CALL)


def add_concept_maps(p, processed, generation):
    """Appends one overlay per image and concept to the gallery (and the API's images), after
    the generated images; they are not saved unless the user saves them."""
    import numpy as np
    from PIL import Image, ImageDraw

    first = getattr(processed, "index_of_first_image", 0)
    pictures = processed.images[first:first + p.n_iter * p.batch_size]
    arrays = [np.asarray(image.convert("RGB")) for image in pictures]
    concepts = generation.config.concepts
    for image_index, concept_index, overlay in generation.concept_map_overlays(arrays):
        picture = Image.fromarray(overlay)
        if concept_index < len(concepts):
            concept = concepts[concept_index]
            direction = "remove" if concept.reverse else "add"
            label = f"concept {concept_index + 1}: {direction} {concept.prompt[:40]!r}"
        else:  # Safe Latent Diffusion's term, where its mask acted
            label = f"safety: {generation.safety.concept[:40]!r}"
        ImageDraw.Draw(picture).text((4, 4), label, fill=(255, 255, 255), stroke_width=2,
                                     stroke_fill=(0, 0, 0))
        processed.images.append(picture)
        infotexts = getattr(processed, "infotexts", None)
        if isinstance(infotexts, list) and first + image_index < len(infotexts):
            infotexts.append(infotexts[first + image_index])


# -- Settings and X/Y/Z axes, registered once when the script loads -------------------------

def add_settings():
    """The Settings section; more options of this extension go here, next to this one."""
    shared.opts.add_option(SLOTS_OPTION, shared.OptionInfo(
        DEFAULT_VISIBLE_SLOTS, "Concept slots shown in txt2img and img2img", gr.Slider,
        {"minimum": 1, "maximum": MAX_CONCEPTS, "step": 1}, section=SECTION).needs_reload_ui())
    shared.opts.add_option(MAX_ROWS_OPTION, shared.OptionInfo(
        0, "Max rows per UNet call (0 = no limit)", gr.Number, {"precision": 0, "minimum": 0},
        section=SECTION).info(
        "caps memory: concept rows that would make a model call larger are evaluated in extra "
        "calls of at most this many rows; same image, slower"))


def xyz_module():
    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid"):
            return data.module
    return None


def set_override(key):
    def apply(p, value, values):
        # A new dict: processing copies of one grid share the original's attributes.
        setattr(p, XYZ_ATTRIBUTE, {**getattr(p, XYZ_ATTRIBUTE, {}), key: value})
    return apply


def add_xyz_axes():
    xyz = xyz_module()
    if xyz is None or any(o.label.startswith("[LDG]") for o in xyz.axis_options):
        return
    types = {"momentum_scale": float, "momentum_beta": float, "prompt": str, "direction": str,
             "scale": float, "threshold": float, "warmup": int, "cooldown": str, "weight": float}
    choices = {"enabled": lambda: ["True", "False"], "preset": lambda: list(presets()),
               "direction": lambda: list(DIRECTIONS)}
    options = []
    for key in GLOBAL_OVERRIDES:
        label = "[LDG] " + key.replace("_", " ").capitalize()
        options.append(xyz.AxisOption(label, types.get(key, str), set_override(key),
                                      choices=choices.get(key)))
    sld_types = {"sld_config": str, "sld_warmup": int}
    for key in SAFETY_OVERRIDES:  # Safe Latent Diffusion: "[LDG] SLD configuration", ...
        label = "[LDG] SLD " + ("configuration" if key == "sld_config" else
                                key[len("sld_"):].replace("_", " "))
        options.append(xyz.AxisOption(label, sld_types.get(key, float), set_override(key),
                                      choices=(lambda: list(SAFETY_CONFIGS))
                                      if key == "sld_config" else None))
    for key, label, values in zip(KEEP_IMAGE_OVERRIDES, ("Keep the image", "Keep the image mask"),
                                  (["True", "False"], list(MASKS))):  # img2img's grids
        options.append(xyz.AxisOption(f"[LDG] {label}", str, set_override(key),
                                      choices=lambda values=values: values))
    for slot in range(visible_slots()):
        for field in SLOT_FIELDS[1:]:
            options.append(xyz.AxisOption(f"[LDG] Concept {slot + 1} {field}", types[field],
                                          set_override((slot, field)),
                                          choices=choices.get(field)))
    xyz.axis_options.extend(options)


script_callbacks.on_ui_settings(add_settings)
script_callbacks.on_before_ui(add_xyz_axes)
