"""Loads the repository as a ComfyUI custom node pack on the ComfyUI double (tests/comfy_double),
with the WebUI double's tiny UNet as the model."""
import importlib.util
import os
import sys

import k_diffusion.external
import k_diffusion.sampling
import torch

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
for path in (os.path.join(HERE, "comfy_double"), os.path.join(HERE, "webui_double")):
    if path not in sys.path:
        sys.path.insert(0, path)

import comfy.model_patcher  # noqa: E402
import comfy.model_sampling  # noqa: E402
import comfy.samplers  # noqa: E402

from tests.webui_double.model import TinySD  # noqa: E402


def load_pack():
    """As ComfyUI's nodes.py load_custom_node does: the folder's __init__.py as a package named
    after the folder's path, so its relative imports work."""
    spec = importlib.util.spec_from_file_location(ROOT, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[ROOT] = module
    spec.loader.exec_module(module)
    return module


PACK = load_pack()
NODES = sys.modules[ROOT + ".comfy_nodes"]
CORE = sys.modules[ROOT + ".ldg_core"]


class Model(torch.nn.Module):
    """A BaseModel's part the sampling code uses (comfy/model_base.py apply_model: x0 from the
    UNet at a sigma), the tiny UNet behind k-diffusion's wrapper; counts its calls' lists.
    `control`: a ControlNet stand-in, a per-entry offset of the UNet's input."""

    def __init__(self, sd: TinySD, family="SD15", prediction=None):
        super().__init__()
        wrapper = (k_diffusion.external.CompVisVDenoiser if sd.parameterization == "v"
                   else k_diffusion.external.CompVisDenoiser)
        self.denoiser = wrapper(sd)
        self.is_sdxl = sd.is_sdxl
        kind = prediction or (comfy.model_sampling.V_PREDICTION if sd.parameterization == "v"
                              else comfy.model_sampling.EPS)
        self.model_sampling = comfy.model_sampling.model_sampling(kind, sd.alphas_cumprod)
        self.model_config = type(family, (), {})()
        self.calls = []

    def apply_model(self, x, sigma, c_crossattn, y=None, control=None, transformer_options=None):
        cond = {"c_crossattn": [c_crossattn]}
        if y is not None:
            cond["vector"] = y
        if control is not None:
            x = x + control
        image = ((transformer_options or {}).get("patches_replace", {}).get("attn2", {})
                 .get("ip_adapter"))
        if image is not None:  # IP-Adapter's stand-in: the prompt's or the negative's image
            rows = x.shape[0] // len(transformer_options["cond_or_uncond"])
            x = x + torch.cat([image[i].expand(rows, -1, -1, -1)  # (cond, uncond)[i], as it picks
                               for i in transformer_options["cond_or_uncond"]])
        return self.denoiser(x, sigma, cond=cond)


class Clip:
    """CLIP's encoding API as CLIPTextEncode uses it (nodes.py L70-74)."""

    def __init__(self, sd: TinySD):
        self.sd = sd

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        cond = self.sd.get_learned_conditioning([tokens])
        if isinstance(cond, dict):
            return [[cond["crossattn"], {"pooled_output": cond["vector"]}]]
        return [[cond, {}]]


def sigmas(model, steps):
    ms = model.model_sampling
    return k_diffusion.sampling.get_sigmas_karras(steps, float(ms.sigma_min), float(ms.sigma_max))


def ksample(patcher, positive, negative, sampler="euler", steps=6, cfg=5.0, batch=1, seed=3,
            callback=None, guider=None):
    noise = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)  # ancestral samplers' noise
    schedule = sigmas(patcher.model, steps)
    if guider is None:
        return comfy.samplers.sample(patcher, noise, positive, negative, cfg,
                                     comfy.samplers.sampler_object(sampler), schedule,
                                     latent_image=torch.zeros_like(noise), callback=callback)
    return guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object(sampler),
                         schedule, callback=callback)
