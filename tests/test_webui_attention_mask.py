"""LEDITS++'s cross-attention mask in the WebUI test double's img2img ("Keep the image").

The double's model has cross-attention at the latents' resolution / 4 (TinySD
attention_levels=True) and, like the WebUI, keeps its UNet at sd_model.model.diffusion_model.
Each step's recorded map of each concept and image is checked against the same UNet run on that
image alone with the concept's conditioning, its probabilities computed by hand: so the rows the
recorder reads are the concept's, in every layout the WebUI's calls take (batch, AND prompt,
concepts in calls of their own). The mask's math is held to diffusers' reference in
tests/test_inversion_attention_reference.py.
"""
import pytest
import torch

from tests import webui_harness as h
from tests.webui_harness import webui_state  # noqa: F401 (autouse: a fresh double per test)
from tests.webui_double.model import TinySD
from ldg_core import cross_attention, webui_inversion
from ldg_core.paste import KEEP_IMAGE_KEY, paste_from_params
from ldg_core.script_args import settings_from_args
from ldg_core.ui_args import KEEP_IMAGE, KEEP_IMAGE_MASK
from modules import shared

GLASSES = {"prompt": "glasses", "scale": 40.0, "warmup": 1, "threshold": 0.6}
HAT = {"prompt": "a red hat", "scale": 30.0, "threshold": 0.5, "warmup": 0,
       "direction": "remove"}


@pytest.fixture(autouse=True)
def attention_model(webui_state):  # noqa: F811 (after the fresh double's own model)
    shared.sd_model = TinySD(attention_levels=True)


def mask_args(concepts, mask):
    args = h.script_args(concepts)
    args[KEEP_IMAGE], args[KEEP_IMAGE_MASK] = True, mask
    return args


def img2img(sampler="DDIM", batch=1, height=16, width=16, steps=8, **kw):
    init = torch.randn(batch, 4, height, width, generator=torch.Generator().manual_seed(5))
    return dict({"sampler_name": sampler, "steps": steps, "init_latent": init,
                 "denoising_strength": 0.8, "batch_size": batch}, **kw)


class Spy:
    """Keeps, per CFG denoiser call that armed the recorder, the images' x and sigma, and the
    maps the engine was handed."""

    def __init__(self, monkeypatch):
        self.calls = []
        arm, attention = webui_inversion.AttentionMasks.arm, webui_inversion.AttentionMasks.attention

        def spy_arm(masks, rows, call):
            self.calls.append({"x": call.x.clone(), "sigma": call.sigma.clone(), "rows": rows,
                               "maps": {}, "timestep": None, "step": call.denoiser.step})
            arm(masks, rows, call)
            self.calls[-1]["timestep"] = masks.timestep

        def spy_attention(masks, concept):
            result = attention(masks, concept)
            self.calls[-1]["maps"][concept] = result
            return result
        monkeypatch.setattr(webui_inversion.AttentionMasks, "arm", spy_arm)
        monkeypatch.setattr(webui_inversion.AttentionMasks, "attention", spy_attention)


