"""Latent Diffusion Guidance: Semantic Guidance (SEGA) for diffusion samplers.

Pure torch; nothing of the WebUI is imported here, so the engine runs and is tested anywhere.
"""

from .config import MAX_CONCEPTS, Concept, GuidanceConfig
from .guidance import SemanticGuidance
from .text_form import from_text, to_text

__all__ = ["Concept", "GuidanceConfig", "SemanticGuidance", "MAX_CONCEPTS", "to_text", "from_text"]
