"""LEDITS++'s cross-attention mask: where each concept's words attend in the UNet.

As diffusers' LEditsPPPipelineStableDiffusion computes it (__call__ with use_cross_attn_mask,
LeditsAttentionStore, LEDITSCrossAttnProcessor, LeditsGaussianSmoothing):
  - the attention probabilities of the concept's rows in the cross-attention layers (attn2) of
    the UNet's down and up blocks (not the middle block) whose queries lie at the latents'
    resolution / 4, at the step's own model call;
  - averaged over every head of every such layer, the up blocks' layers first;
  - summed over the concept's tokens (those after the start token);
  - smoothed by a 3x3 gaussian (sigma 0.5, reflected edges);
  - kept at or above the concept's threshold quantile per image, scaled to the latents' size
    (nearest), for every channel.
The host's attention kernels never materialise the probabilities. The recorder recomputes
them from the layer's own query and key projections, for the concept rows alone, and only at
the model calls the host arms it for; the rest of every call runs untouched.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .config import MASKS  # "both" is diffusers' default (use_intersect_mask=True)
from .guidance import at_or_above_quantile

__all__ = ["MASKS", "CrossAttentionRecorder", "attention_mask"]
# With "both", the reference uses the attention mask alone at timesteps above this one
# (__call__: `if t <= 800`), when the noise mask is still mostly noise.
INTERSECT_FROM_TIMESTEP = 800
PLACES = ("up", "down")  # the reference's from_where; the middle block is left out
FIRST_TOKEN = 1  # a concept's tokens follow the start token


def gaussian_kernel(dtype: torch.dtype, device) -> torch.Tensor:
    """The reference's 3x3 smoothing kernel, sigma 0.5, normalised (built in float32)."""
    grid = torch.arange(3, dtype=torch.float32)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    kernel = 1
    for coordinate in (rows, cols):
        kernel = kernel * (1 / (0.5 * math.sqrt(2 * math.pi))
                           * torch.exp(-(((coordinate - 1) / (2 * 0.5)) ** 2)))
    kernel = kernel / torch.sum(kernel)
    return kernel.view(1, 1, 3, 3).to(device=device, dtype=dtype)


def attention_mask(attention: torch.Tensor, threshold: float, size: Tuple[int, int],
                   channels: int) -> torch.Tensor:
    """The boolean mask [B, channels, *size] of an attention map [B, h, w] (the concept's
    tokens summed): smoothed, at or above its `threshold` quantile, scaled to `size`."""
    padded = F.pad(attention.unsqueeze(1), (1, 1, 1, 1), mode="reflect")
    smoothed = F.conv2d(padded, weight=gaussian_kernel(attention.dtype, attention.device))
    mask = at_or_above_quantile(smoothed, threshold).to(attention.dtype)
    return F.interpolate(mask, size=tuple(size)).repeat(1, channels, 1, 1) > 0


