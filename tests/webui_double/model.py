"""A tiny Stable-Diffusion-like model for the double: a word-embedding text encoder with
75-token chunks and BREAK, and a small diffusers UNet with cross-attention predicting eps.
With sdxl=True its conditioning is a dict with 'crossattn' and a pooled 'vector', as SDXL's.
With attention_levels=True its UNet has cross-attention at the latents' resolution / 4 too,
where LEDITS++'s attention mask looks (as SD's UNets have). The UNet is also at
`model.diffusion_model`, where the WebUI's LatentDiffusion keeps its UNet (ldm ddpm.py
DiffusionWrapper)."""
import zlib

import torch

from modules import prompt_parser

DIM, CHUNK = 32, 75


def _vector(word, size=DIM, salt=""):
    g = torch.Generator().manual_seed(zlib.crc32((salt + word).encode("utf-8")))
    return torch.randn(size, generator=g)


class TinySD(torch.nn.Module):
    def __init__(self, sdxl=False, v_prediction=False, seed=0, name="tiny",
                 attention_levels=False):
        super().__init__()
        self.salt = "" if seed == 0 else f"model {seed}: "  # another model, another text encoder
        from diffusers import UNet2DConditionModel
        torch.manual_seed(seed)
        self.is_sdxl, self.is_sd1, self.is_sd2, self.is_sd3 = sdxl, not sdxl, False, False
        self.cond_stage_key = "txt"
        self.parameterization = "v" if v_prediction else "eps"
        self.model = type("Wrapper", (), {"conditioning_key": "crossattn"})()
        levels = dict(block_out_channels=(8, 16, 16), down_block_types=("CrossAttnDownBlock2D",) * 3,
                      up_block_types=("CrossAttnUpBlock2D",) * 3) if attention_levels else dict(
            block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        self.unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            norm_num_groups=8, cross_attention_dim=DIM, attention_head_dim=4, **levels,
            class_embed_type="projection" if sdxl else None,
            projection_class_embeddings_input_dim=DIM if sdxl else None).eval()
        self.model.diffusion_model = self.unet
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())
        self.sd_checkpoint_info = name
        self.cond_stage_model_empty_prompt = self.get_learned_conditioning([""])
        if sdxl:
            self.cond_stage_model_empty_prompt = self.cond_stage_model_empty_prompt["crossattn"]

    # text ------------------------------------------------------------------------------------
    @staticmethod
    def _chunks(text):
        chunks, current = [], []
        for word in text.replace(",", " , ").split():
            if word == "BREAK" or len(current) == CHUNK:
                chunks.append(current)
                current = []
                if word == "BREAK":
                    continue
            current.append(word)
        return chunks + [current]

    def _encode_chunk(self, words):
        rows = [_vector("<bos>")] + [_vector(w, salt=self.salt) for w in words]
        rows += [_vector("<eos>")] * (CHUNK + 2 - len(rows))
        emb = torch.stack(rows)
        return emb + 0.1 * torch.sin(torch.arange(CHUNK + 2)[:, None] * torch.arange(DIM) / DIM)

    def get_learned_conditioning(self, texts):
        chunked = [self._chunks(t) for t in texts]
        count = max(len(c) for c in chunked)
        conds = []
        for chunks in chunked:
            chunks = chunks + [[]] * (count - len(chunks))  # pad with empty chunks, as the WebUI
            conds.append(torch.cat([self._encode_chunk(c) for c in chunks]))
        crossattn = torch.stack(conds)
        if not self.is_sdxl:
            return crossattn
        vector = torch.stack([_vector("pool " + t, salt=self.salt) for t in texts])
        return prompt_parser.DictWithShape({"crossattn": crossattn, "vector": vector})

    def token_count(self, text):
        """Tokens of `text` without start and end tokens, across its chunks."""
        return sum(len(chunk) for chunk in self._chunks(text))

    # denoising -------------------------------------------------------------------------------
    def apply_model(self, x, t, cond):
        # Row by row, so a row's output never depends on which other rows share its batch (a
        # real UNet's can move by ~1e-6 with the batch size): tests can then compare exactly.
        context = cond["c_crossattn"][0] if "c_crossattn" in cond else cond["crossattn"]
        labels = cond.get("vector") if self.is_sdxl else None
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        with torch.no_grad():
            return torch.cat([self.unet(x[i:i + 1], t[i:i + 1], encoder_hidden_states=context[i:i + 1],
                                        class_labels=None if labels is None else labels[i:i + 1]).sample
                              for i in range(x.shape[0])])
