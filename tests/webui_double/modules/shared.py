"""modules/shared.py: the options the CFG denoiser reads, the sampling state and the model."""
from types import SimpleNamespace


class OptionInfo:
    """modules/options.py L13-58: an option's default, label, component and section."""

    def __init__(self, default=None, label="", component=None, component_args=None, section=None,
                 **kwargs):
        self.default, self.label, self.component = default, label, component
        self.component_args, self.section = component_args, section
        self.reload_ui = False

    def needs_reload_ui(self):
        self.reload_ui = True
        return self


def default_opts():
    opts = SimpleNamespace(batch_cond_uncond=True, pad_cond_uncond=False, pad_cond_uncond_v0=False,
                           skip_early_cond=0.0, s_min_uncond_all=False, use_old_scheduling=False,
                           img2img_fix_steps=False)
    # Options.data holds saved values, data_labels every registered option (options.py
    # L100-170); add_option registers one and keeps a saved value.
    opts.data, opts.data_labels = {}, {}

    def add_option(key, info):
        opts.data_labels[key] = info
        opts.data.setdefault(key, info.default)
    opts.add_option = add_option
    return opts


opts = default_opts()
state = SimpleNamespace(sampling_step=0, sampling_steps=0, interrupted=False, skipped=False)
sd_model = None  # set by the tests to a tests.webui_double.model.TinySD
