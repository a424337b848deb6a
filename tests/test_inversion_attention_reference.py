"""LEDITS++'s cross-attention masks against diffusers' LEditsPPPipelineStableDiffusion.

The oracle (tests/ledits_reference.py) edits with use_cross_attn_mask (the "attention" mask)
and with use_intersect_mask ("both"), on a tiny UNet with cross-attention at the latents'
resolution / 4 (where the reference's attention store looks), for DDIM and DPM-Solver++(2M)
SDE. Our side records the same UNet's attention with ldg_core.cross_attention's recorder and
edits with ledits_edit. Every step starts from the reference's own latents, and each step's
masks (the reference's activation_mask), edit and next latents are compared.

One image: the reference's attention store mixes the heads of different images in a batch
(see tests/ledits_reference.py). Our recorder is told the reference's token count per concept
(75 for any concept: its num_edit_tokens counts padding); the WebUI passes the concept's own.
"""

from __future__ import annotations

import pytest
import torch

from ldg_core import Concept
from ldg_core import cross_attention
from ldg_core.cross_attention import CrossAttentionRecorder
from ldg_core.inversion import concepts_acting, invert, ledits_edit
from tests.ledits_reference import build_ledits, run_ledits, sample_images, text_embeddings
from tests.test_inversion_reference import (KINDS, SEED, STEPS, TOL_EDIT, TOL_STEP, close,
                                            drawn_noises, eps, model_output, rule_for,
                                            unet_input, vp_scale)

MASKS = ("attention", "both")
HEIGHT, WIDTH = 32, 64  # latents 16 x 32, attention at 4 x 8
SKIP = 0.0  # DDIM's first timestep is then 801: "both" uses the attention mask alone there

CONCEPTS = [
    Concept(prompt="glasses", scale=6.0, threshold=0.7, warmup=1),
    Concept(prompt="snow", scale=4.0, threshold=0.5, warmup=0, cooldown=4, reverse=True),
]


def unet_layers(unet):
    """(place, attn2 module) in call order, placed by diffusers' block names, as the
    reference's prepare_unet places them."""
    places = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}
    return [(places[name.split(".")[0]], module) for name, module in unet.named_modules()
            if name.endswith("attn2")]


_cache = {}


def reference(kind, mask):
    key = kind, mask
    if key not in _cache:
        pipe = build_ledits(kind, attention_levels=True)
        images = sample_images(1, HEIGHT, WIDTH)
        runs = run_ledits(pipe, images, {"concepts": CONCEPTS}, steps=STEPS, skip=SKIP,
                          seed=SEED, mask=mask)
        from diffusers.models.attention_processor import AttnProcessor
        pipe.unet.set_attn_processor(AttnProcessor())  # LEDITSCrossAttnProcessor's arithmetic
        _cache[key] = pipe, runs["concepts"]
    return _cache[key]


def our_steps(pipe, run, mask):
    """Each step from the reference's latents: (masks per acting concept, edit, latents)."""
    rule = rule_for(pipe, run)
    uncond_only = text_embeddings(pipe, [], 1)

    def model(step, x):
        (estimate,) = eps(pipe, unet_input(run, step, x), run.timesteps[step], uncond_only)
        return model_output(run, step, x, estimate)
    maps = invert(rule, run.x0, model, drawn_noises(run))
    tokens = dict(enumerate(run.edit_tokens))
    embeddings = text_embeddings(pipe, [c.prompt for c in CONCEPTS], 1)
    recorder = CrossAttentionRecorder(pipe.unet, unet_layers(pipe.unet))
    recorder.attach()
    results = []
    try:
        rule.reset()
        for step, t in enumerate(run.timesteps):
            x_unet = run.init_latents if step == 0 else run.latents[step - 1]
            x = x_unet * vp_scale(run, step)
            acting = concepts_acting(CONCEPTS, step)
            # rows of the call: uncond, then each concept (one image)
            recorder.arm({1 + i: (i, 0) for i in acting}, tokens, x.shape[-2:])
            uncond, *estimates = eps(pipe, x_unet, t, embeddings)
            masks = {}
            edit = ledits_edit(CONCEPTS, step, uncond, dict(enumerate(estimates)),
                               observer=masks.__setitem__, mask=mask,
                               attention=lambda i: recorder.attention(i, 1), timestep=t)
            mean = rule.mean(step, x, model_output(run, step, x, uncond + edit))
            latents = rule.add_noise(step, mean, maps.noise[step]) if rule.has_noise(step) \
                else mean
            results.append((masks, edit, latents))
    finally:
        recorder.detach()
    return results


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mask", MASKS)
def test_each_step_matches_reference_with_attention_mask(kind, mask):
    pipe, run = reference(kind, mask)
    compared = 0
    for step, (masks, edit, latents) in enumerate(our_steps(pipe, run, mask)):
        for i in concepts_acting(CONCEPTS, step):
            expected = run.masks[step, i] > 0
            assert torch.equal(masks[i], expected), f"{mask} mask of concept {i} at step {step}"
            compared += 1
        close(edit, run.edits[step], f"edit at step {step}", TOL_EDIT)
        if step + 1 < STEPS:
            close(latents, run.latents[step] * vp_scale(run, step + 1),
                  f"latents after step {step}", TOL_STEP)
    assert compared == sum(len(concepts_acting(CONCEPTS, s)) for s in range(STEPS)) >= 8


