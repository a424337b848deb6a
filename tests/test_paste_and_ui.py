"""The script's UI wiring in the WebUI double: image parameters written by process() go through
the WebUI's own infotext writer and parser (tests/webui_double/modules/infotext_utils.py,
mirrored with line numbers) and paste back into the same fields; presets fill the slots; the
Settings option and the X/Y/Z axes are registered; X/Y/Z cells write what they used."""
import copy
import json
import logging
from types import SimpleNamespace

import pytest

from tests import webui_harness as h
from tests.webui_double.model import TinySD
from ldg_core.presets import BUILTIN_PRESETS
from ldg_core import SafetyConfig
from ldg_core.ui_args import KEEP_IMAGE, SAFETY_END, SAFETY_START, SLOTS_END, default_args
from modules import infotext_utils, paths_internal, script_callbacks, scripts, shared

KEY = "Latent Diffusion Guidance"


@pytest.fixture(autouse=True)
def webui_state(tmp_path, monkeypatch):
    shared.opts = shared.default_opts()
    shared.sd_model = TinySD()
    monkeypatch.setattr(paths_internal, "data_path", str(tmp_path))
    yield


def build_ui(is_img2img=False):
    script = h.SCRIPT_MODULE.LatentDiffusionGuidanceScript()
    components = script.ui(is_img2img)
    return script, components


def image_parameters(args, other_params=None):
    """process() on a processing object, then the WebUI's writer: the infotext of image 0."""
    p = SimpleNamespace(extra_generation_params=dict(other_params or {}), sample=None,
                        sampler_name="Euler", enable_hr=False)
    script = h.SCRIPT_MODULE.LatentDiffusionGuidanceScript()
    script.process(p, *args)
    params = {"Steps": 20, "Sampler": "Euler", "CFG scale": 7, "Seed": 1, "Size": "512x512",
              **p.extra_generation_params}
    return p, infotext_utils.create_infotext("a photo, of a cat", "blurry", params)


def pasted(script, components, infotext):
    """The values the paste leaves in each argument component (None: left unchanged)."""
    params = infotext_utils.parse_generation_parameters(infotext)
    updates = infotext_utils.paste(script.infotext_fields, params)
    by_component = {id(c): u for (c, _), u in zip(script.infotext_fields, updates)}
    values = [by_component[id(c)].get("value") if id(c) in by_component else None
              for c in components]
    return values, updates


def settings_and_safety(args):
    """What the Save preset button sends: momentum, slots, then Safe Latent Diffusion's part."""
    return args[1:SLOTS_END] + args[SAFETY_START:SAFETY_END]


def set_values(components, values):
    for component, value in zip(components, values):
        component.value = value


ROUND_TRIP_CONCEPTS = [
    {"prompt": "smiling, smile", "scale": 4.5, "threshold": 0.95, "warmup": 7},
    {"prompt": 'a sign saying "STOP: now"', "direction": "remove", "cooldown": 30, "weight": 2},
    {"prompt": "(glasses:1.3), [red:blue:5]\nBREAK line two", "threshold": 0.0},
    {"prompt": "草原の猫 \u2028 Ünïcode", "scale": -2.5, "warmup": 0},
    {"prompt": "{json: [1, 2]}, key: value, Steps: 3", "weight": 0.25},
]


@pytest.mark.parametrize("count", [1, 3, 5])
def test_paste_round_trip_through_the_webui_writer_and_parser(count):
    args = h.script_args(ROUND_TRIP_CONCEPTS[:count], momentum_scale=0.25, momentum_beta=0.6)
    p, infotext = image_parameters(args)
    script, components = build_ui()
    set_values(components, h.script_args([], enabled=False))  # a fresh UI
    values, _ = pasted(script, components, infotext)
    expected = list(args)
    expected[SLOTS_END] = None  # "Show where each concept acted" is not an image parameter
    expected[SAFETY_START + 1:SAFETY_END] = [None] * (SAFETY_END - SAFETY_START - 1)  # SLD off
    expected[KEEP_IMAGE] = False  # no inversion key: "Keep the image" off
    assert values == expected


