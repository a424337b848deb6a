"""Concept and guidance settings: defaults, validation and the dict form used by the HTTP API.

Every bad value is rejected when the object is built, with a ValueError that names the field,
the value and what is allowed, so nothing invalid ever reaches a sampler.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Sequence

# Defaults of the reference pipeline (diffusers' SemanticStableDiffusionPipeline). The only place
# they are written down: the UI, the text form and the API read them from here.
DEFAULT_SCALE = 5.0
DEFAULT_THRESHOLD = 0.9
DEFAULT_WARMUP = 10
DEFAULT_COOLDOWN: Optional[int] = None  # never
DEFAULT_WEIGHT = 1.0
DEFAULT_MOMENTUM_SCALE = 0.1
DEFAULT_MOMENTUM_BETA = 0.4

# Each concept adds a row per image to every model call; ten is what ControlNet allows units too.
MAX_CONCEPTS = 10


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_real(value: Any) -> bool:
    # bool is an int subclass, but `scale=True` is a mistake, not a number.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_float(value: Any) -> Optional[float]:
    """The value as a finite float, or None (not a number, NaN, infinite, or too large)."""
    if not _is_real(value):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _finite(name: str, value: Any) -> float:
    number = _as_float(value)
    if number is None:
        raise ValueError(f"{name} must be a finite number, got {_describe_short(value)}")
    return number


def _in_unit_interval(name: str, value: Any) -> float:
    number = _as_float(value)
    if number is None or not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {_describe_short(value)}")
    return number


def _step_count(name: str, value: Any, allowed: str) -> int:
    # Integral floats such as 10.0 (what a UI slider or JSON often sends) are accepted.
    number = _as_float(value)
    if number is not None and number.is_integer() and number >= 0:
        return int(number)
    raise ValueError(f"{name} must be {allowed}, got {_describe_short(value)}")


def _describe_short(value: Any) -> str:
    text = _describe(value)
    return text if len(text) <= 80 else text[:60] + "..." + text[-16:]


# LEDITS++'s masks, where an inverted image's concepts act (ldg_core.cross_attention): the
# noise mask alone, the cross-attention mask alone, or both intersected.
MASKS = ("noise", "attention", "both")


def check_mask(value: Any, name: str = "the mask") -> str:
    if value not in MASKS:
        raise ValueError(f"{name} must be one of {', '.join(MASKS)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Concept:
    """One editing concept: its prompt and how strongly, where and when it steers."""

    prompt: str
    scale: float = DEFAULT_SCALE
    threshold: float = DEFAULT_THRESHOLD
    warmup: int = DEFAULT_WARMUP
    cooldown: Optional[int] = DEFAULT_COOLDOWN
    weight: float = DEFAULT_WEIGHT
    reverse: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt:
            raise ValueError(f"prompt must be a non-empty string, got {_describe(self.prompt)}")
        set_ = object.__setattr__  # frozen: normalised values are stored once, here
        set_(self, "scale", _finite("scale", self.scale))
        set_(self, "threshold", _in_unit_interval("threshold", self.threshold))
        set_(self, "warmup", _step_count("warmup", self.warmup, "an integer >= 0"))
        if self.cooldown is not None:
            set_(self, "cooldown",
                 _step_count("cooldown", self.cooldown, "None (never) or an integer >= 0"))
        set_(self, "weight", _finite("weight", self.weight))
        if not isinstance(self.reverse, bool):
            raise ValueError(f"reverse must be True or False, got {_describe(self.reverse)}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Concept":
        """Build from a mapping; missing keys take the defaults, unknown keys are an error."""
        return cls(**_known_keys(cls, data))


@dataclass(frozen=True)
class GuidanceConfig:
    """The concepts of one generation and the momentum they share."""

    concepts: Sequence[Concept] = ()
    momentum_scale: float = DEFAULT_MOMENTUM_SCALE
    momentum_beta: float = DEFAULT_MOMENTUM_BETA

    def __post_init__(self) -> None:
        if isinstance(self.concepts, (str, bytes, Mapping)) or not isinstance(self.concepts, Sequence):
            raise ValueError(f"concepts must be a list of Concept, got {_describe(self.concepts)}")
        if len(self.concepts) > MAX_CONCEPTS:
            raise ValueError(
                f"concepts: at most {MAX_CONCEPTS} concepts are supported, got {len(self.concepts)}")
        object.__setattr__(self, "concepts", tuple(
            _as_concept(i, c) for i, c in enumerate(self.concepts)))
        object.__setattr__(self, "momentum_scale", _finite("momentum_scale", self.momentum_scale))
        object.__setattr__(self, "momentum_beta",
                           _in_unit_interval("momentum_beta", self.momentum_beta))

    def to_dict(self) -> dict:
        return {"concepts": [c.to_dict() for c in self.concepts],
                "momentum_scale": self.momentum_scale,
                "momentum_beta": self.momentum_beta}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GuidanceConfig":
        """The API form: {"concepts": [{"prompt": ..., ...}], "momentum_scale": ..., ...}."""
        return cls(**_known_keys(cls, data))


def _known_keys(cls, data: Any) -> dict:
    if not isinstance(data, Mapping):
        raise ValueError(f"expected a JSON object (dict), got {_describe(data)}")
    allowed = [f.name for f in fields(cls)]
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; allowed keys are {', '.join(allowed)}")
    if cls is Concept and "prompt" not in data:
        raise ValueError("the key 'prompt' is required")
    return dict(data)


def _as_concept(index: int, item: Any) -> Concept:
    """Accepts a Concept or its dict form; errors name the concept's index and prompt."""
    if isinstance(item, Concept):
        return item
    prompt = item.get("prompt") if isinstance(item, Mapping) else None
    label = f"concept {index}" + (f" ({prompt!r})" if isinstance(prompt, str) else "")
    if not isinstance(item, Mapping):
        raise ValueError(f"{label}: must be a Concept or a dict, got {_describe(item)}")
    try:
        return Concept.from_dict(item)
    except ValueError as error:
        raise ValueError(f"{label}: {error}") from None
