"""The accordion in a real browser: the script's ui() in a gradio 3.41.2 page (the WebUI's
version), driven by Playwright and Debian's chromium (tests/browser/drive_accordion.py).

gradio 3.41.2 serves pages only with the WebUI's own pins (fastapi 0.94, httpx 0.24), which do
not fit this environment, so the page runs in an environment of its own, `.venv-ui`
(tests/browser/requirements.txt; `.ci/run` makes it). Its python is taken from LDG_UI_PYTHON,
else `.venv-ui/bin/python`. Missing, it is a failure, not a skip. Screenshots are kept in
tests/artifacts/.
"""
import json
import os
import subprocess

from ldg_core.presets import BUILTIN_PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")
UI_PYTHON = os.environ.get("LDG_UI_PYTHON", os.path.join(ROOT, ".venv-ui", "bin", "python"))
SLOT = 8  # fields per slot: enabled, prompt, direction, scale, threshold, warmup, cooldown, weight


def run_driver():
    assert os.path.exists(UI_PYTHON), (
        f"no browser-test environment at {UI_PYTHON}: run .ci/run, or python3 -m venv .venv-ui "
        "&& .venv-ui/bin/pip install -r tests/browser/requirements.txt (and apt-get install "
        "chromium)")
    done = subprocess.run([UI_PYTHON, os.path.join(ROOT, "tests", "browser", "drive_accordion.py"),
                           ARTIFACTS], capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("LDG-RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("LDG-RESULT "):])


def slot(values, n, field):
    fields = ["slot_enabled", "prompt", "direction", "scale", "threshold", "warmup", "cooldown",
              "weight"]
    return values[3 + (n - 1) * SLOT + fields.index(field)]


def test_accordion_in_chromium():
    seen = run_driver()
    assert seen["argument_count"] == 3 + 10 * SLOT + 1
    assert seen["closed_by_default"] is True
    assert seen["slots_visible"] == [True] * 3 + [False] * 7  # the Settings count, 3

    filled = seen["after_fill"]
    assert len(filled) == seen["argument_count"]  # hidden slots are arguments too
    assert filled[:3] == [True, 0.1, 0.4]
    assert slot(filled, 1, "prompt") == "glasses, round, (gold:1.2)"
    assert slot(filled, 1, "direction") == "remove"
    assert slot(filled, 1, "scale") == 7.5
    assert filled[-1] is True  # "Show where each concept acted"
    assert seen["tooltip_scale"] == "How hard the concept pushes."

    picked = seen["after_preset"]
    preset = BUILTIN_PRESETS["Quality and art direction"].config
    for n, concept in enumerate(preset.concepts, start=1):
        assert slot(picked, n, "prompt") == concept.prompt
        assert slot(picked, n, "direction") == ("remove" if concept.reverse else "add")
        assert slot(picked, n, "scale") == concept.scale
        assert slot(picked, n, "warmup") == concept.warmup
    assert slot(picked, 3, "prompt") == ""  # the preset's slots replace the typed concept
    assert picked[0] is True  # picking a preset leaves Enable as it was
    for name in ("accordion-filled.png", "accordion-light.png", "accordion-dark.png"):
        assert os.path.getsize(os.path.join(ARTIFACTS, name)) > 10_000
