"""img2img's "Keep the image" (LEDITS++ inversion) in the WebUI test double, with the real
k-diffusion DPM++ 2M SDE and the double's copy of the WebUI's DDIM (eta and its noise hook
included). The oracle for reconstruction is the input itself; tests/test_inversion_reference.py
holds the math to diffusers' LEditsPPPipelineStableDiffusion."""
import re

import pytest
import torch

from tests import webui_harness as h
from tests.webui_harness import webui_state  # noqa: F401 (autouse: a fresh double per test)
from tests.webui_double.model import TinySD
from ldg_core.ui_args import KEEP_IMAGE
from modules import script_callbacks, shared

SAMPLERS = ["DDIM", "DPM++ 2M SDE", "DPM++ 2M SDE Heun"]
CONCEPT = {"prompt": "glasses", "scale": 60.0, "warmup": 1, "threshold": 0.7}


def original_function(sampler):
    """The sampler function the double's sampler of that name calls."""
    import k_diffusion.sampling
    from modules import sd_samplers_timesteps
    return (sd_samplers_timesteps.ddim if sampler == "DDIM" else
            k_diffusion.sampling.sample_dpmpp_2m_sde)


def keep_args(concepts=(), **settings):
    args = h.script_args(concepts, **settings)
    args[KEEP_IMAGE] = True
    return args


def init_latent(batch=1, height=8, width=8, seed=5):
    return torch.randn(batch, 4, height, width, generator=torch.Generator().manual_seed(seed))


def img2img(sampler, init, strength=0.6, steps=10, **kw):
    return dict({"sampler_name": sampler, "steps": steps, "init_latent": init,
                 "denoising_strength": strength}, **kw)


class CallCounter:
    """Records (call counter, reported sampling step) of every CFG denoiser call of the
    generation (registered after our script)."""

    def __init__(self):
        self.calls = []

    @property
    def steps(self):
        return [step for step, _ in self.calls]

    def process_before_every_sampling(self, p, *args, **kwargs):
        script_callbacks.on_cfg_denoiser(self.record, name="counter")

    def record(self, params):
        self.calls.append((params.denoiser.step, params.sampling_step))

    def postprocess(self, p, processed, *args):
        script_callbacks.remove_callbacks_for_function(self.record)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("batch,height,width", [(1, 8, 8), (2, 8, 12)])
def test_no_concept_gives_the_init_latents_back(sampler, batch, height, width):
    init = init_latent(batch, height, width)
    p, out = h.generate(img2img(sampler, init, batch_size=batch), keep_args())
    torch.testing.assert_close(out, init, rtol=0, atol=2e-5)
    plain = h.generate(img2img(sampler, init, batch_size=batch))[1]
    assert (plain - init).abs().max() > 0.1, "plain img2img redraws the image"
    assert p.extra_generation_params["Latent Diffusion Guidance inversion"] == "LEDITS++"
    assert p.sampler.func is original_function(sampler), "the sampler's function is restored"


@pytest.mark.parametrize("sdxl", [False, True])
def test_reconstruction_holds_for_sdxl_conditioning_and_other_prompts(sdxl):
    shared.sd_model = TinySD(sdxl=sdxl)
    init = init_latent(2)
    p_kwargs = img2img("DPM++ 2M SDE", init, batch_size=2, prompt="a [cat:dog:3], photo",
                       negative_prompt="blurry", cfg_scale=5.0)
    out = h.generate(p_kwargs, keep_args())[1]
    torch.testing.assert_close(out, init, rtol=0, atol=2e-5)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_concept_changes_the_image_only_where_its_mask_acts(sampler):
    init = init_latent(1, 8, 12)
    out = h.generate(img2img(sampler, init, strength=0.8), keep_args([CONCEPT]))[1]
    plain = h.generate(img2img(sampler, init, strength=0.8))[1]
    change = (out - init).abs()
    assert change.max() > 1e-2, "the concept had no effect"
    # Far less changes than in plain img2img at the same strength: the rest is kept.
    assert change.mean() < 0.5 * (plain - init).abs().mean()


