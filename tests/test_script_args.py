"""The script's arguments: positional (UI and API), the API's dict form, presets and X/Y/Z
overrides. Expected values are written out from the issue's and README's examples, not taken
from the code under test."""
import pytest

from ldg_core import Concept, GuidanceConfig
from ldg_core.presets import BUILTIN_PRESETS
from ldg_core.script_args import settings_from_args
from tests.webui_harness import script_args  # noqa: F401 (puts the WebUI double on sys.path)

PRESETS = dict(BUILTIN_PRESETS)
ISSUE_EXAMPLE = {"enabled": True, "concepts": [{"prompt": "glasses", "reverse": False, "scale": 5,
                                                "threshold": 0.9, "warmup": 10,
                                                "cooldown": None, "weight": 1}],
                 "momentum_scale": 0.1, "momentum_beta": 0.4}


def parse(args, overrides=None):
    return settings_from_args(args, PRESETS, overrides)


def api_args(data):
    """What the WebUI hands the script for `"args": [data]`: the dict first, then the UI's
    defaults for every other position (modules/api/api.py L335-361)."""
    return [data] + script_args(enabled=False)[1:]


# -- positional ---------------------------------------------------------------------------------

def test_positional_layout_of_the_readme():
    args = [True, 0.1, 0.4,
            True, "smiling", "add", 5, 0.9, 10, -1, 1,
            True, "glasses", "remove", 4, 0.9, 5, 30, 1]
    settings = parse(args)
    assert settings.config == GuidanceConfig(
        concepts=[Concept("smiling", scale=5, threshold=0.9, warmup=10),
                  Concept("glasses", reverse=True, scale=4, threshold=0.9, warmup=5, cooldown=30)],
        momentum_scale=0.1, momentum_beta=0.4)
    assert settings.concept_maps is False


def test_concept_maps_is_the_argument_after_the_ten_slots():
    args = script_args([{"prompt": "glasses"}])
    assert len(args) == 3 + 10 * 8 + 1 + 8 + 2  # + SLD's part, "Keep the image" and its mask
    args[3 + 10 * 8] = True
    assert parse(args).concept_maps is True
    args[0] = False  # disabled: nothing to map
    assert parse(args) .concept_maps is False


def test_keep_image_and_its_mask_are_the_last_arguments_and_keys_of_the_dict_form():
    args = script_args([])
    args[3 + 10 * 8 + 1 + 8] = True
    settings = parse(args)  # no concept: the image is kept (and nothing else changes)
    assert settings.keep_image is True and settings.active and settings.config is None
    args[0] = False
    assert parse(args).keep_image is False and not parse(args).active
    assert parse([{"keep_image": True}]).keep_image is True
    assert parse([{"keep_image": True, "enabled": False}]).active is False
    assert parse(script_args([{"prompt": "hat"}])).keep_image is False  # older positional calls
    with pytest.raises(ValueError, match="keep_image must be true or false, got 'yes'"):
        parse([{"keep_image": "yes"}])
    assert settings.keep_image_mask == "noise"
    args[0], args[3 + 10 * 8 + 1 + 8 + 1] = True, "both"
    assert parse(args).keep_image_mask == "both"
    args[3 + 10 * 8 + 1 + 8 + 1] = "everywhere"
    with pytest.raises(ValueError, match="keep_image_mask must be one of noise, attention, "
                                         "both, got 'everywhere'"):
        parse(args)


def test_empty_or_unticked_positional_slots_are_unused():
    args = script_args([{"prompt": ""}, {"prompt": "hat", "slot_enabled": False},
                        {"prompt": "glasses"}])
    assert [c.prompt for c in parse(args).config.concepts] == ["glasses"]


def test_positional_errors_name_slot_and_field():
    with pytest.raises(ValueError, match=r"concept 2 \('hat'\): threshold must be a number in "
                                         r"\[0, 1\], got 2"):
        parse(script_args([{"prompt": "glasses"}, {"prompt": "hat", "threshold": 2}]))


# -- the dict form ------------------------------------------------------------------------------

