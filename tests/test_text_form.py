"""The text form written into image parameters: exact round trips, clear errors."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldg_core import MAX_CONCEPTS, Concept, GuidanceConfig, from_text, to_text

finite = st.floats(allow_nan=False, allow_infinity=False)
unit = st.floats(min_value=0.0, max_value=1.0)
steps = st.integers(min_value=0, max_value=10_000)
prompts = st.text(min_size=1).filter(str.strip) | st.sampled_from([
    "smiling, smile", '"quoted" text', "a: b; c", "(word:1.3)", "[a:b:5]", "line\nbreak",
    "tab\there", "emoji 😀 ü ß", "back\\slash", "add \"x\" scale=5; momentum=1 beta=0",
    "u2028\u2028 nel\x85 sep\u2029"])
concepts = st.builds(Concept, prompt=prompts, scale=finite, threshold=unit, warmup=steps,
                     cooldown=st.none() | steps, weight=finite, reverse=st.booleans())
configs = st.builds(GuidanceConfig, concepts=st.lists(concepts, max_size=MAX_CONCEPTS),
                    momentum_scale=finite, momentum_beta=unit)


@settings(max_examples=300)
@given(configs)
def test_text_form_round_trips_exactly(config):
    text = to_text(config)
    assert from_text(text) == config
    # Image parameters are read line by line: nothing may break the line.
    assert text.splitlines() == [text]


@settings(max_examples=200)
@given(configs)
def test_dict_form_round_trips_through_json(config):
    assert GuidanceConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_text_form_reads_like_the_settings():
    config = GuidanceConfig(concepts=[
        Concept(prompt="smiling, smile"),
        Concept(prompt="glasses", reverse=True, scale=3.5, threshold=0.95, warmup=5,
                cooldown=30, weight=2.0)], momentum_scale=0.1, momentum_beta=0.4)
    assert to_text(config) == (
        'add "smiling, smile" scale=5 threshold=0.9 warmup=10 weight=1; '
        'remove "glasses" scale=3.5 threshold=0.95 warmup=5 cooldown=30 weight=2; '
        'momentum=0.1 beta=0.4')
    assert to_text(GuidanceConfig()) == "momentum=0.1 beta=0.4"


GOOD = 'add "cat" scale=5 threshold=0.9 warmup=10 weight=1; momentum=0.1 beta=0.4'


@pytest.mark.parametrize("text, message", [
    ("", "the text is empty"),
    ('add "cat" scale=5 threshold=0.9 warmup=10 weight=1', "ends without its 'momentum=<number>"),
    ("momentum=0.1", "the last clause must be 'momentum"),
    ("momentum=0.1 beta=0.4 extra=1", "unexpected 'extra=1' at position 22"),
    ("momentum=0.1 beta=0.4 beta=0.5", "beta is given twice"),
    ("momentum=fast beta=0.4", "momentum must be a number, got 'fast'"),
    ("momentum=1_0 beta=0.4", "momentum must be a number, got '1_0'"),
    (GOOD.replace("warmup=10", "warmup=\u0661\u0660"), "warmup must be a number"),
    (GOOD.replace("scale=5", "scale=\uff15"), "scale must be a number"),
    (GOOD.replace("warmup=10", "warmup=" + "9" * 400), "warmup must be an integer >= 0"),
    ('add "cat scale=5; momentum=0.1 beta=0.4', "bad quoted prompt at position 4"),
    ('add cat scale=5; momentum=0.1 beta=0.4', r"concept 0: expected a quoted prompt after 'add'"),
    ('grow "cat" scale=5; momentum=0.1 beta=0.4', "clause 1 .* must start with 'add' or 'remove'"),
    ('; momentum=0.1 beta=0.4', "clause 1 .* must start with 'add' or 'remove'"),
    (GOOD.replace("scale=5 ", ""), r"concept 0 \('cat'\): scale is missing"),
    (GOOD.replace("warmup=10", "warmup=10.5"), r"concept 0 \('cat'\): warmup must be an integer"),
    (GOOD.replace("warmup=10", "warmup=+10"), r"warmup must be a number, got '\+10'"),
    (GOOD.replace("threshold=0.9", "threshold=1.9"),
     r"concept 0 \('cat'\): threshold must be a number in \[0, 1\], got 1.9"),
    (GOOD.replace("scale=5", "scale=nan"), r"scale must be a finite number, got nan"),
    (GOOD.replace("weight=1", "weight=1 colour=red"), "unexpected 'colour=red'"),
    (GOOD.replace("weight=1", "weight=1 weight=2"), "weight is given twice"),
    (GOOD.replace("momentum=0.1", "momentum=0.1 momentum=0.2"), "momentum is given twice"),
    ("; ".join(['add "c" scale=1 threshold=0 warmup=0 weight=1'] * 11) + "; momentum=0 beta=0",
     "at most 10 concepts"),
])
def test_malformed_text_gives_a_clear_error(text, message):
    with pytest.raises(ValueError, match=message):
        from_text(text)


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from(list('addremove "=;.0123456789 scalewmupt\n')),
               max_size=80) | st.text(max_size=40))
def test_arbitrary_text_never_crashes(text):
    try:
        config = from_text(text)
    except ValueError as error:
        assert str(error).startswith("Latent Diffusion Guidance settings")
    else:
        assert from_text(to_text(config)) == config


@settings(max_examples=300)
@given(configs, st.data())
def test_damaged_text_is_refused_or_read_faithfully(config, data):
    text = to_text(config)
    position = data.draw(st.integers(0, len(text) - 1))
    damaged = text[:position] + text[position + 1:]
    try:
        parsed = from_text(damaged)
    except ValueError:
        return
    # If it parses, it parses as what the damaged text says, which writes back the same way
    # up to how numbers are spelled.
    assert from_text(to_text(parsed)) == parsed


# -- Safe Latent Diffusion's parameter -----------------------------------------------------------

def test_safety_text_round_trips_and_names_the_configuration():
    from ldg_core import SafetyConfig
    from ldg_core.text_form import safety_from_text, safety_to_text
    cases = {SafetyConfig.preset("medium"): "medium",
             SafetyConfig.preset("max", 'a "b", c\nd'): 'max "a \\"b\\", c\\nd"',
             SafetyConfig(concept="x", scale=1500, warmup=3):
                 'custom "x" scale=1500 threshold=0.01 warmup=3 momentum=0.3 beta=0.4',
             SafetyConfig(scale=20.0, threshold=0.0, warmup=15, momentum_scale=0.0,
                          momentum_beta=0.0): "weak"}
    for config, text in cases.items():
        assert safety_to_text(config) == text
        assert safety_from_text(text) == config


@pytest.mark.parametrize("text, message", [
    ("", "must start with one of weak, medium, strong, max, custom"),
    ("medium scale=3", "numbers follow 'custom' only"),
    ("custom scale=2", "threshold is missing"),
    ('custom "x" scale=2 threshold=1 warmup=-1 momentum=0 beta=0', "warmup must be an integer"),
    ('strong "unterminated', "bad quoted prompt")])
def test_bad_safety_text_says_what_is_wrong(text, message):
    from ldg_core.text_form import safety_from_text
    with pytest.raises(ValueError, match="Safe Latent Diffusion settings .*" + message):
        safety_from_text(text)
