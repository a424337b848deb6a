"""Which WebUI we run in, told by what imports; decided once, when the script loads.

A1111 takes concept rows into the CFG denoiser's model call. lllyasviel's Forge and Forge Neo
(backend.sampling) and reForge (ldm_patched) evaluate the model in their own sampling code:
they fire on_cfg_denoiser without the negative rows and never on_cfg_denoised, so there
guidance is a post-CFG function on each pass's UNet, and on reForge also its conditioning
hook (ldg_core/forge.py).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

HOW = {
    "a1111": "A1111 WebUI: concept rows join the CFG denoiser's model call",
    "forge": "Forge: a post-CFG function evaluates the concepts in a model call of their own",
    "neo": "Forge Neo: a post-CFG function evaluates the concepts in a model call of their own",
    "reforge": "reForge: concepts join its model call (sampler_calc_cond_batch_function), or "
               "where that cannot be, a post-CFG function evaluates them in a call of their own",
}
NAMES = {"a1111": "A1111 WebUI", "forge": "Forge", "neo": "Forge Neo", "reforge": "reForge"}


def _importable(name: str, find_spec: Callable) -> bool:
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing or not a package
        return False


def _forge_version() -> str:
    try:
        return str(importlib.import_module("modules_forge.forge_version").version)
    except Exception:  # an older Forge without the file: not Neo
        return ""


def detect_host(find_spec: Callable = importlib.util.find_spec,
                version: Callable[[], str] = _forge_version) -> str:
    if _importable("backend.sampling.sampling_function", find_spec):
        # Forge Neo names itself (modules_forge/forge_version.py L1: version = "neo").
        return "neo" if version() == "neo" else "forge"
    if _importable("ldm_patched.modules.samplers", find_spec):
        return "reforge"
    return "a1111"


def describe_host(host: str) -> str:
    return HOW[host]
