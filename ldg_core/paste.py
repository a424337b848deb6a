"""Pasting image parameters back into the UI (PNG Info > Send to txt2img, the paste button).

The WebUI parses an image's parameters into a dict of label -> text
(infotext_utils.parse_generation_parameters) and asks each pasted field for its value. Here the
whole argument list is worked out at once from that dict:
- our key present and readable: every field is set, every slot with a concept (slots past
  the visible count included: they are shown) and the remaining slots cleared;
- our key absent (an image made without the extension): guidance is switched off and nothing
  else changes;
- our key present but unreadable: nothing changes, and `warning` says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from .config import GuidanceConfig
from .text_form import from_text
from .ui_args import SLOTS_END, args_from_config

INFOTEXT_KEY = "Latent Diffusion Guidance"


@dataclass(frozen=True)
class Paste:
    values: Dict[int, Any] = field(default_factory=dict)  # argument position -> new value
    concepts: int = 0  # how many slots hold a pasted concept
    warning: Optional[str] = None


def paste_from_params(params: Mapping[str, Any]) -> Paste:
    text = params.get(INFOTEXT_KEY)
    if text is None:
        return Paste(values={0: False})
    try:
        config: GuidanceConfig = from_text(text)
    except ValueError as error:
        return Paste(warning=f"{error}. The Latent Diffusion Guidance fields were left as they "
                             "were.")
    values = args_from_config(config, enabled=True)[:SLOTS_END]
    return Paste(values=dict(enumerate(values)), concepts=len(config.concepts))
