"""modules/shared.py: the options the CFG denoiser reads, the sampling state and the model;
OptionInfo and Options.add_option as in modules/options.py (L13-43, L256-259)."""
from types import SimpleNamespace


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None,
                 section=None, refresh=None, comment_before='', comment_after='', infotext=None,
                 restrict_api=False, category_id=None):
        self.default, self.label, self.component = default, label, component
        self.component_args, self.section, self.comment_after = component_args, section, comment_after

    def info(self, info):
        self.comment_after += f"<span class='info'>({info})</span>"
        return self


class Options(SimpleNamespace):
    def __init__(self, **values):
        super().__init__(**values)
        self.data_labels = {}

    def add_option(self, key, info):
        self.data_labels[key] = info
        if not hasattr(self, key):  # a value already set (saved settings) is kept
            setattr(self, key, info.default)


def default_opts():
    return Options(batch_cond_uncond=True, pad_cond_uncond=False, pad_cond_uncond_v0=False,
                   skip_early_cond=0.0, s_min_uncond_all=False, use_old_scheduling=False,
                   img2img_fix_steps=False)


opts = default_opts()
state = SimpleNamespace(sampling_step=0, sampling_steps=0, interrupted=False, skipped=False)
sd_model = None  # set by the tests to a tests.webui_double.model.TinySD