def by_hand(x, timestep, prompt, tokens):
    """The concept's map for one image: the double's UNet on x with the concept's conditioning,
    each /4 attn2 layer of the down and up blocks' probabilities from q and k, averaged over
    heads and layers, summed over tokens 1..tokens."""
    model = shared.sd_model
    cond = model.get_learned_conditioning([prompt])
    context = cond["crossattn"] if model.is_sdxl else cond
    labels = cond["vector"] if model.is_sdxl else None
    layers, grabbed = [], []
    for name, module in model.unet.named_modules():
        if name.endswith("attn2") and not name.startswith("mid_block"):
            layers.append(module.register_forward_pre_hook(
                lambda m, args, kwargs: grabbed.append((m, args[0], kwargs["encoder_hidden_states"])),
                with_kwargs=True))
    try:
        with torch.no_grad():
            model.unet(x[None], torch.tensor([timestep]), encoder_hidden_states=context,
                       class_labels=labels)
    finally:
        for handle in layers:
            handle.remove()
    h4, w4 = -(-x.shape[-2] // 4), -(-x.shape[-1] // 4)
    heads = []
    for module, hidden, ctx in grabbed:
        if hidden.shape[1] != h4 * w4:
            continue
        q = module.to_q(hidden[0]).view(h4 * w4, module.heads, -1).transpose(0, 1)
        k = module.to_k(ctx[0]).view(ctx.shape[1], module.heads, -1).transpose(0, 1)
        heads.append(((q @ k.transpose(1, 2)) * module.scale).softmax(-1)[:, :, 1:1 + tokens])
    assert len(heads) == 3  # down_blocks.2 (one layer) and up_blocks.0 (two layers)
    return torch.cat(heads).mean(0).sum(-1).view(h4, w4)


CASES = {
    "one image": dict(),
    "two images, non-square": dict(batch=2, height=16, width=24),
    "AND prompt": dict(batch=2, prompt="a cat AND a dog :0.5"),
    "concepts in calls of their own": dict(batch=2, max_rows=3),
    "SDXL conditioning": dict(batch=2, sdxl=True),
}


@pytest.mark.parametrize("case", CASES)
def test_each_map_is_the_concepts_own_attention_on_its_image(case, monkeypatch):
    settings = dict(CASES[case])
    if "max_rows" in settings:
        shared.opts.ldg_max_rows_per_call = settings.pop("max_rows")
    if settings.pop("sdxl", False):  # a dict conditioning with a pooled vector
        shared.sd_model = TinySD(sdxl=True, attention_levels=True)
    spy = Spy(monkeypatch)
    p, out = h.generate(img2img(**settings), mask_args([GLASSES, HAT], "attention"))
    assert p.extra_generation_params[KEEP_IMAGE_KEY] == "LEDITS++, attention mask"
    tokens = {0: 1, 1: 3}  # "glasses"; "a red hat"
    checked = 0
    for call in spy.calls:
        for concept, maps in call["maps"].items():
            prompt = (GLASSES, HAT)[concept]["prompt"]
            for image in range(len(call["x"])):
                expected = by_hand(call["x"][image], float(call["sigma"][image]), prompt,
                                   tokens[concept])
                torch.testing.assert_close(maps[image], expected, rtol=1e-5, atol=1e-6)
                checked += 1
    batch = settings.get("batch", 1)
    # both concepts at every sampled step but the first (GLASSES' warmup), on every image
    assert checked >= (2 * len(spy.calls) - 1) * batch and len(spy.calls) >= 5
    assert all(len(set(map(float, maps.flatten()))) > 1 for call in spy.calls
               for maps in call["maps"].values())
    if batch == 2:  # two images, two maps
        assert not torch.equal(spy.calls[-1]["maps"][1][0], spy.calls[-1]["maps"][1][1])


def test_the_mask_changes_the_edit_and_leaves_no_hook(monkeypatch):
    unet = shared.sd_model.unet
    outputs = {mask: h.generate(img2img(), mask_args([GLASSES], mask))[1]
               for mask in ("noise", "attention", "both")}
    init = img2img()["init_latent"]
    for mask, out in outputs.items():
        assert (out - init).abs().max() > 1e-2, f"{mask}: the concept had no effect"
    assert not torch.equal(outputs["noise"], outputs["attention"])
    assert not torch.equal(outputs["attention"], outputs["both"])
    hooks = [m for m in unet.modules() if m._forward_pre_hooks]
    assert hooks == [], "the recorder's hooks stayed"
    # without a concept the image comes back whatever the mask
    out = h.generate(img2img(), mask_args([], "both"))[1]
    torch.testing.assert_close(out, init, rtol=0, atol=2e-5)


@pytest.mark.parametrize("sampler", ["DDIM", "DPM++ 2M SDE"])
def test_both_reads_the_steps_model_timestep(sampler, monkeypatch):
    """DDIM's denoiser gets timesteps; k-diffusion's gets sigmas, whose timestep is the one
    whose noise level they are: at full strength the first is the last of 1000 (999)."""
    spy = Spy(monkeypatch)
    h.generate(img2img(sampler, steps=10, denoising_strength=1.0), mask_args([HAT], "both"))
    timesteps = [float(call["timestep"].reshape(-1)[0]) for call in spy.calls]
    if sampler == "DDIM":
        assert timesteps == [float(call["sigma"][0]) for call in spy.calls]
        assert timesteps[0] > 800 > timesteps[-1] and timesteps[0] == int(timesteps[0])
    else:
        alphas = shared.sd_model.alphas_cumprod.double()
        levels = ((1 - alphas) / alphas).sqrt()
        for call, t in zip(spy.calls, timesteps):
            sigma = float(call["sigma"][0])
            below = int((levels < sigma).sum()) - 1  # the timesteps around sigma's level
            assert below <= t <= below + 1
        assert timesteps[0] == pytest.approx(999, abs=0.01)
    assert timesteps == sorted(timesteps, reverse=True) and len(timesteps) >= 8


def test_a_scheduled_concept_reads_the_tokens_of_its_text_at_each_step(monkeypatch):
    """"[glasses:a red hat:2]" is "glasses" (1 token) up to call 2, then "a red hat" (3): each
    step's map sums the tokens of the text the concept's rows carry then."""
    spy = Spy(monkeypatch)
    scheduled = dict(HAT, prompt="[glasses:a red hat:2]")
    h.generate(img2img(steps=8), mask_args([scheduled], "attention"))
    texts = set()
    for call in spy.calls:
        prompt, tokens = ("glasses", 1) if call["step"] <= 2 else ("a red hat", 3)
        texts.add(prompt)
        expected = by_hand(call["x"][0], float(call["sigma"][0]), prompt, tokens)
        torch.testing.assert_close(call["maps"][0][0], expected, rtol=1e-5, atol=1e-6)
    assert texts == {"glasses", "a red hat"}


def test_an_error_while_recording_stops_once_and_leaves_no_hook(monkeypatch):
    calls = []

    def failing(recorder, concept, images):
        calls.append(1)
        raise RuntimeError("recording broke")
    monkeypatch.setattr(cross_attention.CrossAttentionRecorder, "attention", failing)
    with pytest.raises(Exception, match="failed at step .* RuntimeError: recording broke"):
        h.generate(img2img(), mask_args([HAT], "attention"))
    assert calls == [1]
    assert [m for m in shared.sd_model.unet.modules() if m._forward_pre_hooks] == []


def test_a_concept_longer_than_one_chunk_is_refused_before_sampling():
    long_concept = dict(GLASSES, prompt=" ".join(["word"] * 76))
    calls = []
    handle = shared.sd_model.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(Exception, match="concept 2 has 76 tokens, and the cross-attention "
                                            "mask reads at most 75"):
            h.generate(img2img(), mask_args([HAT, long_concept], "attention"))
    finally:
        handle.remove()
    assert calls == []
    # the noise mask takes it
    h.generate(img2img(), mask_args([HAT, long_concept], "noise"))


def test_the_mask_is_a_setting_of_the_api_and_the_image_parameters():
    settings = settings_from_args([{"keep_image": True, "keep_image_mask": "both",
                                    "concepts": [{"prompt": "hat"}]}], {})
    assert settings.keep_image and settings.keep_image_mask == "both"
    assert settings_from_args(mask_args([GLASSES], "attention"), {}).keep_image_mask == "attention"
    assert settings_from_args([{"keep_image": True}], {}).keep_image_mask == "noise"
    with pytest.raises(ValueError, match="keep_image_mask must be one of noise, attention, both, "
                                         "got 'cross'"):
        settings_from_args([{"keep_image": True, "keep_image_mask": "cross"}], {})
    for mask, text in (("noise", "LEDITS++"), ("attention", "LEDITS++, attention mask"),
                       ("both", "LEDITS++, attention and noise masks")):
        values = paste_from_params({KEEP_IMAGE_KEY: text}).values
        assert values[KEEP_IMAGE] is True and values[KEEP_IMAGE_MASK] == mask
    assert paste_from_params({"Steps": "20"}).values.get(KEEP_IMAGE_MASK) in (None, "noise")
    # X/Y/Z axes ("[LDG] Keep the image", "[LDG] Keep the image mask") give strings
    plain = h.script_args([GLASSES])
    cell = settings_from_args(plain, {}, {"keep_image": "True", "keep_image_mask": "both"})
    assert cell.keep_image and cell.keep_image_mask == "both"
    cell = settings_from_args([{"keep_image": True}], {}, {"keep_image_mask": "attention"})
    assert cell.keep_image and cell.keep_image_mask == "attention"
    with pytest.raises(ValueError, match="keep_image_mask must be one of"):
        settings_from_args(plain, {}, {"keep_image_mask": "everywhere"})

