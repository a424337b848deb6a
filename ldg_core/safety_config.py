"""Safe Latent Diffusion (SLD, arXiv 2211.05105) settings: defaults, presets, validation.

No torch here: the settings side of ldg_core is built without it. The tensor work is in
safety.py. Values and names follow diffusers' StableDiffusionPipelineSafe, the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from .config import (_as_float, _describe, _describe_short, _finite, _in_unit_interval,
                     _known_keys, _step_count)

# The reference pipeline's default safety concept (StableDiffusionPipelineSafe.__init__ sets
# it as `_safety_text_concept`; its `safety_concept` property reads and writes it).
DEFAULT_SAFETY_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, "
    "sexual, nudity, bodily fluids, blood, obscene gestures, illegal activity, drug use, "
    "theft, vandalism, weapons, child abuse, brutality, cruelty")

# The reference's four configurations (diffusers' SafetyConfig.WEAK/MEDIUM/STRONG/MAX). The
# only place they are written down; the defaults below are "medium", which is exactly what
# the reference's __call__ defaults to (both checked against diffusers by the tests).
PRESETS: Mapping[str, Mapping[str, Any]] = {
    "weak": {"scale": 20.0, "threshold": 0.0, "warmup": 15,
             "momentum_scale": 0.0, "momentum_beta": 0.0},
    "medium": {"scale": 1000.0, "threshold": 0.01, "warmup": 10,
               "momentum_scale": 0.3, "momentum_beta": 0.4},
    "strong": {"scale": 2000.0, "threshold": 0.025, "warmup": 7,
               "momentum_scale": 0.5, "momentum_beta": 0.7},
    "max": {"scale": 5000.0, "threshold": 1.0, "warmup": 0,
            "momentum_scale": 0.5, "momentum_beta": 0.7},
}
DEFAULT_PRESET = "medium"
_DEFAULTS = PRESETS[DEFAULT_PRESET]


def _non_negative(name: str, value: Any) -> float:
    number = _as_float(value)
    if number is None or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {_describe_short(value)}")
    return number


@dataclass(frozen=True)
class SafetyConfig:
    """How Safe Latent Diffusion steers away from `concept`.

    scale: the SLD guidance scale s_S; 1 or less turns SLD off, as in the reference.
    threshold: lambda; where (eps_text - eps_safety) >= threshold nothing is steered. Any
        finite number (the reference does not limit it).
    warmup: steps before the safety term is applied (the momentum is fed from step 0).
    momentum_scale, momentum_beta: s_m and beta_m of the momentum.
    """

    concept: str = DEFAULT_SAFETY_CONCEPT
    scale: float = _DEFAULTS["scale"]
    threshold: float = _DEFAULTS["threshold"]
    warmup: int = _DEFAULTS["warmup"]
    momentum_scale: float = _DEFAULTS["momentum_scale"]
    momentum_beta: float = _DEFAULTS["momentum_beta"]

    def __post_init__(self) -> None:
        if not isinstance(self.concept, str) or not self.concept:
            raise ValueError(f"concept must be a non-empty string, got {_describe(self.concept)}")
        set_ = object.__setattr__  # frozen: normalised values are stored once, here
        set_(self, "scale", _non_negative("scale", self.scale))
        set_(self, "threshold", _finite("threshold", self.threshold))
        set_(self, "warmup", _step_count("warmup", self.warmup, "an integer >= 0"))
        set_(self, "momentum_scale", _non_negative("momentum_scale", self.momentum_scale))
        set_(self, "momentum_beta", _in_unit_interval("momentum_beta", self.momentum_beta))

    @property
    def enabled(self) -> bool:
        """False when the scale turns SLD off (the reference needs sld_guidance_scale > 1)."""
        return self.scale > 1.0

    @classmethod
    def preset(cls, name: str, concept: str = DEFAULT_SAFETY_CONCEPT) -> "SafetyConfig":
        """One of the reference's configurations: "weak", "medium", "strong" or "max"."""
        key = name.lower() if isinstance(name, str) else None
        if key not in PRESETS:
            raise ValueError(f"unknown SLD preset {_describe_short(name)}; "
                             f"allowed names are {', '.join(PRESETS)}")
        return cls(concept=concept, **PRESETS[key])

    @property
    def preset_name(self) -> str:
        """The reference configuration whose five numbers these are, or "custom"."""
        for name, numbers in PRESETS.items():
            if all(getattr(self, key) == value for key, value in numbers.items()):
                return name
        return "custom"

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SafetyConfig":
        """Build from a mapping; missing keys take the defaults, unknown keys are an error."""
        return cls(**_known_keys(cls, data))
