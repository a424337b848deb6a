"""The accordion in a real browser, on both gradio versions the WebUIs use: the script's ui() in
a gradio page, driven by Playwright and Debian's chromium (tests/browser/drive_accordion.py).

- gradio 3.41.2 (A1111 1.10.1, reForge): environment `.venv-ui`
  (tests/browser/requirements.txt), python from LDG_UI_PYTHON, else `.venv-ui/bin/python`;
- gradio 4.40.0 (Forge, Forge Neo): environment `.venv-ui4`
  (tests/browser/requirements-gradio4.txt), python from LDG_UI4_PYTHON, else
  `.venv-ui4/bin/python`.

Each gradio serves pages only with its own pins (fastapi, httpx, pydantic), which do not fit
this environment, so each page runs in an environment of its own; `.ci/run` makes both. A
missing one is a failure, not a skip. The same assertions hold for both. Screenshots are kept in
tests/artifacts/, named accordion-gradio<major>-*.png.
"""
import json
import os
import re
import subprocess

import pytest

from ldg_core.presets import BUILTIN_PRESETS
from ldg_core.script_args import settings_from_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")
SLOT = 8  # fields per slot: enabled, prompt, direction, scale, threshold, warmup, cooldown, weight
PAGES = {  # id: (python variable, environment, requirements, gradio version)
    "gradio3": ("LDG_UI_PYTHON", ".venv-ui", "requirements.txt", "3.41.2"),
    "gradio4": ("LDG_UI4_PYTHON", ".venv-ui4", "requirements-gradio4.txt", "4.40.0"),
}


def run_driver(variable, venv, requirements):
    python = os.environ.get(variable, os.path.join(ROOT, venv, "bin", "python"))
    assert os.path.exists(python), (
        f"no browser-test environment at {python}: run .ci/run, or python3 -m venv {venv} && "
        f"{venv}/bin/pip install -r tests/browser/{requirements} (and apt-get install "
        f"chromium), or set {variable}")
    done = subprocess.run([python, os.path.join(ROOT, "tests", "browser", "drive_accordion.py"),
                           ARTIFACTS], capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("LDG-RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("LDG-RESULT "):])


def slot(values, n, field):
    fields = ["slot_enabled", "prompt", "direction", "scale", "threshold", "warmup", "cooldown",
              "weight"]
    return values[3 + (n - 1) * SLOT + fields.index(field)]


def tooltips():
    """The tooltips javascript/latent_diffusion_guidance.js gives, by class."""
    with open(os.path.join(ROOT, "javascript", "latent_diffusion_guidance.js"),
              encoding="utf-8") as file:
        return dict(re.findall(r'^\s*"(ldg-[\w-]+)": "(.*)",?$', file.read(), re.MULTILINE))


@pytest.mark.parametrize("page", list(PAGES))
def test_accordion_in_chromium(page):
    variable, venv, requirements, version = PAGES[page]
    seen = run_driver(variable, venv, requirements)
    assert seen["gradio"] == version
    # + Safe Latent Diffusion's 8, + img2img's "Keep the image" (hidden in txt2img)
    assert seen["argument_count"] == 3 + 10 * SLOT + 1 + 8 + 2
    assert seen["closed_by_default"] is True
    assert seen["slots_visible"] == [True] * 3 + [False] * 7  # the Settings count, 3

    filled = seen["after_fill"]
    assert len(filled) == seen["argument_count"]  # hidden slots are arguments too
    assert filled[:3] == [True, 0.1, 0.4]
    assert slot(filled, 1, "prompt") == "glasses, round, (gold:1.2)"
    assert slot(filled, 1, "direction") == "remove"
    assert slot(filled, 1, "scale") == 7.5
    assert filled[3 + 10 * SLOT] is True  # "Show where each concept acted"
    assert filled[3 + 10 * SLOT + 1:3 + 10 * SLOT + 3] == [False, "medium"]  # SLD off
    settings = settings_from_args(filled, BUILTIN_PRESETS)  # what process() makes of them
    assert [(c.prompt, c.reverse, c.scale) for c in settings.config.concepts] == [
        ("glasses, round, (gold:1.2)", True, 7.5)]
    assert settings.concept_maps is True

    expected = tooltips()
    assert len(expected) == 24 and expected["ldg-scale"] == "How hard the concept pushes."
    for name, text in expected.items():  # every control of that kind carries it, and only it
        assert seen["tooltips"].get(name) == [text], name
    assert seen["scrolling_sideways"] == []  # nothing in a slot clipped behind a scrollbar
    assert seen["keep_image_in_txt2img"] is False and seen["keep_image_in_img2img"] is True
    assert seen["keep_image_title"] == expected["ldg-keep-image"]
    assert seen["keep_image_mask_in_txt2img"] is False
    assert seen["keep_image_mask_in_img2img"] == "both"  # clicked, and read back
    assert seen["keep_image_mask_title"] == expected["ldg-keep-image-mask"]
    assert filled[-2:] == [False, "noise"]  # txt2img's hidden box stays off, its mask unset

    picked = seen["after_preset"]
    preset = BUILTIN_PRESETS["Quality and art direction"].config
    for n, concept in enumerate(preset.concepts, start=1):
        assert slot(picked, n, "prompt") == concept.prompt
        assert slot(picked, n, "direction") == ("remove" if concept.reverse else "add")
        assert slot(picked, n, "scale") == concept.scale
        assert slot(picked, n, "warmup") == concept.warmup
    assert slot(picked, 3, "prompt") == ""  # the preset's slots replace the typed concept
    assert picked[0] is True  # picking a preset leaves Enable as it was
    assert settings_from_args(picked, BUILTIN_PRESETS).config == preset
    assert seen["save_status"] == "Saved 'browser test'."
    assert seen["preset_after_save"] == "browser test"

    assert seen["screenshots"] == [f"accordion-{page}-{name}.png"
                                   for name in ("filled", "light", "dark")]
    for name in seen["screenshots"]:
        assert os.path.getsize(os.path.join(ARTIFACTS, name)) > 10_000
