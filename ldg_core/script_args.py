"""From the script's arguments to the settings of one generation.

Three ways in, one way out (`ScriptSettings`):
- positional: what ui() returns, in ui_args order (the UI, and the API's "args": [...]);
- a dict as the only argument (the API): {"enabled": true, "concepts": [...], ...};
- X/Y/Z plot overrides on top of either, for one cell of the grid.
Every problem is a ValueError that names the concept (or key), the field and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from .config import MAX_CONCEPTS, check_mask, Concept, GuidanceConfig
from .presets import Preset, find_preset
from .safety_config import PRESETS as SAFETY_PRESETS, SafetyConfig
from .ui_args import (CUSTOM, DIRECTIONS, KEEP_IMAGE, KEEP_IMAGE_MASK, NEVER, SAFETY_CONFIGS,
                      SAFETY_FIELDS, SAFETY_NUMBERS, SAFETY_START, SLOT_FIELDS, SLOTS_END, args_from_config, config_from_args,
                      default_args, safety_from_args, safety_values, slot_index)

API_KEYS = ("enabled", "concepts", "momentum_scale", "momentum_beta", "preset", "concept_maps",
            "safety", "keep_image", "keep_image_mask")
SAFETY_KEYS = ("enabled", "config", "concept", "scale", "threshold", "warmup",
               "momentum_scale", "momentum_beta")
# X/Y/Z axes: global keys, and (slot, field) pairs with the slot counted from 0.
GLOBAL_OVERRIDES = ("enabled", "momentum_scale", "momentum_beta", "preset")
SLOT_OVERRIDES = ("prompt", "direction", "scale", "threshold", "warmup", "cooldown", "weight")
# Safe Latent Diffusion's axes: the configuration and its five numbers (ui_args field names).
SAFETY_OVERRIDES = ("sld_config",) + tuple(SAFETY_NUMBERS)
# img2img's Keep the image (LEDITS++): on/off and its mask.
KEEP_IMAGE_OVERRIDES = ("keep_image", "keep_image_mask")


@dataclass(frozen=True)
class ScriptSettings:
    config: Optional[GuidanceConfig]  # None: no concept (disabled, or none given)
    concept_maps: bool = False
    safety: Optional[SafetyConfig] = None  # None: Safe Latent Diffusion off
    keep_image: bool = False  # img2img: LEDITS++ inversion of the init image
    keep_image_mask: str = "noise"  # where its concepts act: one of config.MASKS

    @property
    def active(self) -> bool:
        return self.config is not None or self.safety is not None or self.keep_image


def settings_from_args(args: Sequence[Any], presets: Mapping[str, Preset],
                       overrides: Optional[Mapping[Any, Any]] = None) -> ScriptSettings:
    """The settings of one generation. `args` is positional, or a dict as its first item (the
    API's dict form; the WebUI fills the remaining positions with the UI's defaults, which are
    then ignored). `overrides` come from X/Y/Z plot axes."""
    if args and isinstance(args[0], Mapping):
        config, maps, safety, keep, mask = _from_dict(args[0], presets)
        if not overrides:
            return ScriptSettings(config, maps, safety, keep, mask)
        values = args_from_config(config, enabled=config is not None or safety is not None
                                  or keep)
        values[SLOTS_END] = maps
        values[SAFETY_START:SAFETY_START + len(SAFETY_FIELDS)] = safety_values(safety)
        values[KEEP_IMAGE], values[KEEP_IMAGE_MASK] = keep, mask
    else:
        values = list(args) + default_args()[len(args):]
    if overrides:
        values = apply_overrides(values, overrides, presets)
    maps, keep = values[SLOTS_END], values[KEEP_IMAGE]
    for key, value in (("concept_maps", maps), ("keep_image", keep)):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
    mask = check_mask(values[KEEP_IMAGE_MASK], "keep_image_mask")
    config, safety = config_from_args(values), safety_from_args(values)
    return ScriptSettings(config, maps and (config is not None or safety is not None), safety,
                          keep and bool(values[0]), mask)



# -- the dict form -------------------------------------------------------------------------------

def _from_dict(data: Mapping[str, Any], presets: Mapping[str, Preset]):
    unknown = [k for k in data if k not in API_KEYS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in the API argument; allowed keys are "
                         + ", ".join(API_KEYS))
    enabled = data.get("enabled", True)
    maps = data.get("concept_maps", False)
    keep = data.get("keep_image", False)
    for key, value in (("enabled", enabled), ("concept_maps", maps), ("keep_image", keep)):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
    mask = check_mask(data.get("keep_image_mask", "noise"), "keep_image_mask")
    if not enabled:
        return None, False, None, False, mask
    safety = _safety(data["safety"]) if "safety" in data else None
    base = GuidanceConfig()
    if "preset" in data:
        preset = find_preset(data["preset"], presets)
        base = preset.config
        if "safety" not in data:  # a preset's SLD part, unless "safety" says otherwise
            safety = preset.safety
    concepts = base.concepts
    if "concepts" in data:
        concepts = _concepts(data["concepts"])
    config = GuidanceConfig(
        concepts=concepts,
        momentum_scale=data.get("momentum_scale", base.momentum_scale),
        momentum_beta=data.get("momentum_beta", base.momentum_beta))
    active = bool(config.concepts) or safety is not None
    return (config if config.concepts else None), maps and active, safety, keep, mask


def _safety(data: Any) -> Optional[SafetyConfig]:
    """The "safety" key: {"config": "medium"} (or just "medium"), or a custom configuration:
    a named configuration fills in first, explicit numbers and concept then win."""
    if isinstance(data, str):
        data = {"config": data}
    if not isinstance(data, Mapping):
        raise ValueError(f"safety must be an object like {{\"config\": \"medium\"}}, got {data!r}")
    unknown = [k for k in data if k not in SAFETY_KEYS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in safety; allowed keys are "
                         + ", ".join(SAFETY_KEYS))
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ValueError(f"safety: enabled must be true or false, got {enabled!r}")
    if not enabled:
        return None
    name = data.get("config", "medium")  # SLD's defaults; given numbers override it
    numbers = [key for key in SAFETY_NUMBERS.values() if key in data]
    if name not in SAFETY_CONFIGS:
        raise ValueError(f"safety: config must be one of {', '.join(SAFETY_CONFIGS)}, "
                         f"got {name!r}")
    if name == CUSTOM and len(numbers) < len(SAFETY_NUMBERS):
        missing = [key for key in SAFETY_NUMBERS.values() if key not in data]
        raise ValueError(f"safety: a custom config needs every number; {missing[0]!r} is "
                         "missing (or name one of SLD's configurations and override some)")
    concept = data.get("concept", SafetyConfig.concept)
    if isinstance(concept, str) and not concept.strip():
        raise ValueError("safety: concept is empty; give the concept to steer away from or "
                         "leave the key out (SLD's own text)")
    base = SAFETY_PRESETS.get(name, {})
    try:
        return SafetyConfig(concept=concept, **{key: data.get(key, base.get(key))
                                                for key in SAFETY_NUMBERS.values()})
    except ValueError as error:
        raise ValueError(f"safety: {error}") from None


def _concepts(items: Any) -> list:
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        raise ValueError(f"concepts must be a list of objects, got {items!r}")
    if len(items) > MAX_CONCEPTS:
        raise ValueError(f"concepts: at most {MAX_CONCEPTS} concepts are supported, "
                         f"got {len(items)}")
    concepts = []
    for index, item in enumerate(items):
        label = f"concepts[{index}]"
        if not isinstance(item, Mapping):
            raise ValueError(f"{label} must be an object like {{\"prompt\": \"glasses\"}}, "
                             f"got {item!r}")
        prompt = item.get("prompt")
        if isinstance(prompt, str):
            label += f" ({prompt!r})"
        if isinstance(prompt, str) and not prompt.strip():
            raise ValueError(f"{label}: prompt is empty; give the concept's text or leave the "
                             "concept out")
        try:
            concepts.append(Concept.from_dict(item))
        except ValueError as error:
            raise ValueError(f"{label}: {error}") from None
    return concepts


# -- X/Y/Z overrides -----------------------------------------------------------------------------

def apply_overrides(values: Sequence[Any], overrides: Mapping[Any, Any],
                    presets: Mapping[str, Preset]) -> list:
    """Values with the axes' values put in: the preset first (it fills every slot and the
    momentum), then the global values, then single slot fields. Setting a slot's prompt also
    switches that slot on."""
    values = list(values)
    if "preset" in overrides:
        preset = find_preset(overrides["preset"], presets)
        values[:SLOTS_END] = args_from_config(preset.config, enabled=values[0])[:SLOTS_END]
        if preset.safety is not None:  # a preset with an SLD part sets it
            values[SAFETY_START:SAFETY_START + len(SAFETY_FIELDS)] = safety_values(preset.safety)
    if "enabled" in overrides:
        values[0] = _boolean("enabled", overrides["enabled"])
    _safety_overrides(values, overrides)
    if "keep_image" in overrides:
        values[KEEP_IMAGE] = _boolean("keep_image", overrides["keep_image"])
    if "keep_image_mask" in overrides:
        values[KEEP_IMAGE_MASK] = check_mask(overrides["keep_image_mask"], "keep_image_mask")
    for position, key in ((1, "momentum_scale"), (2, "momentum_beta")):
        if key in overrides:
            values[position] = overrides[key]
    for key, value in overrides.items():
        if key in GLOBAL_OVERRIDES or key in SAFETY_OVERRIDES or key in KEEP_IMAGE_OVERRIDES:
            continue
        slot, field = key
        label = f"concept {slot + 1} {field}"
        if not 0 <= slot < MAX_CONCEPTS or field not in SLOT_OVERRIDES:
            raise ValueError(f"no X/Y/Z axis for {label}")
        if field == "cooldown":
            value = _cooldown(label, value)
        elif field == "direction" and value not in DIRECTIONS:
            raise ValueError(f"{label} must be 'add' or 'remove', got {value!r}")
        elif field == "prompt":
            values[slot_index(slot, "slot_enabled")] = True
        values[slot_index(slot, field)] = value
    return values


def _safety_overrides(values: list, overrides: Mapping[Any, Any]) -> None:
    """SLD axes switch SLD on: the configuration first, then single numbers, which make the
    configuration "custom" (starting from the named configuration's numbers)."""
    keys = [k for k in SAFETY_OVERRIDES if k in overrides]
    if not keys:
        return
    position = {field: SAFETY_START + i for i, field in enumerate(SAFETY_FIELDS)}
    values[position["sld_enabled"]] = True
    name = overrides.get("sld_config", values[position["sld_config"]])
    name = name.strip().lower() if isinstance(name, str) else name
    if name not in SAFETY_CONFIGS:
        raise ValueError(f"SLD configuration must be one of {', '.join(SAFETY_CONFIGS)}, "
                         f"got {name!r}")
    values[position["sld_config"]] = name
    if name != CUSTOM:
        for field, key in SAFETY_NUMBERS.items():
            values[position[field]] = SAFETY_PRESETS[name][key]
    for field in SAFETY_NUMBERS:
        if field in overrides:
            values[position["sld_config"]] = CUSTOM
            values[position[field]] = overrides[field]


def _boolean(label: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    raise ValueError(f"{label} must be True or False, got {value!r}")


def _cooldown(label: str, value: Any) -> Any:
    """'never' (or -1, or empty) means never; otherwise a step number."""
    text = str(value).strip().lower()
    if text in ("never", "none", "", str(NEVER)):
        return NEVER
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{label} must be 'never' or an integer >= 0, got {value!r}") from None


__all__ = ["ScriptSettings", "settings_from_args", "apply_overrides", "API_KEYS",
           "GLOBAL_OVERRIDES", "SLOT_OVERRIDES", "SAFETY_OVERRIDES", "SLOT_FIELDS"]
