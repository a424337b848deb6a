"""Pasting image parameters back into the UI (PNG Info > Send to txt2img, the paste button).

The WebUI parses an image's parameters into a dict of label -> text
(infotext_utils.parse_generation_parameters) and asks each pasted field for its value. Here the
whole argument list is worked out at once from that dict:
- our key present and readable: every field is set, every slot with a concept (slots past
  the visible count included: they are shown) and the remaining slots cleared;
- our key absent (an image made without the extension): guidance is switched off and nothing
  else changes;
- our key present but unreadable: nothing changes, and `warning` says why.
Safe Latent Diffusion has a key of its own: present, its fields are set and it is switched
on (with guidance, and with no concept when only SLD was used); absent, it is switched off.
So has img2img's "Keep the image" (LEDITS++ inversion): on where present, off otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from .config import GuidanceConfig
from .text_form import from_text, safety_from_text
from .ui_args import KEEP_IMAGE, KEEP_IMAGE_MASK, SAFETY_START, SLOTS_END, args_from_config, safety_values

INFOTEXT_KEY = "Latent Diffusion Guidance"
SAFETY_KEY = "Safe Latent Diffusion"
KEEP_IMAGE_KEY = "Latent Diffusion Guidance inversion"
KEEP_IMAGE_MASK_TEXT = {"noise": "LEDITS++", "attention": "LEDITS++, attention mask",
                        "both": "LEDITS++, attention and noise masks"}  # its values


def keep_image_mask_of(text: str) -> str:
    """The mask a KEEP_IMAGE_KEY value names (an unknown one: the noise mask)."""
    return next((mask for mask, known in KEEP_IMAGE_MASK_TEXT.items()
                 if known == str(text).strip()), "noise")


@dataclass(frozen=True)
class Paste:
    values: Dict[int, Any] = field(default_factory=dict)  # argument position -> new value
    concepts: int = 0  # how many slots hold a pasted concept
    warning: Optional[str] = None


def paste_from_params(params: Mapping[str, Any]) -> Paste:
    text, safety_text = params.get(INFOTEXT_KEY), params.get(SAFETY_KEY)
    keep = KEEP_IMAGE_KEY in params
    try:
        safety = None if safety_text is None else safety_from_text(safety_text)
        config: GuidanceConfig = (from_text(text) if text is not None else
                                  GuidanceConfig() if safety is not None or keep else None)
    except ValueError as error:
        return Paste(warning=f"{error}. The Latent Diffusion Guidance fields were left as they "
                             "were.")
    if config is None:
        return Paste(values={0: False, SAFETY_START: False, KEEP_IMAGE: False})
    values = dict(enumerate(args_from_config(config, enabled=True)[:SLOTS_END]))
    values[KEEP_IMAGE] = keep
    values[KEEP_IMAGE_MASK] = keep_image_mask_of(params[KEEP_IMAGE_KEY]) if keep else "noise"
    if safety is None:
        values[SAFETY_START] = False
    else:
        values.update(enumerate(safety_values(safety), start=SAFETY_START))
    return Paste(values=values, concepts=len(config.concepts))