@pytest.mark.parametrize("kind", KINDS)
def test_the_masks_differ_from_the_noise_mask_and_each_other(kind):
    """Guards the test above: each option's masks are its own, and "both" meets both of its
    branches (the attention mask alone above timestep 800, the intersection below)."""
    _, attention = reference(kind, "attention")
    _, both = reference(kind, "both")
    assert attention.timesteps[0] > 800 >= attention.timesteps[1]
    first = concepts_acting(CONCEPTS, 0)[0]
    assert torch.equal(both.masks[0, first], attention.masks[0, first])
    later = [(s, i) for s in range(1, STEPS) for i in concepts_acting(CONCEPTS, s)]
    assert any(not torch.equal(both.masks[s, i], attention.masks[s, i]) for s, i in later)
    # the intersection keeps less than an attention mask of the same share would
    assert float(both.masks[1:].mean()) < float(attention.masks[1:].mean())
    # an attention mask covers whole 4 x 4 cells of the latents and every channel alike
    cells = attention.masks[1, 0][0, 0].unflatten(0, (4, 4)).unflatten(2, (8, 4))
    assert bool((cells == cells[:, :1, :, :1]).all())
    assert 0 < float(attention.masks[1, 0].mean()) < 1


@pytest.mark.parametrize("mutation", ("middle block included", "no smoothing",
                                      "start token counted"))
def test_mutations_are_caught(mutation, monkeypatch):
    pipe, run = reference("ddim", "attention")
    if mutation == "middle block included":
        monkeypatch.setattr(cross_attention, "PLACES", ("up", "down", "mid"))
    elif mutation == "no smoothing":
        identity = torch.zeros(1, 1, 3, 3)
        identity[0, 0, 1, 1] = 1
        monkeypatch.setattr(cross_attention, "gaussian_kernel", lambda dtype, device: identity)
    else:  # tokens 0..74 rather than 1..75
        monkeypatch.setattr(cross_attention, "FIRST_TOKEN", 0)
    wrong = 0
    for step, (masks, _, _) in enumerate(our_steps(pipe, run, "attention")):
        for i in concepts_acting(CONCEPTS, step):
            wrong += not torch.equal(masks[i], run.masks[step, i] > 0)
    assert wrong >= 2


def test_recorder_selects_each_concepts_own_tokens():
    """With a concept's own token count, the map sums exactly its tokens 1..n: checked against
    the probabilities of one layer computed by hand from its projections."""
    pipe, _ = reference("ddim", "attention")
    unet = pipe.unet
    layers = [(p, m) for p, m in unet_layers(unet) if p == "down"][-1:]  # one layer at / 4
    recorder = CrossAttentionRecorder(unet, layers)
    embeddings = text_embeddings(pipe, ["glasses", "a red hat"], 2)  # 2 images, 2 concepts
    x = torch.randn(6, 4, 16, 32, generator=torch.Generator().manual_seed(5))
    inputs = []

    def keep_input(module, args, kwargs):
        inputs.append((args[0], kwargs["encoder_hidden_states"]))
    handle = layers[0][1].register_forward_pre_hook(keep_input, with_kwargs=True)
    recorder.attach()
    try:
        # rows: uncond x2, "glasses" x2, "a red hat" x2, in two model calls of three rows (as
        # the WebUI splits a batch): rows are numbered across them
        recorder.arm({2: (0, 0), 3: (0, 1), 4: (1, 0), 5: (1, 1)}, {0: 7, 1: 7}, (16, 32))
        with torch.no_grad():
            for part in (slice(0, 3), slice(3, 6)):
                unet(x[part], torch.tensor(500), encoder_hidden_states=embeddings[part])
        glasses, hat = recorder.attention(0, 2), recorder.attention(1, 2)
        with pytest.raises(RuntimeError, match="concept 1"):
            recorder.attention(0, 3)  # no third image was armed
    finally:
        handle.remove()
        recorder.detach()
    layer = layers[0][1]
    seen_x, seen_context = (torch.cat(part) for part in zip(*inputs))
    for row, got in ((2, glasses[0]), (3, glasses[1]), (4, hat[0]), (5, hat[1])):
        q = layer.to_q(seen_x[row]).view(32, layer.heads, -1).transpose(0, 1)
        k = layer.to_k(seen_context[row]).view(77, layer.heads, -1).transpose(0, 1)
        probs = ((q @ k.transpose(1, 2)) * layer.scale).softmax(-1)  # [heads, 32, 77]
        expected = probs[:, :, 1:8].sum(-1).mean(0).view(4, 8)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert pipe.tokenizer("a red hat").input_ids[1:-1].__len__() == 7
    assert not torch.allclose(glasses[0], glasses[1]) and not torch.allclose(glasses, hat)
    assert not recorder._handles and not layer._forward_pre_hooks


def test_probabilities_stay_in_float32_under_autocast():
    """The WebUI samples under autocast (processing.py, devices.autocast): the scores must not
    drop to half precision there."""
    pipe, _ = reference("ddim", "attention")
    layer = [m for p, m in unet_layers(pipe.unet) if p == "down"][-1]
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 32, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    plain = cross_attention.probabilities(layer, x, context)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = cross_attention.probabilities(layer, x, context)
        assert torch.bmm(x, x.transpose(1, 2)).dtype == torch.bfloat16  # autocast is on
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=0, atol=0)
