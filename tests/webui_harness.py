"""Runs the extension's script inside the WebUI test double (tests/webui_double)."""
import importlib.util
import os
import sys

import k_diffusion.sampling
import pytest
import torch

DOUBLE = os.path.join(os.path.dirname(__file__), "webui_double")
ROOT = os.path.dirname(os.path.dirname(__file__))
if DOUBLE not in sys.path:
    sys.path.insert(0, DOUBLE)

from modules import processing, script_callbacks, scripts, shared  # noqa: E402

from tests.webui_double.model import TinySD  # noqa: E402

from ldg_core.ui_args import (GLOBAL_FIELDS, SAFETY_FIELDS, SAFETY_START, SLOT_FIELDS,  # noqa: E402
                              default_args, safety_values)


def load_script_module():
    """Executes scripts/latent_diffusion_guidance.py as the WebUI does (a fresh module)."""
    path = os.path.join(ROOT, "scripts", "latent_diffusion_guidance.py")
    spec = importlib.util.spec_from_file_location("latent_diffusion_guidance", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT_MODULE = load_script_module()


def script_args(concepts=(), enabled=True, momentum_scale=0.1, momentum_beta=0.4,
                safety=None):
    """The positional args ui() would give: concepts is a list of dicts of slot fields;
    safety a SafetyConfig (Safe Latent Diffusion on) or None."""
    args = default_args()
    args[:len(GLOBAL_FIELDS)] = [enabled, momentum_scale, momentum_beta]
    if safety is not None:
        args[SAFETY_START:SAFETY_START + len(SAFETY_FIELDS)] = safety_values(safety)
    for slot, fields in enumerate(concepts):
        start = len(GLOBAL_FIELDS) + slot * len(SLOT_FIELDS)
        for key, value in fields.items():
            args[start + SLOT_FIELDS.index(key)] = value
    return args


@pytest.fixture(autouse=True)
def webui_state():
    """A fresh WebUI double for each test of a module that imports this fixture; afterwards
    no callback of ours may stay registered and no callback may have failed."""
    shared.opts = shared.default_opts()
    shared.sd_model = TinySD()
    script_callbacks.reported.clear()
    yield
    # The double's samplers, as the WebUI's, put their noise hook into k-diffusion's module
    # (sd_samplers_common.py L296); other hosts' tests use that module after these.
    k_diffusion.sampling.torch = torch
    assert script_callbacks.registered_count() == 0, "callbacks left registered"
    assert not script_callbacks.reported, script_callbacks.reported


def serve_host(monkeypatch, host, forge_functions):
    """Makes the script believe it runs on `host` ("forge", "reforge"), with the double's
    pieces in place of the host's (scripts/latent_diffusion_guidance.py forge_functions)."""
    monkeypatch.setattr(SCRIPT_MODULE, "HOST", host)
    monkeypatch.setattr(SCRIPT_MODULE, "_modules", [])
    monkeypatch.setattr(SCRIPT_MODULE, "forge_functions", forge_functions)


def generate(p_kwargs, args=None, extra_scripts=()):
    """One generation with our script (args None: the extension is not installed at all)."""
    script_callbacks.ui_settings_callback()  # the Settings exist before any generation
    p = processing.Processing(**p_kwargs)
    entries = [] if args is None else [(SCRIPT_MODULE.LatentDiffusionGuidanceScript(), args)]
    runner = scripts.ScriptRunner(entries + list(extra_scripts))
    torch.manual_seed(1234)  # the samplers' own noise (ancestral, SDE)
    latents = processing.process_images(p, runner)
    assert not runner.reported, runner.reported
    return p, latents
