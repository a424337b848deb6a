"""The script's argument layout: what ui() returns, in order, and how it becomes a config.

The layout never changes, so positional API arguments keep working: the three global values,
then SLOT_FIELDS for each of MAX_CONCEPTS slots, hidden slots included, then EXTRA_FIELDS
(added later, after the slots, so that older positional calls keep their meaning).

Besides the positional form, the HTTP API may pass one dict as the only argument
(`settings_from_args`), and X/Y/Z plot axes override single values for one cell (`overrides`).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from . import config as defaults
from .config import MAX_CONCEPTS, Concept, GuidanceConfig
from .safety_config import DEFAULT_PRESET as SAFETY_DEFAULT_PRESET
from .safety_config import DEFAULT_SAFETY_CONCEPT, PRESETS as SAFETY_PRESETS, SafetyConfig

GLOBAL_FIELDS = ("enabled", "momentum_scale", "momentum_beta")
SLOT_FIELDS = ("slot_enabled", "prompt", "direction", "scale", "threshold", "warmup",
               "cooldown", "weight")
DIRECTIONS = ("add", "remove")
NEVER = -1  # the cooldown value that means "never" (None is accepted too)
MAX_ROWS_OPTION = "ldg_max_rows_per_call"  # Settings: rows per model call of ours, 0 = no limit

SLOT_DEFAULTS = {"slot_enabled": True, "prompt": "", "direction": "add",
                 "scale": defaults.DEFAULT_SCALE, "threshold": defaults.DEFAULT_THRESHOLD,
                 "warmup": defaults.DEFAULT_WARMUP, "cooldown": NEVER,
                 "weight": defaults.DEFAULT_WEIGHT}
GLOBAL_DEFAULTS = {"enabled": False, "momentum_scale": defaults.DEFAULT_MOMENTUM_SCALE,
                   "momentum_beta": defaults.DEFAULT_MOMENTUM_BETA}
# Safe Latent Diffusion's part, appended after concept_maps: on/off, the configuration (one of
# SLD's four, or "custom"), the safety concept and SLD's five numbers (read for "custom").
SAFETY_FIELDS = ("sld_enabled", "sld_config", "sld_concept", "sld_scale", "sld_threshold",
                 "sld_warmup", "sld_momentum_scale", "sld_momentum_beta")
SAFETY_NUMBERS = {"sld_scale": "scale", "sld_threshold": "threshold", "sld_warmup": "warmup",
                  "sld_momentum_scale": "momentum_scale", "sld_momentum_beta": "momentum_beta"}
CUSTOM = "custom"
SAFETY_CONFIGS = tuple(SAFETY_PRESETS) + (CUSTOM,)
SAFETY_DEFAULTS = {"sld_enabled": False, "sld_config": SAFETY_DEFAULT_PRESET,
                   "sld_concept": DEFAULT_SAFETY_CONCEPT,
                   **{field: SAFETY_PRESETS[SAFETY_DEFAULT_PRESET][key]
                      for field, key in SAFETY_NUMBERS.items()}}
# "Show where each concept acted", SLD, then img2img's "Keep the image" (LEDITS++ inversion)
# and its mask (ldg_core.config.MASKS).
EXTRA_FIELDS = ("concept_maps",) + SAFETY_FIELDS + ("keep_image", "keep_image_mask")
EXTRA_DEFAULTS = {"concept_maps": False, **SAFETY_DEFAULTS, "keep_image": False,
                  "keep_image_mask": "noise"}
SLOTS_END = len(GLOBAL_FIELDS) + MAX_CONCEPTS * len(SLOT_FIELDS)
SAFETY_START = SLOTS_END + 1  # where SAFETY_FIELDS begin
SAFETY_END = SAFETY_START + len(SAFETY_FIELDS)
KEEP_IMAGE = SAFETY_END  # the position of "keep_image"
KEEP_IMAGE_MASK = KEEP_IMAGE + 1
ARG_COUNT = SLOTS_END + len(EXTRA_FIELDS)


def default_args() -> List[Any]:
    slot = [SLOT_DEFAULTS[f] for f in SLOT_FIELDS]
    return ([GLOBAL_DEFAULTS[f] for f in GLOBAL_FIELDS] + slot * MAX_CONCEPTS
            + [EXTRA_DEFAULTS[f] for f in EXTRA_FIELDS])


def slot_index(slot: int, field: str) -> int:
    """Position of a slot's field (slot counted from 0) in the argument list."""
    return len(GLOBAL_FIELDS) + slot * len(SLOT_FIELDS) + SLOT_FIELDS.index(field)