def test_paste_shows_slots_beyond_the_settings_count():
    shared.opts.data["ldg_visible_slots"] = 2
    args = h.script_args(ROUND_TRIP_CONCEPTS[:4])
    _, infotext = image_parameters(args)
    script, components = build_ui()
    groups = [c for c, _ in script.infotext_fields[len(components) - 1:]]
    assert [g.visible for g in groups] == [True, True] + [False] * 8
    _, updates = pasted(script, components, infotext)
    group_updates = updates[len(components) - 1:]
    assert [u.get("visible") for u in group_updates] == [True] * 4 + [None] * 6


def test_other_extensions_parameters_survive_writing_and_pasting():
    other = {"ControlNet 0": "Module: canny, Model: control_canny, Weight: 1",
             "Dynamic thresholding enabled": True}
    p, infotext = image_parameters(h.script_args([{"prompt": "glasses"}]), other)
    for key, value in other.items():
        assert p.extra_generation_params[key] == value
    params = infotext_utils.parse_generation_parameters(infotext)
    assert params["ControlNet 0"] == other["ControlNet 0"]
    assert params[KEY] == 'add "glasses" scale=5 threshold=0.9 warmup=10 weight=1; momentum=0.1 beta=0.4'


def test_parameters_of_an_image_made_without_the_extension_paste_as_disabled():
    _, infotext = image_parameters(h.script_args([{"prompt": "glasses"}], enabled=False))
    assert KEY not in infotext
    script, components = build_ui()
    set_values(components, h.script_args([{"prompt": "hat"}]))
    values, _ = pasted(script, components, infotext)
    assert values[0] is False and values[SAFETY_START] is False and values[KEEP_IMAGE] is False
    del values[KEEP_IMAGE], values[SAFETY_START]
    assert values[1:] == [None] * (len(components) - 3)  # the rest as it was


def test_a_malformed_value_leaves_the_fields_and_warns_once(caplog):
    infotext = 'a cat\nSteps: 20, Sampler: Euler, Latent Diffusion Guidance: "add \\"x\\" scale=five"'
    script, components = build_ui()
    with caplog.at_level(logging.WARNING, logger="latent_diffusion_guidance"):
        values, updates = pasted(script, components, infotext)
    assert values == [None] * len(components)
    assert all(u == {"__type__": "update"} for u in updates)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "scale" in warnings[0].getMessage() and "left as they were" in warnings[0].getMessage()


def test_process_updates_extra_generation_params_and_disabled_writes_nothing():
    p, _ = image_parameters(h.script_args([{"prompt": "glasses"}], enabled=False),
                            {"Other": "kept"})
    assert p.extra_generation_params == {"Other": "kept"}


# -- presets in the UI -------------------------------------------------------------------------

def event(component, name):
    return next(e for e in component.events if e[0] == name)


@pytest.fixture
def recording_blocks(monkeypatch):
    """Records every block the ui() builds (the double's gradio has no Blocks tree)."""
    import gradio as gr
    made = []
    original = gr._Block.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)
    monkeypatch.setattr(gr._Block, "__init__", init)
    return made


def test_picking_a_preset_fills_the_slots(recording_blocks):
    script, components = build_ui()
    dropdown = next(b for b in recording_blocks if b.kwargs.get("label") == "Preset")
    assert list(BUILTIN_PRESETS) == dropdown.kwargs["choices"][:len(BUILTIN_PRESETS)]
    _, fill, inputs, outputs = event(dropdown, "change")
    updates = fill("Realistic photography")
    by_output = {id(o): u for o, u in zip(outputs, updates)}
    slot = lambda n, field: components[3 + n * 8 + h.SLOT_FIELDS.index(field)]  # noqa: E731
    value = lambda c: by_output[id(c)]["value"]  # noqa: E731
    assert value(slot(0, "prompt")).startswith("professional photograph")
    assert value(slot(1, "direction")) == "remove"
    assert value(slot(2, "prompt")) == ""  # slots past the preset's concepts are cleared
    assert value(components[2]) == 0.4 and id(components[0]) not in by_output


def test_user_presets_are_saved_outside_the_extension_and_offered(recording_blocks, tmp_path):
    script, components = build_ui()
    save = next(b for b in recording_blocks if b.args[:1] == ("Save preset",))
    _, store, inputs, outputs = event(save, "click")
    values = settings_and_safety(h.script_args([{"prompt": "neon lights", "scale": 6}]))
    dropdown_update, message = store("My neon", *values)
    assert dropdown_update["value"] == "My neon" and "My neon" in dropdown_update["choices"]
    saved = json.loads((tmp_path / "latent_diffusion_guidance_presets.json").read_text())
    assert saved["presets"]["My neon"]["concepts"][0]["prompt"] == "neon lights"
    _, refused = store("Style transfer", *values)
    assert refused.startswith("Not saved") and "built-in" in refused
    _, empty = store("Nothing", *settings_and_safety(h.script_args([])))
    assert empty.startswith("Not saved")