def test_the_issue_example_dict():
    settings = parse(api_args(ISSUE_EXAMPLE))
    assert settings.config == GuidanceConfig(concepts=[Concept("glasses", scale=5, threshold=0.9,
                                                               warmup=10, weight=1)],
                                             momentum_scale=0.1, momentum_beta=0.4)


def test_dict_missing_keys_take_the_documented_defaults():
    settings = parse(api_args({"concepts": [{"prompt": "glasses"}]}))
    (concept,) = settings.config.concepts
    assert (concept.scale, concept.threshold, concept.warmup, concept.cooldown, concept.weight,
            concept.reverse) == (5, 0.9, 10, None, 1, False)
    assert (settings.config.momentum_scale, settings.config.momentum_beta) == (0.1, 0.4)
    assert settings.concept_maps is False


def test_dict_disabled_or_without_concepts_does_nothing():
    assert parse(api_args({"enabled": False, "concepts": [{"prompt": "x"}]})).config is None
    assert parse(api_args({"concepts": []})).config is None
    assert parse(api_args({})).config is None


def test_dict_preset_fills_in_first_and_explicit_keys_win():
    preset = BUILTIN_PRESETS["Safety: strong"].config
    only_preset = parse(api_args({"preset": "Safety: strong"})).config
    assert only_preset == preset
    tuned = parse(api_args({"preset": "Safety: strong", "momentum_beta": 0.2})).config
    assert tuned.concepts == preset.concepts and tuned.momentum_beta == 0.2
    assert tuned.momentum_scale == preset.momentum_scale
    replaced = parse(api_args({"preset": "Safety: strong",
                               "concepts": [{"prompt": "cats", "reverse": True}]})).config
    assert [c.prompt for c in replaced.concepts] == ["cats"]
    assert replaced.momentum_scale == preset.momentum_scale


@pytest.mark.parametrize("data, message", [
    ({"concept": []}, r"unknown key 'concept'"),
    ({"concepts": [{"prompt": "x", "scal": 3}]}, r"concepts\[0\] \('x'\): unknown key 'scal'"),
    ({"concepts": [{"prompt": "x", "scale": "5"}]},
     r"concepts\[0\] \('x'\): scale must be a finite number, got '5'"),
    ({"concepts": [{"prompt": "x"}, {"prompt": "y", "threshold": 1.5}]},
     r"concepts\[1\] \('y'\): threshold must be a number in \[0, 1\], got 1.5"),
    ({"concepts": [{"prompt": "x", "warmup": -1}]}, r"concepts\[0\] \('x'\): warmup must be"),
    ({"concepts": [{"prompt": "x", "cooldown": "never"}]}, r"cooldown must be None"),
    ({"concepts": [{"prompt": "x", "reverse": "yes"}]}, r"reverse must be True or False"),
    ({"concepts": [{"prompt": "x"}, {"prompt": ""}]}, r"concepts\[1\] \(''\): prompt is empty"),
    ({"concepts": [{"prompt": "   "}]}, r"concepts\[0\] \('   '\): prompt is empty"),
    ({"concepts": [{"scale": 2}]}, r"concepts\[0\]: the key 'prompt' is required"),
    ({"concepts": ["glasses"]}, r"concepts\[0\] must be an object"),
    ({"concepts": "glasses"}, r"concepts must be a list"),
    ({"concepts": [{"prompt": str(i)} for i in range(11)]}, r"at most 10 concepts"),
    ({"enabled": "true"}, r"enabled must be true or false"),
    ({"concept_maps": 1, "concepts": [{"prompt": "x"}]}, r"concept_maps must be true or false"),
    ({"momentum_beta": 2, "concepts": [{"prompt": "x"}]}, r"momentum_beta must be a number in"),
    ({"momentum_scale": float("nan"), "concepts": [{"prompt": "x"}]}, r"momentum_scale must be"),
    ({"preset": "Safety: extreme"}, r"unknown preset 'Safety: extreme'; known presets: "),
])
def test_dict_errors_name_what_is_wrong(data, message):
    with pytest.raises(ValueError, match=message):
        parse(api_args(data))


