"""modules/shared.py: the options the CFG denoiser reads, the sampling state and the model."""
from types import SimpleNamespace


def default_opts():
    return SimpleNamespace(batch_cond_uncond=True, pad_cond_uncond=False, pad_cond_uncond_v0=False,
                           skip_early_cond=0.0, s_min_uncond_all=False, use_old_scheduling=False,
                           img2img_fix_steps=False)


opts = default_opts()
state = SimpleNamespace(sampling_step=0, sampling_steps=0, interrupted=False, skipped=False)
sd_model = None  # set by the tests to a tests.webui_double.model.TinySD