# -- Settings and X/Y/Z -------------------------------------------------------------------------

def test_settings_option_for_the_slot_count():
    (settings,) = [c.callback for c in script_callbacks.callbacks["ui_settings"]
                   if c.callback.__module__ == "latent_diffusion_guidance"][-1:]
    settings()
    info = shared.opts.data_labels["ldg_visible_slots"]
    assert info.default == 3 and info.component_args == {"minimum": 1, "maximum": 10, "step": 1}
    assert info.section == ("latent_diffusion_guidance", "Latent Diffusion Guidance")


class _Axis:
    def __init__(self, label, type, apply, **kwargs):
        self.label, self.type, self.apply, self.kwargs = label, type, apply, kwargs


def test_xyz_axes_and_a_cell_writes_what_it_used(monkeypatch):
    xyz = SimpleNamespace(AxisOption=_Axis, axis_options=[])
    monkeypatch.setattr(scripts, "scripts_data", [SimpleNamespace(
        script_class=type("Script", (), {"__module__": "xyz_grid.py"}), module=xyz)])
    h.SCRIPT_MODULE.add_xyz_axes()
    h.SCRIPT_MODULE.add_xyz_axes()  # a UI reload adds nothing twice
    labels = [o.label for o in xyz.axis_options]
    assert labels[:4] == ["[LDG] Enabled", "[LDG] Momentum scale", "[LDG] Momentum beta",
                          "[LDG] Preset"]
    assert labels[4:10] == ["[LDG] SLD configuration", "[LDG] SLD scale", "[LDG] SLD threshold",
                            "[LDG] SLD warmup", "[LDG] SLD momentum scale",
                            "[LDG] SLD momentum beta"]
    assert labels[10:12] == ["[LDG] Keep the image", "[LDG] Keep the image mask"]
    assert [o.kwargs["choices"]() for o in xyz.axis_options[10:12]] == [
        ["True", "False"], ["noise", "attention", "both"]]
    assert len(labels) == 4 + 6 + 2 + 3 * 7  # three slots shown by default, seven fields each
    axis = {o.label: o for o in xyz.axis_options}

    # The grid's cells are shallow copies of one processing object (xyz_grid.py L711).
    base = SimpleNamespace(extra_generation_params={"Other": "kept"}, sampler_name="Euler",
                           enable_hr=False, sample=None)
    args = h.script_args([{"prompt": "glasses", "scale": 5}])
    written = []
    for scale, enabled in [(2.0, "True"), (8.0, "True"), (8.0, "False")]:
        cell = copy.copy(base)
        axis["[LDG] Concept 1 scale"].apply(cell, scale, [])
        axis["[LDG] Enabled"].apply(cell, enabled, [])
        h.SCRIPT_MODULE.LatentDiffusionGuidanceScript().process(cell, *args)
        written.append(dict(cell.extra_generation_params))
    assert written[0][KEY].startswith('add "glasses" scale=2 ')
    assert written[1][KEY].startswith('add "glasses" scale=8 ')
    assert KEY not in written[2] and written[2]["Other"] == "kept"
    assert not hasattr(base, h.SCRIPT_MODULE.XYZ_ATTRIBUTE)  # the original is untouched


# -- the HTTP API's dict form, end to end in the double ----------------------------------------

def test_api_dict_generates_like_the_same_positional_arguments():
    p_kwargs = {"sampler_name": "Euler", "steps": 5}
    data = {"concepts": [{"prompt": "glasses", "scale": 30, "threshold": 0.8, "warmup": 1},
                         {"prompt": "hat", "reverse": True, "scale": 20, "warmup": 0,
                          "cooldown": 3}],
            "momentum_scale": 0.2}
    positional = h.script_args([{"prompt": "glasses", "scale": 30, "threshold": 0.8, "warmup": 1},
                                {"prompt": "hat", "direction": "remove", "scale": 20,
                                 "warmup": 0, "cooldown": 3}], momentum_scale=0.2)
    p_dict, by_dict = h.generate(p_kwargs, [data] + h.script_args(enabled=False)[1:])
    p_pos, by_position = h.generate(p_kwargs, positional)
    assert h.torch.equal(by_dict, by_position)
    assert p_dict.extra_generation_params[KEY] == p_pos.extra_generation_params[KEY]


