"""A Stable-Diffusion-1.5-like model for the benchmarks, with the interface of the test double's
TinySD (tests/webui_double/model.py) but a real-size UNet and batched model calls.

The UNet is diffusers' UNet2DConditionModel built from the SD 1.5 configuration with random
weights (nothing is downloaded): the cost of a forward is the real one, the numbers are noise.
The text encoder is a table of seeded random word vectors in 75-token chunks of 77 rows, like
CLIP's output shape; its cost is negligible next to the UNet's, as CLIP's is in the WebUI.
"""
import zlib

import torch

CHUNK = 75
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32,
            cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                              "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                            "CrossAttnUpBlock2D"))
# The quick mode's UNet: the same block structure (cross-attention at the latents' resolution,
# / 2 and / 4, where LEDITS++'s attention mask looks), tiny widths.
TINY = dict(SD15, layers_per_block=1, block_out_channels=(16, 16, 32, 32), norm_num_groups=8,
            cross_attention_dim=32, attention_head_dim=4)


def build_unet(config: dict, *, device="cpu", dtype=torch.float32, seed=0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval().to(device=device, dtype=dtype)


class BenchSD(torch.nn.Module):
    """What the WebUI double needs of shared.sd_model, around a given UNet."""

    def __init__(self, unet, name="bench"):
        super().__init__()
        self.unet = unet
        self.dim = unet.config.cross_attention_dim
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.salt = ""
        self.is_sdxl, self.is_sd1, self.is_sd2, self.is_sd3 = False, True, False, False
        self.cond_stage_key = "txt"
        self.parameterization = "eps"
        self.model = type("Wrapper", (), {"conditioning_key": "crossattn"})()
        self.model.diffusion_model = unet  # where the WebUI's model keeps its UNet
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod",
                             torch.cumprod(1 - betas, 0).float().to(self.device))
        self.sd_checkpoint_info = name
        self._words = {}
        self.cond_stage_model_empty_prompt = self.get_learned_conditioning([""])

    def _vector(self, word):
        if word not in self._words:
            g = torch.Generator().manual_seed(zlib.crc32(word.encode("utf-8")))
            self._words[word] = torch.randn(self.dim, generator=g)
        return self._words[word]

    def _encode_chunk(self, words):
        rows = [self._vector("<bos>")] + [self._vector(w) for w in words]
        rows += [self._vector("<eos>")] * (CHUNK + 2 - len(rows))
        return torch.stack(rows)

    def token_count(self, text):
        from tests.webui_double.model import TinySD
        return sum(len(chunk) for chunk in TinySD._chunks(text))

    def get_learned_conditioning(self, texts):
        from tests.webui_double.model import TinySD  # the same 75-token chunking and BREAK
        chunked = [TinySD._chunks(t) for t in texts]
        count = max(len(c) for c in chunked)
        conds = [torch.cat([self._encode_chunk(c) for c in chunks + [[]] * (count - len(chunks))])
                 for chunks in chunked]
        return torch.stack(conds).to(self.device, self.dtype)

    def apply_model(self, x, t, cond):
        """All rows in one UNet call, as the WebUI's model does."""
        context = cond["c_crossattn"][0]
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        with torch.no_grad():
            return self.unet(x.to(self.dtype), t, encoder_hidden_states=context.to(self.dtype)
                             ).sample.to(x.dtype)