# -- X/Y/Z overrides ----------------------------------------------------------------------------

def test_an_axis_value_overrides_the_ui_value_for_that_cell_only():
    args = script_args([{"prompt": "glasses", "scale": 5}, {"prompt": "hat"}])
    cell = parse(args, {(0, "scale"): 9.0, (1, "threshold"): 0.5, "momentum_beta": 0.7}).config
    assert cell.concepts[0].scale == 9 and cell.concepts[1].threshold == 0.5
    assert cell.momentum_beta == 0.7
    assert parse(args).config.concepts[0].scale == 5  # the arguments themselves are untouched


def test_axis_prompt_switches_its_slot_on_and_enabled_axis_switches_guidance():
    args = script_args([{"prompt": "glasses"}], enabled=False)
    assert parse(args).config is None
    cell = parse(args, {"enabled": "True", (2, "prompt"): "a hat, red"}).config
    assert [c.prompt for c in cell.concepts] == ["glasses", "a hat, red"]
    assert parse(script_args([{"prompt": "glasses"}]), {"enabled": "False"}).config is None


def test_axis_cooldown_never_direction_and_warmup():
    args = script_args([{"prompt": "glasses", "cooldown": 12}])
    assert parse(args, {(0, "cooldown"): "never"}).config.concepts[0].cooldown is None
    assert parse(args, {(0, "cooldown"): "20"}).config.concepts[0].cooldown == 20
    assert parse(args, {(0, "direction"): "remove"}).config.concepts[0].reverse is True
    assert parse(args, {(0, "warmup"): 3}).config.concepts[0].warmup == 3


def test_axis_preset_first_then_single_fields():
    args = script_args([{"prompt": "glasses"}, {"prompt": "hat"}, {"prompt": "tie"}])
    preset = BUILTIN_PRESETS["Style transfer"].config
    cell = parse(args, {"preset": "Style transfer"}).config
    assert cell == preset  # the preset replaces every slot
    tuned = parse(args, {"preset": "Style transfer", (0, "warmup"): 4}).config
    assert tuned.concepts[0].warmup == 4 and tuned.concepts[0].prompt == preset.concepts[0].prompt


def test_axis_values_on_top_of_the_dict_form():
    cell = parse(api_args(ISSUE_EXAMPLE), {(0, "scale"): 2.5}).config
    assert cell.concepts[0].scale == 2.5 and cell.concepts[0].prompt == "glasses"


@pytest.mark.parametrize("overrides, message", [
    ({(0, "direction"): "up"}, r"concept 1 direction must be 'add' or 'remove', got 'up'"),
    ({(0, "cooldown"): "soon"}, r"concept 1 cooldown must be 'never' or an integer"),
    ({(0, "threshold"): 3.0}, r"concept 1 \('glasses'\): threshold must be a number in"),
    ({"enabled": "maybe"}, r"enabled must be True or False"),
    ({"preset": "nope"}, r"unknown preset 'nope'"),
])
def test_bad_axis_values_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        parse(script_args([{"prompt": "glasses"}]), overrides)


# -- Safe Latent Diffusion -----------------------------------------------------------------------

SLD_TEXT = ("an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, "
            "sexual, nudity, bodily fluids, blood, obscene gestures, illegal activity, drug use, "
            "theft, vandalism, weapons, child abuse, brutality, cruelty")


def test_sld_positional_part_after_concept_maps():
    # arguments 85-92 of the README: on/off, configuration, concept, five numbers
    base = [True, 0.1, 0.4] + [True, "", "add", 5, 0.9, 10, -1, 1] * 10 + [False]
    settings = parse(base + [True, "strong", "weapons", 1, 2, 3, 4, 0.5])
    assert settings.config is None
    assert (settings.safety.concept, settings.safety.scale, settings.safety.threshold,
            settings.safety.warmup, settings.safety.momentum_scale,
            settings.safety.momentum_beta) == ("weapons", 2000, 0.025, 7, 0.5, 0.7)
    custom = parse(base + [True, "custom", "weapons", 1500, 0.02, 8, 0.3, 0.4]).safety
    assert (custom.scale, custom.threshold, custom.warmup) == (1500, 0.02, 8)
    assert parse(base + [False, "strong", "weapons"]).safety is None  # SLD off
    assert parse([False] + base[1:] + [True, "strong"]).safety is None  # guidance off
    assert parse(base).safety is None  # the 84-argument layout: SLD off
    assert parse(base + [True]).safety.concept == SLD_TEXT  # trailing defaults: medium