def test_inversion_costs_one_model_call_per_step_and_keeps_the_prompt_clock():
    init = init_latent()
    counter = CallCounter()
    p, _ = h.generate(img2img("DPM++ 2M SDE", init, steps=10, strength=0.6), keep_args(),
                      extra_scripts=[(counter, [])])
    t_enc = int(0.6 * 10)
    steps = list(range(t_enc + 1))
    # The inversion's calls carry the counter the sampler's own calls have at those points.
    assert counter.steps == steps + steps


def test_the_sampler_function_is_restored_and_nothing_stays_registered():
    init = init_latent()
    p, _ = h.generate(img2img("DDIM", init), keep_args([CONCEPT]))
    assert p.sampler.func is original_function("DDIM")
    assert script_callbacks.registered_count() == 0


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M", "DPM++ SDE", "PLMS"])
def test_other_samplers_are_refused_before_sampling_with_the_ones_that_work(sampler):
    init = init_latent()
    counter = CallCounter()
    with pytest.raises(Exception, match="'Keep the image' .* needs a sampler whose random noise "
                                        "can be solved for, one of DDIM, DPM\\+\\+ 2M SDE, "
                                        f"DPM\\+\\+ 2M SDE Heun; '{re.escape(sampler)}' is not one"):
        h.generate(img2img(sampler, init), keep_args([CONCEPT]), extra_scripts=[(counter, [])])
    assert counter.steps == []


def test_txt2img_is_refused():
    with pytest.raises(Exception, match="'Keep the image' .* works in img2img"):
        h.generate({"sampler_name": "DDIM", "steps": 6}, keep_args([CONCEPT]))


def test_keep_image_off_is_plain_guidance_and_disabled_is_bit_identical():
    init = init_latent()
    p_kwargs = img2img("DPM++ 2M SDE", init)
    plain = h.generate(p_kwargs)[1]
    off = h.generate(p_kwargs, keep_args([CONCEPT], enabled=False))[1]
    assert torch.equal(off, plain)


