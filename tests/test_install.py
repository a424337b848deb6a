"""install.py, as the WebUI's launcher runs it: in a subprocess, from the WebUI's folder. Each
layout below is made of the few source lines install.py looks for; the real files are bigger."""
import os
import subprocess
import sys

import pytest

INSTALL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "install.py")
A1111 = {"modules/scripts.py": "def process_before_every_sampling(self, p, **kwargs): ...",
         "modules/ui_components.py": "class InputAccordion(gr.Checkbox): ..."}


def run_in(root, files):
    for path, text in files.items():
        os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
        with open(os.path.join(root, path), "w") as file:
            file.write(text)
    done = subprocess.run([sys.executable, INSTALL], cwd=root, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("files, says", [
    (A1111, ""),
    ({**A1111, "backend/sampling/sampling_function.py": "model_options['sampler_post_cfg_function']"}, ""),
    ({**A1111, "ldm_patched/modules/samplers.py": "def calc_cond_batch(model, conds, x, t, o):"}, ""),
    ({**A1111, "installer.py": ""}, "SD.Next is not supported"),
    ({"modules/scripts.py": "def process(self, p): ...", "modules/ui_components.py": "class FormRow"},
     "older than the hooks and the accordion"),
    ({**A1111, "backend/sampling/sampling_function.py": "def sampling_function(): ..."},
     "this Forge has no post-CFG functions"),
    ({**A1111, "ldm_patched/modules/samplers.py": "def calc_cond_uncond_batch(): ..."},
     "predates calc_cond_batch"),
    ({}, ""),  # not a WebUI we know: nothing said, nothing failed
])
def test_one_line_for_a_webui_we_cannot_serve(tmp_path, files, says):
    output = run_in(str(tmp_path), files)
    if says:
        assert output.startswith("Latent Diffusion Guidance: ") and says in output
        assert "\n" not in output
    else:
        assert output == ""


def test_an_unreadable_webui_does_not_fail_the_start(tmp_path):
    os.makedirs(tmp_path / "modules" / "scripts.py")  # a folder where a file should be
    assert run_in(str(tmp_path), {"modules/ui_components.py": "class InputAccordion"}) == ""
