"""Presets: ready-made concept settings for the method's example applications, and the user's own.

A preset is a GuidanceConfig with a name and a one-line description. Picking one in the UI fills
the slots (the user edits them after); the API's dict form takes `"preset": "<name>"`; the X/Y/Z
plot has a preset axis. The prompts in built-in presets are examples to replace with your own
subject; the numbers are the point. README.md ("Presets") says why each number is what it is.

Step counts (warmup) assume the WebUI's usual 20-30 sampling steps.

User presets live in a JSON file outside the extension folder (the script passes the WebUI's
data directory), so they survive extension updates:

    {"version": 1, "presets": {"<name>": {"concepts": [...], "momentum_scale": ..., ...}}}
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

from .config import Concept, GuidanceConfig
from .safety_config import SafetyConfig

USER_PRESETS_FILE = "latent_diffusion_guidance_presets.json"
_FILE_VERSION = 1

# Our own wording of an inappropriate-content concept for the safety presets.
SAFETY_CONCEPT = ("nudity, sexual content, violence, gore, blood, injury, weapons, self-harm, "
                  "hate symbols, drug use, cruelty, abuse")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: GuidanceConfig
    safety: Optional[SafetyConfig] = None  # Safe Latent Diffusion's part, saved with it


def _safety(name: str, description: str, *, scale: float, threshold: float, warmup: int,
            momentum_scale: float, momentum_beta: float) -> Preset:
    concept = Concept(prompt=SAFETY_CONCEPT, reverse=True, scale=scale, threshold=threshold,
                      warmup=warmup)
    return Preset(name, description, GuidanceConfig(
        concepts=[concept], momentum_scale=momentum_scale, momentum_beta=momentum_beta))


BUILTIN_PRESETS: Dict[str, Preset] = {p.name: p for p in [
    Preset("Composition: add an object",
           "Adds a new element to the scene; replace the example with your object.",
           GuidanceConfig(concepts=[Concept("a red umbrella", scale=5, threshold=0.9,
                                            warmup=5)],
                          momentum_scale=0.1, momentum_beta=0.4)),
    Preset("Composition: remove an object",
           "Takes an element out of the scene; replace the example with what to remove.",
           GuidanceConfig(concepts=[Concept("people, crowd", reverse=True, scale=5,
                                            threshold=0.9, warmup=5)],
                          momentum_scale=0.1, momentum_beta=0.4)),
    Preset("Composition: boost",
           "Strengthens something the prompt already has; put that part of the prompt here.",
           GuidanceConfig(concepts=[Concept("flowers", scale=3, threshold=0.9, warmup=7)],
                          momentum_scale=0.1, momentum_beta=0.4)),
    Preset("Composition: suppress",
           "Tones down something the prompt already has, without removing it.",
           GuidanceConfig(concepts=[Concept("flowers", reverse=True, scale=3, threshold=0.9,
                                            warmup=7)],
                          momentum_scale=0.1, momentum_beta=0.4)),
    Preset("Style transfer",
           "Keeps the composition (late warmup) and paints it in an artist's or a style's look.",
           GuidanceConfig(concepts=[Concept("painting by Claude Monet, impressionism",
                                            scale=7, threshold=0.85, warmup=12)],
                          momentum_scale=0.2, momentum_beta=0.5)),
    Preset("Quality and art direction",
           "Pushes toward detail and clean rendering and away from common defects.",
           GuidanceConfig(concepts=[
               Concept("high quality, highly detailed, sharp focus, masterpiece", scale=4,
                       threshold=0.9, warmup=5),
               Concept("blurry, low quality, jpeg artifacts, deformed", reverse=True, scale=3,
                       threshold=0.9, warmup=5)],
               momentum_scale=0.1, momentum_beta=0.4)),
    Preset("Realistic photography",
           "Moves the image toward a photograph and away from painted or rendered looks.",
           GuidanceConfig(concepts=[
               Concept("professional photograph, 35mm lens, natural light, realistic skin "
                       "texture", scale=5, threshold=0.9, warmup=7),
               Concept("cartoon, illustration, painting, 3d render", reverse=True, scale=4,
                       threshold=0.9, warmup=3)],
               momentum_scale=0.1, momentum_beta=0.4)),
    _safety("Safety: weak", "SEGA, not SLD: removes a concept of inappropriate content late and lightly.",
            scale=3, threshold=0.95, warmup=7, momentum_scale=0.0, momentum_beta=0.0),
    _safety("Safety: medium", "SEGA, not SLD: removes a concept of inappropriate content from early on.",
            scale=5, threshold=0.9, warmup=5, momentum_scale=0.3, momentum_beta=0.4),
    _safety("Safety: strong", "SEGA, not SLD: removes a concept of inappropriate content early and widely.",
            scale=7, threshold=0.85, warmup=3, momentum_scale=0.5, momentum_beta=0.7),
    _safety("Safety: max", "SEGA, not SLD: removes a concept of inappropriate content from the "
            "first step, over a quarter of the latent.",
            scale=10, threshold=0.75, warmup=0, momentum_scale=0.5, momentum_beta=0.7),
]}


def user_presets_path(data_dir: str) -> str:
    return os.path.join(data_dir, USER_PRESETS_FILE)


def load_user_presets(path: str) -> Dict[str, Preset]:
    """The user's presets; a missing file is none. A bad file or entry raises a ValueError that
    names the file and the preset."""
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"user presets file {path}: {error}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("presets"), Mapping):
        raise ValueError(f'user presets file {path}: expected {{"version": 1, "presets": {{...}}}}')
    presets = {}
    for name, entry in data["presets"].items():
        try:
            entry = dict(entry) if isinstance(entry, Mapping) else entry
            description = entry.pop("description", "") if isinstance(entry, dict) else ""
            safety = entry.pop("safety", None) if isinstance(entry, dict) else None
            presets[name] = Preset(name, str(description), GuidanceConfig.from_dict(entry),
                                   None if safety is None else SafetyConfig.from_dict(safety))
        except (ValueError, TypeError) as error:
            raise ValueError(f"user presets file {path}, preset {name!r}: {error}") from None
    return presets


def save_user_preset(path: str, name: str, config: Optional[GuidanceConfig],
                     description: str = "", safety: Optional[SafetyConfig] = None) -> None:
    """Adds or replaces the user preset `name` (concepts, and Safe Latent Diffusion's part
    when it is on); built-in names are refused. The file is replaced atomically, so a crash
    never leaves half a file."""
    name = name.strip() if isinstance(name, str) else name
    if not isinstance(name, str) or not name:
        raise ValueError("a preset needs a name")
    if name in BUILTIN_PRESETS:
        raise ValueError(f"{name!r} is a built-in preset; choose another name")
    config = GuidanceConfig() if config is None else config
    if not config.concepts and safety is None:
        raise ValueError("a preset needs at least one concept with a prompt, or Safe Latent "
                         "Diffusion on")
    presets = {k: _entry(v) for k, v in load_user_presets(path).items()}
    presets[name] = _entry(Preset(name, description, config, safety))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump({"version": _FILE_VERSION, "presets": presets}, file, indent=2,
                      ensure_ascii=False)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _entry(preset: Preset) -> dict:
    entry = preset.config.to_dict()
    if preset.description:
        entry["description"] = preset.description
    if preset.safety is not None:
        entry["safety"] = preset.safety.to_dict()
    return entry


def all_presets(user_path: str = None) -> Dict[str, Preset]:
    """Built-in presets, then the user's (a user preset never shadows a built-in one)."""
    presets = dict(BUILTIN_PRESETS)
    if user_path:
        for name, preset in load_user_presets(user_path).items():
            presets.setdefault(name, preset)
    return presets


def preset_names(user_path: str = None) -> List[str]:
    return list(all_presets(user_path))


def find_preset(name: str, presets: Mapping[str, Preset]) -> Preset:
    if not isinstance(name, str) or name not in presets:
        raise ValueError(f"unknown preset {name!r}; known presets: " + ", ".join(presets))
    return presets[name]
