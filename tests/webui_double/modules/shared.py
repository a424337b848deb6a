"""modules/shared.py: the options the CFG denoiser reads, the sampling state and the model;
OptionInfo and Options as in modules/options.py (OptionInfo L13-58; Options: saved values in
`data`, registered options in `data_labels`, an attribute reads its saved value, else its
default, L100-142; add_option L256-259)."""
from types import SimpleNamespace


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None,
                 section=None, refresh=None, comment_before='', comment_after='', infotext=None,
                 restrict_api=False, category_id=None):
        self.default, self.label, self.component = default, label, component
        self.component_args, self.section, self.comment_after = component_args, section, comment_after
        self.reload_ui = False

    def info(self, info):
        self.comment_after += f"<span class='info'>({info})</span>"
        return self

    def needs_reload_ui(self):
        self.reload_ui = True
        return self


class Options:
    def __init__(self, **values):
        self.__dict__["data"] = dict(values)
        self.__dict__["data_labels"] = {}

    def __getattr__(self, key):
        if key in self.data:
            return self.data[key]
        if key in self.data_labels:
            return self.data_labels[key].default
        raise AttributeError(key)

    def __setattr__(self, key, value):
        self.data[key] = value

    def add_option(self, key, info):
        self.data_labels[key] = info
        if key not in self.data:  # a saved value is kept
            self.data[key] = info.default


def default_opts():
    return Options(batch_cond_uncond=True, pad_cond_uncond=False, pad_cond_uncond_v0=False,
                   skip_early_cond=0.0, s_min_uncond_all=False, use_old_scheduling=False,
                   img2img_fix_steps=False, eta_ancestral=1.0, eta_ddim=0.0)


opts = default_opts()
state = SimpleNamespace(sampling_step=0, sampling_steps=0, interrupted=False, skipped=False)
sd_model = None  # set by the tests to a tests.webui_double.model.TinySD
