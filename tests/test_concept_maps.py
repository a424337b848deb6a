"""Concept maps: the count of where each concept passed its threshold, checked against masks
computed here independently (numpy's quantile), and the maps of a whole generation in the
WebUI double."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests import webui_harness as h
from tests.webui_harness import webui_state  # noqa: F401 (autouse: a fresh double per test)
from tests.webui_double.model import TinySD
from ldg_core import Concept, GuidanceConfig, SemanticGuidance
from ldg_core.concept_maps import ConceptMapRecorder, batch_overlays, combine, overlay
from ldg_core.ui_args import SLOTS_END
from modules import script_callbacks, shared


def numpy_mask(estimate, uncond, concept):
    """The SEGA mask, independently: |scale * (e - u)| (sign flipped for remove) at or above
    the per image and channel quantile over positions (linear interpolation, as the paper's
    torch.quantile)."""
    d = (estimate - uncond).numpy().astype(np.float64) * concept.scale
    magnitude = np.abs(d)
    b, c = magnitude.shape[:2]
    cut = np.quantile(magnitude.reshape(b, c, -1), concept.threshold, axis=2)
    return magnitude >= cut[:, :, None, None]


def test_recorder_counts_the_share_of_channels_per_call():
    recorder = ConceptMapRecorder()
    mask = torch.zeros(1, 4, 2, 2, dtype=torch.bool)
    mask[0, :, 0, 0] = True  # every channel
    mask[0, :2, 1, 1] = True  # half of the channels
    recorder.observe(0, mask)
    recorder.observe(0, torch.zeros_like(mask))
    (heat,) = combine([recorder], (2, 2))[0]
    np.testing.assert_allclose(heat, [[0.5, 0.0], [0.0, 0.25]])


def test_engine_observes_only_acting_concepts_with_their_threshold_masks():
    torch.manual_seed(0)
    config = GuidanceConfig(concepts=[Concept("a", scale=3, threshold=0.7, warmup=2),
                                      Concept("b", reverse=True, scale=2, threshold=0.5,
                                              warmup=0, cooldown=3)])
    seen = []
    guidance = SemanticGuidance(config, observer=lambda i, m: seen.append((step, i, m.clone())))
    expected = []
    for step in range(5):
        uncond = torch.randn(2, 4, 6, 6)
        cond = torch.randn(2, 4, 6, 6)
        estimates = torch.randn(2, 2, 4, 6, 6)
        guidance.step(step=step, uncond=uncond, cond=cond, concepts=estimates)
        for i, concept in enumerate(config.concepts):
            acting = step >= concept.warmup and (concept.cooldown is None or step < concept.cooldown)
            if acting:
                expected.append((step, i, numpy_mask(estimates[i], uncond, concept)))
    assert [(s, i) for s, i, _ in seen] == [(s, i) for s, i, _ in expected]
    for (_, _, got), (_, _, want) in zip(seen, expected):
        assert np.array_equal(got.numpy(), want)


def test_passes_of_different_sizes_combine_weighted_by_calls():
    first, hires = ConceptMapRecorder(), ConceptMapRecorder()
    for _ in range(3):
        first.observe(0, torch.ones(1, 4, 4, 4, dtype=torch.bool))
    hires.observe(0, torch.zeros(1, 4, 8, 8, dtype=torch.bool))
    (heat,) = combine([first, hires], (16, 16))[0]
    np.testing.assert_allclose(heat, np.full((16, 16), 0.75), rtol=1e-6)


def test_overlay_leaves_unvisited_places_close_to_the_image_and_checks_sizes():
    image = np.full((8, 8, 3), 200, np.uint8)
    heat = np.zeros((8, 8), np.float32)
    heat[:4] = 1.0
    out = overlay(image, heat)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.abs(out[4:].astype(int) - 200).max() <= 0.15 * 255 + 1
    assert np.abs(out[:4].astype(int) - 200).max() > 60
    with pytest.raises(ValueError, match="differ in size"):
        overlay(image, np.zeros((4, 4)))


def test_maps_of_a_generation_and_free_when_off():
    concepts = [{"prompt": "smiling woman", "scale": 40.0, "warmup": 2, "threshold": 0.8},
                {"prompt": "glasses", "direction": "remove", "scale": 30.0, "warmup": 1,
                 "cooldown": 4}]
    p_kwargs = {"sampler_name": "Euler", "steps": 6, "batch_size": 2, "n_iter": 2}
    args = h.script_args(concepts)
    p_off, off = h.generate(p_kwargs, args)
    args[SLOTS_END] = True  # concept_maps
    p_on, on = h.generate(p_kwargs, args)
    assert torch.equal(off, on)  # recording never changes the image
    generation_off = p_off.latent_diffusion_guidance
    assert generation_off.map_batches is None
    assert generation_off.current.guidance.engine.observer is None
    batches = p_on.latent_diffusion_guidance.map_batches
    assert len(batches) == 2 and all(len(passes) == 1 for passes in batches)
    recorder = batches[0][0]
    assert recorder.calls == {0: 6 - 2, 1: 4 - 1}  # steps past warmup, before cooldown
    images = [np.zeros((64, 64, 3), np.uint8) for _ in range(4)]
    overlays = p_on.latent_diffusion_guidance.concept_map_overlays(images)
    assert [(i, c) for i, c, _ in overlays] == [(i, c) for i in range(4) for c in (0, 1)]
    assert all(o.shape == (64, 64, 3) for _, _, o in overlays)


def test_postprocess_adds_one_map_per_image_and_concept_to_the_gallery():
    args = h.script_args([{"prompt": "glasses", "warmup": 0}, {"prompt": "hat", "warmup": 0}])
    args[SLOTS_END] = True  # concept_maps
    p, _ = h.generate({"sampler_name": "Euler", "steps": 4, "batch_size": 2}, args)
    grid = Image.new("RGB", (128, 64))
    pictures = [Image.new("RGB", (64, 64), (90, 90, 90)) for _ in range(2)]
    processed = SimpleNamespace(images=[grid] + pictures, index_of_first_image=1,
                                infotexts=["grid", "image 1", "image 2"])
    h.SCRIPT_MODULE.LatentDiffusionGuidanceScript().postprocess(p, processed, *args)
    assert len(processed.images) == 3 + 2 * 2
    assert processed.infotexts[3:] == ["image 1", "image 1", "image 2", "image 2"]
    assert all(image.size == (64, 64) for image in processed.images[3:])


def test_the_safety_term_gets_a_map_where_its_mask_acted(monkeypatch):
    from ldg_core import SafetyConfig
    safety = SafetyConfig(concept="glasses", scale=60.0, threshold=0.05, warmup=2)
    args = h.script_args([{"prompt": "hat", "warmup": 0}], safety=safety)
    p_kwargs = {"sampler_name": "Euler", "steps": 5}
    _, off = h.generate(p_kwargs, args)
    args[SLOTS_END] = True  # concept_maps
    p, on = h.generate(p_kwargs, args)
    assert torch.equal(off, on)
    recorder = p.latent_diffusion_guidance.map_batches[0][0]
    assert recorder.calls == {0: 5, 1: 5 - 2}  # the safety term from its warmup on
    hits = recorder.hits[1]
    assert 0 < float(hits.min()) or float(hits.max()) > 0  # it acted somewhere
    processed = SimpleNamespace(images=[Image.new("RGB", (64, 64))], index_of_first_image=0,
                                infotexts=["image"])
    labels = []
    monkeypatch.setattr("PIL.ImageDraw.ImageDraw.text",
                        lambda self, xy, text, **kwargs: labels.append(text))
    h.SCRIPT_MODULE.LatentDiffusionGuidanceScript().postprocess(p, processed, *args)
    assert len(processed.images) == 1 + 2
    assert labels == ["concept 1: add 'hat'", "safety: 'glasses'"]


def test_the_safety_map_is_where_slds_own_mask_let_the_safety_estimate_act():
    # The reference evaluates the safety concept in a call of its own and keeps SLD's mask as
    # the pipeline computes it (scale 0 where eps_text - eps_safety >= threshold) at each step
    # from the warmup on; the map must be that mask's share of channels, averaged over steps.
    from ldg_core import SafetyConfig
    from tests.webui_reference import ReferenceGuidance
    from tests.test_webui_paths import config_of
    safety = SafetyConfig(concept="glasses", scale=60.0, threshold=0.0, warmup=2)
    p_kwargs = {"sampler_name": "Heun", "steps": 6, "batch_size": 2}
    args = h.script_args([], safety=safety)
    args[SLOTS_END] = True  # concept_maps
    p, _ = h.generate(p_kwargs, args)
    reference = ReferenceGuidance(config_of([]), safety)
    h.generate(p_kwargs, None, extra_scripts=[(reference, [])])
    recorder = p.latent_diffusion_guidance.map_batches[0][0]
    masks = reference.safety_masks
    # Heun: two calls a step from the warmup on, one at the last step
    assert recorder.calls == {0: len(masks)} and len(masks) == 2 * (6 - 2) - 1
    expected = torch.stack([m.float().mean(dim=1) for m in masks]).sum(0)
    assert 0.1 < float(expected.mean()) / len(masks) < 0.9  # the mask is neither empty nor full
    torch.testing.assert_close(recorder.hits[0], expected, rtol=0, atol=1e-6)
    (maps,) = [combine([recorder], (8, 8))[0]]
    np.testing.assert_allclose(maps, (expected / len(masks)).numpy(), atol=1e-6)
