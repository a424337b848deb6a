"""Failures during sampling stop the generation once, with a message, and leave nothing behind.

The WebUI catches every Exception a callback raises and goes on (script_callbacks.py L330-350;
the double records what it would have logged in `script_callbacks.reported`, which the
harness's fixture requires to stay empty): an error of ours must not go that way.
"""
import pytest
import torch

from tests import webui_harness as h
from tests.webui_harness import webui_state  # noqa: F401 (autouse: a fresh double per test)
from tests.test_webui_paths import CONCEPTS, LONG_CONCEPT, guided
from tests.webui_double.model import TinySD
from modules import script_callbacks, shared


class FailingModel:
    """Wraps the model's apply_model: raises `error` at the first call whose row count is
    `rows`, and counts every call (so a test sees that sampling stopped at once)."""
    def __init__(self, rows, error):
        self.rows, self.error = rows, error
        self.calls, self.raised = [], False
        self.original = shared.sd_model.apply_model
        shared.sd_model.apply_model = self

    def __call__(self, x, t, cond):
        self.calls.append(x.shape[0])
        if x.shape[0] == self.rows and not self.raised:
            self.raised = True
            raise self.error
        return self.original(x, t, cond)

    def restore(self):
        shared.sd_model.apply_model = self.original


def assert_next_generation_is_unaffected(p_kwargs, concepts):
    _, after = guided(p_kwargs, concepts)
    shared.sd_model = TinySD()
    _, fresh = guided(p_kwargs, concepts)
    assert torch.equal(after, fresh)


def oom():
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_out_of_memory_in_the_call_with_our_rows_names_the_row_limit(sampler):
    p_kwargs = {"sampler_name": sampler, "steps": 6}
    model = FailingModel(rows=4, error=oom())  # prompt + 2 concepts + negative: a call of ours
    with pytest.raises(ValueError, match=r"^Latent Diffusion Guidance: out of memory at step 0 "
                                         r"while evaluating the concepts with the prompt "
                                         r"\(2 concept rows\): lower 'Settings > Latent Diffusion "
                                         r"Guidance > Max rows per UNet call'") as stopped:
        guided(p_kwargs)
    model.restore()
    assert isinstance(stopped.value.__cause__, torch.OutOfMemoryError)
    assert model.calls[-1] == 4, "sampling went on after the failure"
    assert script_callbacks.registered_count() == 0
    assert_next_generation_is_unaffected(p_kwargs, CONCEPTS)


@pytest.mark.parametrize("error, message", [
    (oom(), r"out of memory at step 0 while evaluating the concepts in a model call of their "
            r"own \(1 concept row\): lower"),
    (RuntimeError("shape mismatch in the UNet"),
     r"failed at step 0 while evaluating the concepts in a model call of their own: "
     r"RuntimeError: shape mismatch in the UNet. The generation was stopped"),
])
@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DDIM"])
def test_a_failure_in_the_separate_call_stops_the_generation_once(sampler, error, message):
    p_kwargs = {"sampler_name": sampler, "steps": 6}
    concepts = [LONG_CONCEPT]  # longer than the prompt: a model call of its own, 1 row
    model = FailingModel(rows=1, error=error)
    with pytest.raises(ValueError, match="^Latent Diffusion Guidance: " + message):
        guided(p_kwargs, concepts)
    model.restore()
    assert model.calls[-1] == 1, "sampling went on after the failure"
    assert script_callbacks.registered_count() == 0
    assert_next_generation_is_unaffected(p_kwargs, concepts)


def test_a_failure_under_the_row_limit_stops_the_generation_once():
    shared.opts.ldg_max_rows_per_call = 1  # each concept row in a call of its own
    p_kwargs = {"sampler_name": "DPM++ 2M", "steps": 6}
    model = FailingModel(rows=1, error=oom())
    with pytest.raises(ValueError, match="out of memory at step 0 .*2 concept rows"):
        guided(p_kwargs)
    model.restore()
    assert_next_generation_is_unaffected(p_kwargs, CONCEPTS)


def test_a_failure_of_the_webuis_own_call_without_our_rows_stays_the_webuis():
    p_kwargs = {"sampler_name": "Euler", "steps": 6}
    concepts = [dict(CONCEPTS[0], warmup=3, scale=40.0)]
    # Momentum 0: before its warmup the concept adds no rows, so the first call is the WebUI's.
    model = FailingModel(rows=2, error=oom())
    with pytest.raises(torch.OutOfMemoryError):
        guided(p_kwargs, concepts, momentum_scale=0.0)
    model.restore()
    assert script_callbacks.registered_count() == 0


class RowChanger:
    """A neighbour that adds a row to every model call before our callback sees it."""
    def process(self, p, *args):
        script_callbacks.on_cfg_denoiser(self.add_row, name="row changer")

    def add_row(self, params):
        params.x = torch.cat([params.x, params.x[-1:]])

    def postprocess(self, p, processed, *args):
        script_callbacks.remove_callbacks_for_function(self.add_row)


def test_rows_not_laid_out_as_expected_stop_the_generation():
    neighbour = RowChanger()
    calls = []
    original = shared.sd_model.apply_model
    shared.sd_model.apply_model = lambda *a, **k: calls.append(1) or original(*a, **k)
    with pytest.raises(ValueError, match=r"^Latent Diffusion Guidance: the model call has 3 rows "
                                         r"where 1 prompt rows \+ 1 negative rows were expected. "
                                         "Another extension probably changes"):
        h.generate({"sampler_name": "Euler", "steps": 6}, h.script_args(CONCEPTS),
                   extra_scripts=[(neighbour, [])])
    shared.sd_model.apply_model = original
    neighbour.postprocess(None, None)  # its own clean-up; ours is done already
    assert calls == [], "the model ran although guidance could not be applied"
    assert script_callbacks.registered_count() == 0


def test_an_error_in_our_edit_stops_the_generation(monkeypatch):
    import ldg_core.guidance
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise IndexError("a bug of ours")
    monkeypatch.setattr(ldg_core.guidance, "guidance_step", broken)
    with pytest.raises(ValueError, match="failed at step 0 while reading the concept rows: "
                                         "IndexError: a bug of ours"):
        guided({"sampler_name": "Euler", "steps": 6})
    assert calls == [1]
    monkeypatch.undo()
    assert_next_generation_is_unaffected({"sampler_name": "Euler", "steps": 6}, CONCEPTS)
