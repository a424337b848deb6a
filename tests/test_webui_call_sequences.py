"""The double's samplers make the model calls a real WebUI 1.10.1 makes.

tests/data/webui_1_10_1_calls.json is our measurement of a real WebUI 1.10.1 (see its "what"):
for every sampler it offers, txt2img, img2img and hires, UniPC with each combination of its
order / lower-order-final / variant options, and step counts that do and do not divide 1000.
Each case is run here through the double with no extension and compared call by call: the
denoiser's call counter, the step the sampler had reported, and the sigma or timestep.
"""
import json
import os

import pytest
import torch

from tests import webui_harness as h
from tests.webui_harness import webui_state  # noqa: F401 (autouse: a fresh double per test)
from modules import script_callbacks, sd_samplers, shared

DATA = os.path.join(os.path.dirname(__file__), "data", "webui_1_10_1_calls.json")
MEASURED = json.load(open(DATA))["cases"]
# Not compared: Restart is not in the double (we refuse it before sampling), and DPM adaptive
# picks its evaluation points from the model's outputs, so its calls depend on the weights.
NOT_COMPARED = {"Restart", "DPM adaptive"}


def case_id(case):
    options = ",".join(f"{k}={v}" for k, v in sorted(case["options"].items()))
    return f"{case['mode']}-{case['sampler']}-{case['steps']}-{case['denoising_strength']}-{options}"


class CallRecorder:
    """Records (pass, denoiser call counter, reported step, sigma) of every model call."""
    def __init__(self):
        self.calls, self.passes = [], -1

    def process(self, p, *args):
        script_callbacks.on_cfg_denoiser(self.record, name="recorder")

    def process_before_every_sampling(self, p, *args, **kwargs):
        self.passes += 1

    def record(self, params):
        self.calls.append([self.passes, params.denoiser.step, params.sampling_step,
                           float(params.sigma[-1])])

    def postprocess(self, p, processed, *args):
        script_callbacks.remove_callbacks_for_function(self.record)


def p_kwargs_of(case):
    kwargs = {"sampler_name": case["sampler"], "steps": case["steps"]}
    if case["mode"] == "img2img":
        init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        kwargs.update(init_latent=init, denoising_strength=case["denoising_strength"])
    elif case["mode"] == "hires":
        kwargs.update(enable_hr=True, hr_scale=2, denoising_strength=case["denoising_strength"],
                      hr_second_pass_steps=case["hr_second_pass_steps"])
    return kwargs


def test_every_sampler_the_webui_offers_is_measured_and_in_the_double():
    measured = {case["sampler"] for case in MEASURED}
    in_double = {config.name for config in sd_samplers.all_samplers}
    assert measured - NOT_COMPARED == in_double - NOT_COMPARED
    assert len(measured) == 20


@pytest.mark.parametrize("case", [c for c in MEASURED if c["sampler"] not in NOT_COMPARED],
                         ids=case_id)
def test_the_double_makes_the_calls_the_real_webui_made(case):
    for key, value in case["options"].items():
        setattr(shared.opts, key, value)
    recorder = CallRecorder()
    h.generate(p_kwargs_of(case), None, extra_scripts=[(recorder, [])])
    got, want = recorder.calls, case["calls"]
    assert [c[:3] for c in got] == [c[:3] for c in want]
    torch.testing.assert_close(torch.tensor([c[3] for c in got], dtype=torch.float64),
                               torch.tensor([c[3] for c in want], dtype=torch.float64),
                               rtol=2e-4, atol=1e-4)