def test_a_bad_api_dict_stops_the_generation_with_a_message_naming_it():
    data = {"concepts": [{"prompt": "glasses"}, {"prompt": "hat", "threshold": 2}]}
    with pytest.raises(ValueError, match=r"Latent Diffusion Guidance: concepts\[1\] \('hat'\): "
                                         r"threshold must be a number in \[0, 1\], got 2"):
        h.generate({"sampler_name": "Euler", "steps": 4},
                   [data] + h.script_args(enabled=False)[1:])


# -- Safe Latent Diffusion's part ----------------------------------------------------------------

SLD_KEY = "Safe Latent Diffusion"


@pytest.mark.parametrize("safety, written", [
    (SafetyConfig.preset("medium"), "medium"),
    (SafetyConfig.preset("strong", 'violence, "gore": blood\nline two'),
     'strong "violence, \\"gore\\": blood\\nline two"'),
    (SafetyConfig(concept="weapons", scale=1500, threshold=0.02, warmup=8),
     'custom "weapons" scale=1500 threshold=0.02 warmup=8 momentum=0.3 beta=0.4')])
@pytest.mark.parametrize("concepts", [[], ROUND_TRIP_CONCEPTS[:2]])
def test_sld_parameters_are_written_and_paste_back(safety, written, concepts):
    args = h.script_args(concepts, safety=safety)
    p, infotext = image_parameters(args)
    assert p.extra_generation_params[SLD_KEY] == written
    assert (KEY in p.extra_generation_params) == bool(concepts)
    script, components = build_ui()
    set_values(components, h.script_args([{"prompt": "hat"}], enabled=False))
    values, _ = pasted(script, components, infotext)
    expected = list(args)
    expected[SLOTS_END] = None
    assert values == expected


def test_an_image_without_sld_pastes_sld_off_and_a_bad_value_changes_nothing(caplog):
    _, infotext = image_parameters(h.script_args([{"prompt": "glasses"}]))
    script, components = build_ui()
    set_values(components, h.script_args([], safety=SafetyConfig.preset("max")))
    values, _ = pasted(script, components, infotext)
    assert values[0] is True and values[SAFETY_START] is False
    bad = 'a cat\nSteps: 20, Sampler: Euler, Safe Latent Diffusion: "custom scale=2"'
    with caplog.at_level(logging.WARNING, logger="latent_diffusion_guidance"):
        values, _ = pasted(script, components, bad)
    assert values == [None] * len(components)
    assert "threshold is missing" in caplog.records[-1].getMessage()


def test_sld_part_of_the_ui_and_its_configuration_fills_the_numbers(recording_blocks):
    script, components = build_ui()
    assert [c.value for c in components[SAFETY_START:]] == default_args()[SAFETY_START:]
    assert components[KEEP_IMAGE].kwargs["label"].startswith("Keep the image")
    config = next(b for b in recording_blocks if b.kwargs.get("label") == "Configuration")
    assert config.kwargs["choices"] == ["weak", "medium", "strong", "max", "custom"]
    _, pick, _, outputs = event(config, "change")
    assert [u["value"] for u in pick("max")] == [5000.0, 1.0, 0, 0.5, 0.7]
    assert outputs == components[SAFETY_START + 3:SAFETY_END]
    assert pick("custom") == [{"__type__": "update"}] * 5
    info = [b for b in recording_blocks if "are not SLD" in str(b.args[:1])]
    assert info, "the SLD part says that the SEGA Safety presets are not SLD"


