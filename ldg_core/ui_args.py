"""The script's argument layout: what ui() returns, in order, and how it becomes a config.

The layout never changes, so positional API arguments keep working: the three global values,
then SLOT_FIELDS for each of MAX_CONCEPTS slots, hidden slots included.
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

SLOT_DEFAULTS = {"slot_enabled": True, "prompt": "", "direction": "add",
                 "scale": defaults.DEFAULT_SCALE, "threshold": defaults.DEFAULT_THRESHOLD,
                 "warmup": defaults.DEFAULT_WARMUP, "cooldown": NEVER,
                 "weight": defaults.DEFAULT_WEIGHT}
GLOBAL_DEFAULTS = {"enabled": False, "momentum_scale": defaults.DEFAULT_MOMENTUM_SCALE,
                   "momentum_beta": defaults.DEFAULT_MOMENTUM_BETA}
ARG_COUNT = len(GLOBAL_FIELDS) + MAX_CONCEPTS * len(SLOT_FIELDS)


def default_args() -> List[Any]:
    slot = [SLOT_DEFAULTS[f] for f in SLOT_FIELDS]
    return [GLOBAL_DEFAULTS[f] for f in GLOBAL_FIELDS] + slot * MAX_CONCEPTS


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
