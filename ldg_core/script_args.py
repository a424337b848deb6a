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

from .config import MAX_CONCEPTS, Concept, GuidanceConfig
from .presets import Preset, find_preset
from .ui_args import (DIRECTIONS, NEVER, SLOT_FIELDS, SLOTS_END, args_from_config,
                      config_from_args, default_args, slot_index)

API_KEYS = ("enabled", "concepts", "momentum_scale", "momentum_beta", "preset", "concept_maps")
# X/Y/Z axes: global keys, and (slot, field) pairs with the slot counted from 0.
GLOBAL_OVERRIDES = ("enabled", "momentum_scale", "momentum_beta", "preset")
SLOT_OVERRIDES = ("prompt", "direction", "scale", "threshold", "warmup", "cooldown", "weight")


@dataclass(frozen=True)
class ScriptSettings:
    config: Optional[GuidanceConfig]  # None: nothing to do (disabled, or no concept)
    concept_maps: bool = False


def settings_from_args(args: Sequence[Any], presets: Mapping[str, Preset],
                       overrides: Optional[Mapping[Any, Any]] = None) -> ScriptSettings:
    """The settings of one generation. `args` is positional, or a dict as its first item (the
    API's dict form; the WebUI fills the remaining positions with the UI's defaults, which are
    then ignored). `overrides` come from X/Y/Z plot axes."""
    if args and isinstance(args[0], Mapping):
        config, maps = _from_dict(args[0], presets)
        if not overrides:
            return ScriptSettings(config, maps)
        values = args_from_config(config, enabled=config is not None)
        values[SLOTS_END] = maps
    else:
        values = list(args) + default_args()[len(args):]
    if overrides:
        values = apply_overrides(values, overrides, presets)
    maps = values[SLOTS_END]
    if not isinstance(maps, bool):
        raise ValueError(f"concept_maps must be true or false, got {maps!r}")
    config = config_from_args(values)
    return ScriptSettings(config, maps and config is not None)


# -- the dict form -------------------------------------------------------------------------------

def _from_dict(data: Mapping[str, Any], presets: Mapping[str, Preset]):
    unknown = [k for k in data if k not in API_KEYS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in the API argument; allowed keys are "
                         + ", ".join(API_KEYS))
    enabled = data.get("enabled", True)
    maps = data.get("concept_maps", False)
    for key, value in (("enabled", enabled), ("concept_maps", maps)):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
    if not enabled:
        return None, False
    base = GuidanceConfig()
    if "preset" in data:
        base = find_preset(data["preset"], presets).config
    concepts = base.concepts
    if "concepts" in data:
        concepts = _concepts(data["concepts"])
    config = GuidanceConfig(
        concepts=concepts,
        momentum_scale=data.get("momentum_scale", base.momentum_scale),
        momentum_beta=data.get("momentum_beta", base.momentum_beta))
    return (config if config.concepts else None), maps and bool(config.concepts)


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
    if "enabled" in overrides:
        values[0] = _boolean("enabled", overrides["enabled"])
    for position, key in ((1, "momentum_scale"), (2, "momentum_beta")):
        if key in overrides:
            values[position] = overrides[key]
    for key, value in overrides.items():
        if key in GLOBAL_OVERRIDES:
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
           "GLOBAL_OVERRIDES", "SLOT_OVERRIDES", "SLOT_FIELDS"]
