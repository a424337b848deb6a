"""Latent Diffusion Guidance: Semantic Guidance (SEGA) for diffusion samplers.

Pure torch; nothing of the WebUI is imported here, so the engine runs and is tested anywhere.
The settings side (config, text form, presets, argument parsing, paste) needs no torch, so the
UI can be built without it: `SemanticGuidance` and `SafetyGuidance` (Safe Latent Diffusion)
are imported on first use.
"""

from .config import MAX_CONCEPTS, Concept, GuidanceConfig
from .safety_config import SafetyConfig
from .text_form import from_text, to_text

__all__ = ["Concept", "GuidanceConfig", "SemanticGuidance", "MAX_CONCEPTS", "to_text", "from_text",
           "SafetyConfig", "SafetyGuidance"]


def __getattr__(name):
    if name == "SemanticGuidance":
        from .guidance import SemanticGuidance
        return SemanticGuidance
    if name == "SafetyGuidance":
        from .safety import SafetyGuidance
        return SafetyGuidance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
