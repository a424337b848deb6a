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
EXTRA_FIELDS = ("concept_maps",)  # "Show where each concept acted"
EXTRA_DEFAULTS = {"concept_maps": False}
SLOTS_END = len(GLOBAL_FIELDS) + MAX_CONCEPTS * len(SLOT_FIELDS)
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