def test_inpainting_mask_keeps_the_preserved_area():
    init = init_latent(1, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0
    p_kwargs = img2img("DPM++ 2M SDE", init, strength=0.8, mask=mask, nmask=1 - mask)
    out = h.generate(p_kwargs, keep_args([CONCEPT]))[1]
    assert torch.equal(out * mask, init * mask)
    assert ((out - init) * (1 - mask)).abs().max() > 1e-2


def test_an_interrupt_during_inversion_leaves_nothing_behind():
    init = init_latent()

    class Interrupter:
        def process_before_every_sampling(self, p, *args, **kwargs):
            script_callbacks.on_cfg_denoiser(self.stop, name="stopper")

        def stop(self, params):
            if params.denoiser.step == 2:
                shared.state.interrupted = True

        def postprocess(self, p, processed, *args):
            script_callbacks.remove_callbacks_for_function(self.stop)
    try:
        p, _ = h.generate(img2img("DDIM", init), keep_args([CONCEPT]),
                          extra_scripts=[(Interrupter(), [])])
    finally:
        shared.state.interrupted = False
    assert p.sampler.func is original_function("DDIM")


def test_noise_maps_take_one_latent_per_step_and_are_dropped_when_sampling_ends():
    from ldg_core.webui_generation import Generation
    init = init_latent(2, 8, 12)
    p, _ = h.generate(img2img("DPM++ 2M SDE", init, batch_size=2, steps=10, strength=0.6),
                      keep_args())
    generation = Generation.of(p)
    steps = int(0.6 * 10) + 1  # the sigmas run: t_enc + 1 steps
    # the start, a map per step but the last, and the last step's residual
    assert generation.noise_map_bytes == (steps + 1) * init.numel() * init.element_size()
    assert generation.inverter is None


def test_a_pass_without_steps_returns_the_image():
    # DDIM's img2img schedule at 4 steps and strength 0.3 has no step (timesteps[:1]).
    init = init_latent()
    out = h.generate(img2img("DDIM", init, steps=4, strength=0.3), keep_args([CONCEPT]))[1]
    torch.testing.assert_close(out, init, rtol=0, atol=0)


def test_a_refiner_is_refused_before_sampling():
    init = init_latent()
    with pytest.raises(Exception, match="'Keep the image' .* cannot run with a refiner"):
        h.generate(img2img("DDIM", init, refiner_checkpoint="refiner.safetensors"), keep_args())


@pytest.mark.parametrize("sampler", ["DDIM", "DPM++ 2M SDE"])
def test_the_inversion_reports_the_steps_sampling_reports(sampler):
    # Extensions with step windows (ControlNet's guidance start and end, hook.py L439-447) read
    # the sampling step: both passes must show them the same ones.
    recorder = CallCounter()
    h.generate(img2img(sampler, init_latent()), keep_args(), extra_scripts=[(recorder, [])])
    half = len(recorder.calls) // 2
    assert recorder.calls[:half] == recorder.calls[half:]
    assert [s for _, s in recorder.calls[half:]][-1] > 0


def test_weights_at_or_below_zero_leave_a_concept_out():
    init = init_latent()
    p_kwargs = img2img("DPM++ 2M SDE", init, strength=0.8)
    none = h.generate(p_kwargs, keep_args([dict(CONCEPT, weight=0.0)]))[1]
    negative = h.generate(p_kwargs, keep_args([dict(CONCEPT, weight=-1.0)]))[1]
    torch.testing.assert_close(none, init, rtol=0, atol=2e-5)
    torch.testing.assert_close(negative, init, rtol=0, atol=2e-5)


@pytest.mark.parametrize("module", ["reference_only", "inpaint_only"])
def test_controlnet_units_with_per_row_state_are_refused(module):
    from tests.test_webui_paths import ControlNetMarks
    calls = []
    original = shared.sd_model.apply_model
    shared.sd_model.apply_model = lambda *a, **k: calls.append(1) or original(*a, **k)
    with pytest.raises(Exception, match=f"cannot run next to ControlNet unit 1 \\({module}\\)"):
        h.generate(img2img("DDIM", init_latent()), keep_args([CONCEPT]),
                   extra_scripts=[(ControlNetMarks(module=module), [])])
    assert calls == []


def test_a_failure_while_inverting_stops_with_one_message(monkeypatch):
    import ldg_core.webui_inversion as inversion

    def broken(*args, **kwargs):
        raise RuntimeError("no noise here")
    monkeypatch.setattr(inversion, "image_noise", lambda seeds, x0: broken)
    with pytest.raises(Exception, match="failed at step 0 while inverting the image: "
                                        "RuntimeError: no noise here"):
        h.generate(img2img("DDIM", init_latent()), keep_args([CONCEPT]))


def test_an_interrupt_while_ddim_samples_puts_its_noise_hook_back():
    import k_diffusion.sampling

    class Interrupter:
        def process_before_every_sampling(self, p, *args, **kwargs):
            self.calls = 0
            script_callbacks.on_cfg_denoiser(self.stop, name="stopper")

        def stop(self, params):
            self.calls += 1
            if self.calls == 8:  # 5 inversion calls (DDIM, strength 0.6 of 10), then sampling
                shared.state.interrupted = True

        def postprocess(self, p, processed, *args):
            script_callbacks.remove_callbacks_for_function(self.stop)
            self.hook = k_diffusion.sampling.torch
    interrupter = Interrupter()
    try:
        p, _ = h.generate(img2img("DDIM", init_latent()), keep_args([CONCEPT]),
                          extra_scripts=[(interrupter, [])])
    finally:
        shared.state.interrupted = False
    assert type(interrupter.hook).__name__ == "TorchHijack"  # the WebUI's, not our maps
    assert p.sampler.func is original_function("DDIM")
