"""Validation of Concept and GuidanceConfig, their defaults and the dict (API) form."""

import inspect
import json
import math

import numpy as np
import pytest

from ldg_core import MAX_CONCEPTS, Concept, GuidanceConfig


def test_defaults_are_the_reference_pipelines():
    from diffusers import SemanticStableDiffusionPipeline

    reference = inspect.signature(SemanticStableDiffusionPipeline.__call__).parameters
    concept, config = Concept(prompt="x"), GuidanceConfig()
    assert concept.scale == reference["edit_guidance_scale"].default
    assert concept.threshold == reference["edit_threshold"].default
    assert concept.warmup == reference["edit_warmup_steps"].default
    assert concept.cooldown == reference["edit_cooldown_steps"].default
    assert concept.reverse == reference["reverse_editing_direction"].default
    assert concept.weight == 1.0  # the reference's edit_weights=None means 1.0 per concept
    assert config.momentum_scale == reference["edit_momentum_scale"].default
    assert config.momentum_beta == reference["edit_mom_beta"].default
    assert config.concepts == ()


ACCEPTED = [
    {"prompt": "smiling, smile", "scale": 5.0, "threshold": 0.9, "warmup": 10, "cooldown": None,
     "weight": 1.0, "reverse": False},
    {"prompt": "x", "scale": -7, "weight": -2.5, "threshold": 0, "warmup": 0, "cooldown": 0},
    {"prompt": "x", "threshold": 1, "warmup": 10.0, "cooldown": 3.0, "reverse": True},
    {"prompt": "x", "scale": np.float32(2.5), "warmup": np.int64(4), "threshold": np.float64(0.5)},
    {"prompt": "x", "warmup": 20, "cooldown": 5},  # a cooldown before the warmup is valid
    {"prompt": " "},  # any non-empty string; the UI treats blank slots as unused instead
]


@pytest.mark.parametrize("fields", ACCEPTED)
def test_valid_concepts_are_accepted_and_normalised(fields):
    concept = Concept(**fields)
    assert isinstance(concept.warmup, int) and isinstance(concept.scale, float)
    assert concept.cooldown is None or isinstance(concept.cooldown, int)
    for key, value in fields.items():
        assert getattr(concept, key) == value


REJECTED = [
    ({"prompt": ""}, "prompt", "non-empty string"),
    ({"prompt": None}, "prompt", "None"),
    ({"prompt": "x", "scale": math.nan}, "scale", "finite number, got nan"),
    ({"prompt": "x", "scale": math.inf}, "scale", "got inf"),
    ({"prompt": "x", "scale": "5"}, "scale", r"got '5' \(str\)"),
    ({"prompt": "x", "scale": True}, "scale", r"got True \(bool\)"),
    ({"prompt": "x", "weight": -math.inf}, "weight", "finite number"),
    ({"prompt": "x", "threshold": 1.0001}, "threshold", r"in \[0, 1\], got 1.0001"),
    ({"prompt": "x", "threshold": -0.1}, "threshold", r"in \[0, 1\]"),
    ({"prompt": "x", "threshold": math.nan}, "threshold", r"in \[0, 1\], got nan"),
    ({"prompt": "x", "warmup": -1}, "warmup", "integer >= 0, got -1"),
    ({"prompt": "x", "warmup": 2.5}, "warmup", "got 2.5"),
    ({"prompt": "x", "warmup": None}, "warmup", "got None"),
    ({"prompt": "x", "warmup": math.inf}, "warmup", "got inf"),
    ({"prompt": "x", "cooldown": -3}, "cooldown", r"None \(never\) or an integer >= 0, got -3"),
    ({"prompt": "x", "cooldown": 1.5}, "cooldown", "got 1.5"),
    ({"prompt": "x", "reverse": "yes"}, "reverse", "True or False, got 'yes'"),
    ({"prompt": "x", "scale": 10 ** 400}, "scale", "finite number, got 1000"),
    ({"prompt": "x", "warmup": 10 ** 400}, "warmup", "integer >= 0, got 1000"),
    ({"prompt": "x", "threshold": 10 ** 400}, "threshold", r"in \[0, 1\]"),
]


@pytest.mark.parametrize("fields, field, detail", REJECTED)
def test_bad_concepts_name_field_value_and_range(fields, field, detail):
    with pytest.raises(ValueError, match=f"^{field} must be .*{detail}"):
        Concept(**fields)


@pytest.mark.parametrize("settings, message", [
    ({"momentum_scale": math.nan}, "momentum_scale must be a finite number, got nan"),
    ({"momentum_beta": 1.5}, r"momentum_beta must be a number in \[0, 1\], got 1.5"),
    ({"momentum_beta": -0.0001}, r"momentum_beta must be a number in \[0, 1\]"),
    ({"concepts": "smiling"}, "concepts must be a list of Concept"),
    ({"concepts": [Concept(prompt="x")] * (MAX_CONCEPTS + 1)},
     f"at most {MAX_CONCEPTS} concepts are supported, got {MAX_CONCEPTS + 1}"),
    ({"concepts": [Concept(prompt="ok"), {"prompt": "smiling", "threshold": 2}]},
     r"^concept 1 \('smiling'\): threshold must be a number in \[0, 1\], got 2"),
    ({"concepts": [{"prompt": "a", "warmup": -1}]}, r"^concept 0 \('a'\): warmup must be"),
    ({"concepts": [{"scale": 3}]}, r"^concept 0: the key 'prompt' is required"),
    ({"concepts": [42]}, r"^concept 0: must be a Concept or a dict, got 42"),
])
def test_bad_configs_are_refused_with_the_concept_named(settings, message):
    with pytest.raises(ValueError, match=message):
        GuidanceConfig(**settings)


def test_ten_concepts_are_allowed_and_the_config_is_frozen():
    config = GuidanceConfig(concepts=[Concept(prompt=str(i)) for i in range(MAX_CONCEPTS)],
                            momentum_scale=-0.5, momentum_beta=1)
    assert MAX_CONCEPTS >= 10 and len(config.concepts) == MAX_CONCEPTS
    assert isinstance(config.concepts, tuple)
    with pytest.raises(AttributeError):
        config.concepts[0].scale = 3.0


def test_dict_form_round_trips_through_json_with_defaults_filled_in():
    config = GuidanceConfig.from_dict(json.loads(
        '{"concepts": [{"prompt": "glasses", "reverse": true, "cooldown": 20}], '
        '"momentum_beta": 0.5}'))
    assert config == GuidanceConfig(concepts=[Concept(prompt="glasses", reverse=True,
                                                      cooldown=20)], momentum_beta=0.5)
    assert GuidanceConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("data, message", [
    ({"concept": []}, r"unknown key 'concept'; allowed keys are concepts, momentum_scale"),
    ({"concepts": [{"prompt": "a", "strength": 2}]}, r"concept 0 \('a'\): unknown key 'strength'"),
    ({"concepts": [{"prompt": "a", "scale": "high"}]}, r"scale must be a finite number, got 'high'"),
    ({"concepts": [{"prompt": "a", "reverse": "true"}]}, "reverse must be True or False"),
    ({"momentum_scale": None}, "momentum_scale must be a finite number, got None"),
    ({"momentum_scale": 10 ** 400}, "momentum_scale must be a finite number"),
    ([], r"expected a JSON object \(dict\), got \[\]"),
])
def test_dict_form_errors_name_the_key(data, message):
    with pytest.raises(ValueError, match=message):
        GuidanceConfig.from_dict(data)
