"""The toy text-to-image model, built like Stable Diffusion at a tiny scale: a word-level text
encoder whose every token feeds a UNet's cross-attention, and a UNet that predicts eps.
Its "latent" is the 32x32 RGB image scaled to [-1, 1] and folded losslessly into 16x16x12
(each 2x2 block of pixels becomes 12 channels), so the UNet works at a quarter of the
positions, as SD's UNet works on a smaller latent than the image."""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import COLOURS, SHAPES, SIZES

VOCAB = ("<pad>", "<bos>", "<eos>", "<unk>", "a", "on", "background") + tuple(COLOURS) + \
    SHAPES + tuple(SIZES)
MAX_TOKENS = 12  # <bos>, up to 10 words, <eos>, padding
TEXT_DIM = 64
TIMESTEPS = 1000
LATENT_CHANNELS, LATENT_SIZE = 12, 16


def image_to_latent(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 32, 32, 3] -> float [B, 12, 16, 16] in [-1, 1]."""
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    return F.pixel_unshuffle(x, 2)


def latent_to_image(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of image_to_latent, clamped and rounded to uint8 [B, 32, 32, 3]."""
    x = F.pixel_shuffle(latents.float(), 2).clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def tokenize(texts: Sequence[str]) -> torch.Tensor:
    """[len(texts), MAX_TOKENS] word ids; unknown words become <unk>, extra words are cut."""
    index = {w: i for i, w in enumerate(VOCAB)}
    rows = []
    for text in texts:
        words = [index.get(w, index["<unk>"]) for w in text.lower().replace(",", " ").split()]
        ids = [index["<bos>"]] + words[:MAX_TOKENS - 2] + [index["<eos>"]]
        rows.append(ids + [index["<pad>"]] * (MAX_TOKENS - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


class TextEncoder(nn.Module):
    def __init__(self, dim: int = TEXT_DIM, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), dim)
        self.position = nn.Parameter(torch.zeros(MAX_TOKENS, dim))
        layer = nn.TransformerEncoderLayer(dim, 4, dim * 2, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(self.embed(tokens) + self.position))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time(temb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Attention(nn.Module):
    """Self-attention over positions, then cross-attention to the text tokens, as in SD."""

    def __init__(self, channels: int, heads: int = 4, self_attention: bool = True):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, channels)
        self.self_attn = nn.MultiheadAttention(channels, heads, batch_first=True) \
            if self_attention else None
        self.norm2 = nn.LayerNorm(channels)
        self.cross_attn = nn.MultiheadAttention(channels, heads, kdim=TEXT_DIM, vdim=TEXT_DIM,
                                                batch_first=True)

    def forward(self, x, context):
        b, c, h, w = x.shape
        seq = self.norm1(x).flatten(2).transpose(1, 2)
        if self.self_attn is not None:
            seq = seq + self.self_attn(seq, seq, seq, need_weights=False)[0]
        q = self.norm2(seq)
        seq = seq + self.cross_attn(q, context, context, need_weights=False)[0]
        return x + seq.transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    """16x16 -> 8x8 -> 4x4 and back, attention at 8x8 and 4x4."""

    def __init__(self, channels=(48, 96, 128), tdim: int = 128):
        super().__init__()
        c1, c2, c3 = channels
        self.tdim = tdim
        self.time = nn.Sequential(nn.Linear(tdim, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.inp = nn.Conv2d(LATENT_CHANNELS, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, tdim)
        self.down2, self.attn2 = ResBlock(c1, c2, tdim), Attention(c2, self_attention=False)
        self.mid, self.attn3 = ResBlock(c2, c3, tdim), Attention(c3)
        self.up2, self.attn_up2 = ResBlock(c3 + c2, c2, tdim), Attention(c2, self_attention=False)
        self.up1 = ResBlock(c2 + c1, c1, tdim)
        self.out = nn.Sequential(nn.GroupNorm(8, c1), nn.SiLU(), nn.Conv2d(c1, LATENT_CHANNELS, 3, padding=1))

    def forward(self, x, t, context):
        temb = self.time(timestep_embedding(t, self.tdim))
        h1 = self.down1(self.inp(x), temb)
        h2 = self.attn2(self.down2(F.avg_pool2d(h1, 2), temb), context)
        h3 = self.attn3(self.mid(F.avg_pool2d(h2, 2), temb), context)
        u2 = torch.cat([F.interpolate(h3, scale_factor=2.0), h2], dim=1)
        u2 = self.attn_up2(self.up2(u2, temb), context)
        u1 = torch.cat([F.interpolate(u2, scale_factor=2.0), h1], dim=1)
        return self.out(self.up1(u1, temb))


def alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's "scaled linear" schedule of 1000 steps."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.text = TextEncoder()
        self.unet = UNet()
        self.register_buffer("alphas_cumprod", alphas_cumprod(), persistent=False)

    def encode(self, texts: List[str]) -> torch.Tensor:
        """[len(texts), MAX_TOKENS, TEXT_DIM] context for cross-attention."""
        return self.text(tokenize(texts).to(self.alphas_cumprod.device))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """eps predicted for noisy images x at timesteps t."""
        return self.unet(x, t, context)