@pytest.mark.parametrize("sld, message", [
    ([True, "mild"], "Safe Latent Diffusion: configuration must be one of weak, medium, "
                     "strong, max, custom, got 'mild'"),
    ([True, "medium", "  "], "Safe Latent Diffusion: the safety concept is empty"),
    ([True, "custom", "x", -5], "Safe Latent Diffusion: scale must be a finite number >= 0, "
                                "got -5"),
    ([True, "custom", "x", 5, 0.1, 1.5], "Safe Latent Diffusion: warmup must be an integer"),
    ([True, "custom", "x", 5, 0.1, 1, 0, 2], "Safe Latent Diffusion: momentum_beta must be a "
                                             "number in \\[0, 1\\]")])
def test_sld_positional_errors_name_the_field(sld, message):
    base = [True, 0.1, 0.4] + [True, "", "add", 5, 0.9, 10, -1, 1] * 10 + [False]
    with pytest.raises(ValueError, match=message):
        parse(base + sld)


def test_sld_dict_form():
    strong = parse(api_args({"safety": {"config": "strong"}})).safety
    assert (strong.scale, strong.warmup, strong.concept) == (2000, 7, SLD_TEXT)
    assert parse(api_args({"safety": "max"})).safety.scale == 5000
    assert parse(api_args({"safety": {}})).safety.scale == 1000  # medium, SLD's default
    tuned = parse(api_args({"safety": {"config": "strong", "warmup": 3, "concept": "gore"}}))
    assert (tuned.safety.scale, tuned.safety.warmup, tuned.safety.concept) == (2000, 3, "gore")
    assert parse(api_args({"safety": {"enabled": False}})).safety is None
    both = parse(api_args({"concepts": [{"prompt": "hat"}], "safety": "weak"}))
    assert both.config.concepts[0].prompt == "hat" and both.safety.scale == 20
    assert parse(api_args({"enabled": False, "safety": "weak"})).safety is None


@pytest.mark.parametrize("safety, message", [
    ({"beta": 0.4}, "unknown key 'beta' in safety; allowed keys are enabled, config, concept, "
                    "scale, threshold, warmup, momentum_scale, momentum_beta"),
    ({"config": "mild"}, "safety: config must be one of weak, medium, strong, max, custom"),
    ({"config": "custom", "scale": 30}, "safety: a custom config needs every number; "
                                        "'threshold' is missing"),
    ({"scale": "5"}, "safety: scale must be a finite number >= 0, got '5'"),
    ({"concept": ""}, "safety: concept is empty"),
    ({"enabled": "yes"}, "safety: enabled must be true or false"),
    (5, "safety must be an object")])
def test_sld_dict_errors_name_what_is_wrong(safety, message):
    with pytest.raises(ValueError, match=message):
        parse(api_args({"safety": safety}))


def test_sld_axes_switch_sld_on_and_numbers_make_it_custom():
    args = script_args([{"prompt": "glasses"}])
    assert parse(args, {"sld_config": "max"}).safety.scale == 5000
    cell = parse(args, {"sld_config": "weak", "sld_warmup": 3}).safety
    assert (cell.scale, cell.warmup, cell.preset_name) == (20, 3, "custom")
    assert parse(args, {"sld_momentum_beta": 0.9}).safety.momentum_beta == 0.9
    on_dict = parse(api_args({"concepts": [{"prompt": "hat"}], "safety": "strong"}),
                    {"sld_scale": 10})
    assert on_dict.safety.scale == 10 and on_dict.safety.warmup == 7
    with pytest.raises(ValueError, match="SLD configuration must be one of"):
        parse(args, {"sld_config": "extreme"})
