"""Which WebUI we run in, told by what imports; decided once, when the script loads.

A1111 takes concept rows into the CFG denoiser's model call. lllyasviel's Forge and Forge Neo
(backend.sampling) and reForge (ldm_patched) evaluate the model in their own sampling code:
they fire on_cfg_denoiser without the negative rows and never on_cfg_denoised, so there
guidance is a post-CFG function on each pass's UNet (ldg_core/forge.py).
"""

from __future__ import annotations

import importlib.util
from typing import Callable

HOW = {
    "a1111": "A1111 WebUI: concept rows join the CFG denoiser's model call",
    "forge": "Forge: a post-CFG function evaluates the concepts in a model call of their own",
    "reforge": "reForge: a post-CFG function evaluates the concepts in a model call of their own",
}


def _importable(name: str, find_spec: Callable) -> bool:
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing or not a package
        return False


def detect_host(find_spec: Callable = importlib.util.find_spec) -> str:
    if _importable("backend.sampling.sampling_function", find_spec):
        return "forge"
    if _importable("ldm_patched.modules.samplers", find_spec):
        return "reforge"
    return "a1111"


def describe_host(host: str) -> str:
    return HOW[host]
