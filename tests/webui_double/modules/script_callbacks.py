"""modules/script_callbacks.py L44-90 (params), L127-147 (add_callback), L330-350 (callers:
an exception in a callback is reported and swallowed), L447-453 (remove_callbacks_for_function);
on_ui_settings (L493-496) and ui_settings_callback (L298-303), which the WebUI runs once when it
builds its Settings, after every script is loaded."""
from dataclasses import dataclass

callbacks = {"cfg_denoiser": [], "cfg_denoised": [], "cfg_after_cfg": [], "ui_settings": [],
             "before_ui": []}
reported = []  # exceptions the WebUI would have logged


@dataclass
class ScriptCallback:
    name: str
    callback: object


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond,
                 text_uncond, denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x, self.sampling_step = x, sampling_step
        self.total_sampling_steps, self.inner_model = total_sampling_steps, inner_model


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x, self.sampling_step, self.total_sampling_steps = x, sampling_step, total_sampling_steps


def _add(category, callback, name):
    callbacks[category].append(ScriptCallback(f"ext/{category}/{name}", callback))


def on_cfg_denoiser(callback, *, name=None):
    _add("cfg_denoiser", callback, name)


def on_cfg_denoised(callback, *, name=None):
    _add("cfg_denoised", callback, name)


def on_cfg_after_cfg(callback, *, name=None):
    _add("cfg_after_cfg", callback, name)


def on_ui_settings(callback, *, name=None):
    _add("ui_settings", callback, name)


def on_before_ui(callback, *, name=None):
    _add("before_ui", callback, name)


def ui_settings_callback():
    for entry in callbacks["ui_settings"]:
        try:
            entry.callback()
        except Exception as error:
            reported.append(error)


def remove_callbacks_for_function(callback_func):
    for entries in callbacks.values():
        for entry in [c for c in entries if c.callback == callback_func]:
            entries.remove(entry)


def _run(category, params):
    for entry in list(callbacks[category]):
        try:
            entry.callback(params)
        except Exception as error:  # the WebUI reports and goes on
            reported.append(error)


def cfg_denoiser_callback(params):
    _run("cfg_denoiser", params)


def cfg_denoised_callback(params):
    _run("cfg_denoised", params)


def cfg_after_cfg_callback(params):
    _run("cfg_after_cfg", params)


def registered_count():
    """Callbacks of the sampling kinds (UI callbacks are registered once at load)."""
    return sum(len(callbacks[k]) for k in ("cfg_denoiser", "cfg_denoised", "cfg_after_cfg"))