def probabilities(layer: torch.nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A cross-attention layer's probabilities [rows, heads, queries, tokens], from its own
    to_q / to_k projections, head count and scale (the names of the WebUI's ldm and sgm
    CrossAttention and of diffusers' Attention), computed as diffusers' get_attention_scores
    does; in float32, where half-precision scores would overflow."""
    heads = layer.heads
    q, k = layer.to_q(x).float(), layer.to_k(context).float()

    def split(t):  # [rows, n, heads * d] -> [rows * heads, n, d], the heads inner
        rows, n, width = t.shape
        return t.reshape(rows, n, heads, width // heads).permute(0, 2, 1, 3).reshape(
            rows * heads, n, width // heads)
    q, k = split(q), split(k)
    scores = torch.baddbmm(torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype,
                                       device=q.device),
                           q, k.transpose(-1, -2), beta=0, alpha=layer.scale)
    return scores.softmax(dim=-1).view(x.shape[0], heads, q.shape[1], k.shape[1])


def _context(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The context a cross-attention layer is called with: `context` (ldm, sgm),
    `encoder_hidden_states` (diffusers) or the second positional argument."""
    for name in ("context", "encoder_hidden_states"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return args[1] if len(args) > 1 else None


def query_size(latent_size: Tuple[int, int]) -> Tuple[int, int]:
    """The query grid at resolution / 4: two stride-2 downsamplings (3x3, padding 1) of the
    latents, each rounding up; latent sides divisible by 4 give the reference's size / 4."""
    return tuple(-(-(-(-side // 2)) // 2) for side in latent_size)


class CrossAttentionRecorder:
    """Keeps, for armed rows of the next model calls, what the mask needs of each layer.

    `unet` is the module one model call runs (its forward pre-hook counts each call's rows, so
    rows are numbered across the calls a host splits its batch into); `layers` are
    (place, cross-attention module) pairs, place "down", "mid" or "up". Hooks exist from
    attach() to detach() only; unarmed calls cost one check per layer.
    """

    def __init__(self, unet: torch.nn.Module, layers: Sequence[Tuple[str, torch.nn.Module]]):
        self.unet = unet
        self.layers = [(place, layer) for place, layer in layers if place in PLACES]
        self._handles: list = []
        self._rows: Dict[int, Tuple[int, int]] = {}  # row -> (concept, image)
        self._tokens: Dict[int, int] = {}  # concept -> its token count
        self._queries = 0  # h * w at resolution / 4
        self._offset = 0  # rows of the armed calls before the current one
        self._call_rows = 0
        self._store: Dict[Tuple[int, int, str], List[torch.Tensor]] = {}
        self.size: Tuple[int, int] = (0, 0)

    def attach(self) -> None:
        if self._handles:
            return
        if not self.layers:
            raise ValueError("the UNet has no cross-attention layers in its down and up blocks")
        self._handles.append(self.unet.register_forward_pre_hook(self._model_call))
        for place, layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(
                self._hook(place), with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.disarm()

    def arm(self, rows: Mapping[int, Tuple[int, int]], tokens: Mapping[int, int],
            latent_size: Tuple[int, int]) -> None:
        """Records, in the model calls that follow, the rows `rows` (numbered across those
        calls: row -> (concept, image)); `tokens`: each concept's token count."""
        self.disarm()
        self._rows, self._tokens = dict(rows), dict(tokens)
        self.size = query_size(latent_size)
        self._queries = self.size[0] * self.size[1]

    def disarm(self) -> None:
        self._rows, self._store, self._offset, self._call_rows = {}, {}, 0, 0

    def _model_call(self, module, args) -> None:
        self._offset += self._call_rows
        x = args[0] if args else None
        self._call_rows = x.shape[0] if isinstance(x, torch.Tensor) else 0

    def _hook(self, place: str) -> Callable:
        def record(layer, args, kwargs):
            if not self._rows:
                return
            x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
            if x.shape[1] != self._queries:
                return
            local = [(row - self._offset, key) for row, key in self._rows.items()
                     if self._offset <= row < self._offset + x.shape[0]]
            if not local:
                return
            index = torch.tensor([row for row, _ in local], device=x.device)
            with torch.no_grad():
                probs = probabilities(layer, x.index_select(0, index),
                                      _context(args, kwargs).index_select(0, index))
            for (_, (concept, image)), row_probs in zip(local, probs):
                # the concept's tokens, copied: the whole row's probabilities are let go
                tokens = row_probs[..., FIRST_TOKEN:FIRST_TOKEN + self._tokens[concept]].clone()
                self._store.setdefault((concept, image, place), []).append(tokens)
        return record

    def attention(self, concept: int, images: int) -> torch.Tensor:
        """[images, h, w]: the concept's attention, averaged over the recorded heads and
        layers (up blocks first, as the reference concatenates them), summed over its tokens."""
        maps = []
        for image in range(images):
            layers = [t for place in PLACES for t in self._store.get((concept, image, place), [])]
            if not layers:
                raise RuntimeError(f"no cross-attention was recorded for concept {concept + 1} "
                                   f"at resolution {self.size[0]}x{self.size[1]}")
            heads = torch.cat(layers)  # [layers * heads, h * w, tokens]
            mean = heads.sum(0) / heads.shape[0]
            maps.append(mean.sum(-1).view(*self.size))
        return torch.stack(maps)