def args_from_config(config: Optional[GuidanceConfig], enabled: bool = True) -> List[Any]:
    """The argument list that stands for `config`: its concepts in the first slots, the other
    slots cleared to their defaults. Extra fields keep their defaults."""
    values = default_args()
    values[0] = bool(enabled)
    if config is None:
        return values
    values[1], values[2] = config.momentum_scale, config.momentum_beta
    for slot, concept in enumerate(config.concepts):
        for field, value in slot_values(concept).items():
            values[slot_index(slot, field)] = value
    return values


def slot_values(concept: Concept) -> dict:
    return {"slot_enabled": True, "prompt": concept.prompt,
            "direction": DIRECTIONS[1] if concept.reverse else DIRECTIONS[0],
            "scale": concept.scale, "threshold": concept.threshold, "warmup": concept.warmup,
            "cooldown": NEVER if concept.cooldown is None else concept.cooldown,
            "weight": concept.weight}


def config_from_args(args: Sequence[Any]) -> Optional[GuidanceConfig]:
    """None when guidance is off or no slot holds a prompt; a ValueError naming the slot and
    field for anything invalid. Missing trailing arguments take their defaults."""
    values = list(args) + default_args()[len(args):]
    enabled, momentum_scale, momentum_beta = values[:len(GLOBAL_FIELDS)]
    if not enabled:
        return None
    concepts = []
    for slot in range(MAX_CONCEPTS):
        start = len(GLOBAL_FIELDS) + slot * len(SLOT_FIELDS)
        fields = dict(zip(SLOT_FIELDS, values[start:start + len(SLOT_FIELDS)]))
        concept = _concept(slot, fields)
        if concept is not None:
            concepts.append(concept)
    if not concepts:
        return None
    return GuidanceConfig(concepts=concepts, momentum_scale=momentum_scale,
                          momentum_beta=momentum_beta)


def _concept(slot: int, fields: dict) -> Optional[Concept]:
    prompt = fields["prompt"]
    if not fields["slot_enabled"] or prompt is None or (isinstance(prompt, str)
                                                        and not prompt.strip()):
        return None  # an empty or switched-off slot is simply unused
    label = f"concept {slot + 1}" + (f" ({prompt!r})" if isinstance(prompt, str) else "")
    direction = fields["direction"]
    if direction not in DIRECTIONS:
        raise ValueError(f"{label}: direction must be 'add' or 'remove', got {direction!r}")
    cooldown = fields["cooldown"]
    if cooldown is None or (_is_number(cooldown) and cooldown == NEVER):
        cooldown = None
    try:
        return Concept(prompt=prompt, reverse=direction == "remove", scale=fields["scale"],
                       threshold=fields["threshold"], warmup=fields["warmup"],
                       cooldown=cooldown, weight=fields["weight"])
    except ValueError as error:
        raise ValueError(f"{label}: {error}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def safety_values(safety: Optional[SafetyConfig]) -> List[Any]:
    """SAFETY_FIELDS' values that stand for `safety` (None: off, the defaults otherwise)."""
    if safety is None:
        return [SAFETY_DEFAULTS[f] for f in SAFETY_FIELDS]
    return [True, safety.preset_name, safety.concept] + [
        getattr(safety, key) for key in SAFETY_NUMBERS.values()]


def safety_from_args(args: Sequence[Any]) -> Optional[SafetyConfig]:
    """Safe Latent Diffusion's settings from the whole argument list: None when guidance or
    SLD is off; a ValueError naming the field for anything invalid. A named configuration
    takes SLD's numbers for it (the UI shows them); "custom" reads the five numbers."""
    values = list(args) + default_args()[len(args):]
    fields = dict(zip(SAFETY_FIELDS, values[SAFETY_START:SAFETY_START + len(SAFETY_FIELDS)]))
    if not values[0] or not fields["sld_enabled"]:
        return None
    if fields["sld_enabled"] is not True:
        raise ValueError(f"Safe Latent Diffusion: on/off must be true or false, got "
                         f"{fields['sld_enabled']!r}")
    name, concept = fields["sld_config"], fields["sld_concept"]
    if name not in SAFETY_CONFIGS:
        raise ValueError(f"Safe Latent Diffusion: configuration must be one of "
                         f"{', '.join(SAFETY_CONFIGS)}, got {name!r}")
    if not isinstance(concept, str) or not concept.strip():
        raise ValueError(f"Safe Latent Diffusion: the safety concept is empty, got {concept!r}; "
                         "write the concept to steer away from")
    try:
        if name != CUSTOM:
            return SafetyConfig.preset(name, concept)
        return SafetyConfig(concept=concept, **{key: fields[field]
                                                for field, key in SAFETY_NUMBERS.items()})
    except ValueError as error:
        raise ValueError(f"Safe Latent Diffusion: {error}") from None