def test_presets_carry_the_sld_part(recording_blocks, tmp_path):
    script, components = build_ui()
    save = next(b for b in recording_blocks if b.args[:1] == ("Save preset",))
    _, store, _, _ = event(save, "click")
    safety = SafetyConfig.preset("strong", "weapons")
    _, message = store("Safe neon", *settings_and_safety(
        h.script_args([{"prompt": "neon"}], safety=safety)))
    assert message == "Saved 'Safe neon'."
    _, message = store("Only SLD", *settings_and_safety(h.script_args([], safety=safety)))
    assert message == "Saved 'Only SLD'."
    saved = json.loads((tmp_path / "latent_diffusion_guidance_presets.json").read_text())
    assert saved["presets"]["Safe neon"]["safety"]["concept"] == "weapons"
    dropdown = next(b for b in recording_blocks if b.kwargs.get("label") == "Preset")
    _, fill, _, outputs = event(dropdown, "change")
    by_output = {id(o): u for o, u in zip(outputs, fill("Safe neon"))}
    assert [by_output[id(c)]["value"] for c in components[SAFETY_START:SAFETY_END]] == \
        h.script_args([], safety=safety)[SAFETY_START:SAFETY_END]
    by_output = {id(o): u for o, u in zip(outputs, fill("Style transfer"))}  # no SLD part
    assert all(by_output[id(c)] == {"__type__": "update"}
               for c in components[SAFETY_START:SAFETY_END])
    # the API's dict form and the X/Y/Z preset axis take the preset's SLD part too
    settings = h.SCRIPT_MODULE.settings_from_args([{"preset": "Only SLD"}],
                                                  h.SCRIPT_MODULE.presets())
    assert settings.safety == safety and settings.config is None


def test_sld_xyz_axes_write_what_each_cell_used(monkeypatch):
    xyz = SimpleNamespace(AxisOption=_Axis, axis_options=[])
    monkeypatch.setattr(scripts, "scripts_data", [SimpleNamespace(
        script_class=type("Script", (), {"__module__": "xyz_grid.py"}), module=xyz)])
    h.SCRIPT_MODULE.add_xyz_axes()
    axis = {o.label: o for o in xyz.axis_options}
    assert axis["[LDG] SLD configuration"].kwargs["choices"]() == [
        "weak", "medium", "strong", "max", "custom"]
    base = SimpleNamespace(extra_generation_params={}, sampler_name="Euler", enable_hr=False,
                           sample=None)
    args = h.script_args([])  # guidance on, no concept, SLD off: the axes switch SLD on
    written = []
    for name, scale in [("weak", None), ("strong", None), ("strong", 300.0)]:
        cell = copy.copy(base)
        axis["[LDG] SLD configuration"].apply(cell, name, [])
        if scale is not None:
            axis["[LDG] SLD scale"].apply(cell, scale, [])
        h.SCRIPT_MODULE.LatentDiffusionGuidanceScript().process(cell, *args)
        written.append(cell.extra_generation_params[SLD_KEY])
    assert written == ["weak", "strong", "custom scale=300 threshold=0.025 warmup=7 "
                                         "momentum=0.5 beta=0.7"]


def test_api_safety_key_generates_like_the_positional_sld_part():
    p_kwargs = {"sampler_name": "Euler", "steps": 5}
    safety = SafetyConfig(concept="glasses", scale=60.0, threshold=0.05, warmup=1)
    data = {"concepts": [{"prompt": "hat", "scale": 20, "warmup": 0}],
            "safety": {"concept": "glasses", "scale": 60, "threshold": 0.05, "warmup": 1}}
    positional = h.script_args([{"prompt": "hat", "scale": 20, "warmup": 0}], safety=safety)
    p_dict, by_dict = h.generate(p_kwargs, [data] + h.script_args(enabled=False)[1:])
    p_pos, by_position = h.generate(p_kwargs, positional)
    assert h.torch.equal(by_dict, by_position)
    assert p_dict.extra_generation_params[SLD_KEY] == p_pos.extra_generation_params[SLD_KEY]
    with pytest.raises(ValueError, match=r"Latent Diffusion Guidance: safety: threshold must be "
                                         r"a finite number, got 'x'"):
        h.generate(p_kwargs, [{"safety": {"threshold": "x"}}] + h.script_args(enabled=False)[1:])


def test_keep_the_image_pastes_into_img2img_and_never_into_txt2img():
    args = h.script_args([{"prompt": "glasses"}])
    _, infotext = image_parameters(args)
    infotext += ", Latent Diffusion Guidance inversion: LEDITS++"
    for is_img2img, expected in ((True, True), (False, False)):
        script, components = build_ui(is_img2img)
        values, _ = pasted(script, components, infotext)
        assert values[KEEP_IMAGE] is expected
        assert values[0] is True
