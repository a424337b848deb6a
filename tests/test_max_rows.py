"""The "Max rows per UNet call" setting: concept rows past the limit are evaluated in extra
model calls of at most that many rows, and the image stays bit-identical (the double's model
evaluates row by row, so any split of rows gives the same numbers)."""
import pytest
import torch

from tests import webui_harness as h
from tests.test_webui_paths import CONCEPTS, ControlNetMarks, ControlNetUnits, webui_state  # noqa: F401
from modules import script_callbacks, shared

OPTION = "ldg_max_rows_per_call"
THREE = CONCEPTS + [{"prompt": "a red hat", "scale": 20.0, "warmup": 0, "threshold": 0.5}]


class CallRecorder:
    """Records the row count of every model call (the UNet's batch)."""
    def __init__(self, model):
        self.rows = []
        self.apply_model = model.apply_model
        model.apply_model = self

    def __call__(self, x, t, cond):
        self.rows.append(x.shape[0])
        return self.apply_model(x, t, cond)


def run(p_kwargs, concepts, limit):
    shared.opts.ldg_max_rows_per_call = limit
    recorder = CallRecorder(shared.sd_model)
    try:
        _, latents = h.generate(p_kwargs, h.script_args(concepts))
    finally:
        del shared.sd_model.apply_model  # back to the class's own
    return latents, recorder.rows


def test_the_setting_is_registered_in_our_settings_section():
    shared.opts = shared.default_opts()
    script_callbacks.ui_settings_callback()
    info = shared.opts.data_labels[OPTION]
    assert info.default == 0 and shared.opts.ldg_max_rows_per_call == 0
    assert info.section == ("latent_diffusion_guidance", "Latent Diffusion Guidance")
    shared.opts.ldg_max_rows_per_call = 5
    script_callbacks.ui_settings_callback()  # a saved value is kept
    assert shared.opts.ldg_max_rows_per_call == 5


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DDIM"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_chunked_rows_give_the_same_image_and_respect_the_limit(sampler, batch, count):
    concepts = THREE[:count]
    p_kwargs = {"sampler_name": sampler, "steps": 4, "batch_size": batch}
    unchunked, plain_rows = run(p_kwargs, concepts, 0)
    webui_rows = 2 * batch
    assert set(plain_rows) == {webui_rows + count * batch}  # all in the WebUI's call
    for limit in sorted({1, webui_rows + count * batch - 1}):
        chunked, rows = run(p_kwargs, concepts, limit)
        assert torch.equal(chunked, unchunked), f"limit {limit} changed the image"
        # Each call of the WebUI keeps its own rows; ours follow it, at most `limit` each.
        per_call = 1 + -(-count * batch // limit)
        assert len(rows) == len(plain_rows) * per_call, (limit, rows)
        calls = [rows[i:i + per_call] for i in range(0, len(rows), per_call)]
        assert all(c[0] == webui_rows and max(c[1:]) <= limit for c in calls), (limit, rows)
        assert sum(rows) == sum(plain_rows), "rows evaluated must not change, only their calls"


def test_a_limit_the_call_fits_in_changes_nothing():
    p_kwargs = {"sampler_name": "Euler", "steps": 6, "batch_size": 2}
    plain, plain_rows = run(p_kwargs, CONCEPTS, 0)
    same, rows = run(p_kwargs, CONCEPTS, 2 * 2 + 2 * 2)
    assert torch.equal(plain, same) and rows == plain_rows


def test_chunks_follow_the_rows_each_step_needs():
    # Concept 2 cools down at step 6 and momentum is off: later calls carry only concept 1.
    concepts = [dict(CONCEPTS[0], warmup=0), dict(CONCEPTS[1], warmup=0, cooldown=3)]
    p_kwargs = {"sampler_name": "Euler", "steps": 6}
    plain, plain_rows = run(p_kwargs, concepts, 0)
    chunked, rows = run(p_kwargs, concepts, 1)
    assert plain_rows == [4] * 3 + [3] * 3
    assert rows == [2, 1, 1] * 3 + [2, 1] * 3
    assert torch.equal(plain, chunked)


def test_a_separate_call_is_chunked_too():
    long_concept = {"prompt": " ".join(["word"] * 80), "scale": 30.0, "warmup": 0}
    p_kwargs = {"sampler_name": "Euler", "steps": 4, "batch_size": 2}
    plain, plain_rows = run(p_kwargs, [CONCEPTS[0], long_concept], 0)
    chunked, rows = run(p_kwargs, [CONCEPTS[0], long_concept], 3)
    assert torch.equal(plain, chunked)
    # Per step: the WebUI's 4 rows; then concept 1 (77 tokens) and the long one (154) never
    # share a call: 2 rows, then 2 rows.
    assert rows == [4, 2, 2] * 4 and max(plain_rows) == 4


def test_sdxl_dict_conditioning_is_chunked():
    shared.sd_model = type(shared.sd_model)(sdxl=True)
    p_kwargs = {"sampler_name": "Euler", "steps": 4, "batch_size": 2}
    plain, _ = run(p_kwargs, CONCEPTS, 0)
    chunked, rows = run(p_kwargs, CONCEPTS, 3)
    assert torch.equal(plain, chunked) and max(r for r in rows if r != 4) <= 3


@pytest.mark.parametrize("module, refused", [("reference_only", True), ("canny", False)])
def test_limit_with_controlnet_is_refused_only_when_a_unit_cannot_follow(module, refused):
    units = ControlNetUnits([{"enabled": True, "model": "control_canny", "module": module}])
    p_kwargs = {"sampler_name": "Euler", "steps": 4}
    shared.opts.ldg_max_rows_per_call = 3
    if refused:
        with pytest.raises(ValueError, match="Max rows per UNet call' is 3, below the 4 rows.*"
                                             r"ControlNet unit 1 \(reference_only\) cannot"):
            h.generate(p_kwargs, h.script_args(CONCEPTS), extra_scripts=[(units, [])])
    else:
        limited = h.generate(p_kwargs, h.script_args(CONCEPTS), extra_scripts=[(units, [])])[1]
        shared.opts.ldg_max_rows_per_call = 0
        plain = h.generate(p_kwargs, h.script_args(CONCEPTS), extra_scripts=[(units, [])])[1]
        assert torch.equal(limited, plain)
    shared.opts.ldg_max_rows_per_call = 4  # no split needed: never refused
    h.generate(p_kwargs, h.script_args(CONCEPTS), extra_scripts=[(units, [])])
