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

import functools
import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .config import MASKS  # "both" is diffusers' default (use_intersect_mask=True)
from .guidance import at_or_above_quantile

__all__ = ["MASKS", "CrossAttentionRecorder", "attention_mask"]
# With "both", the reference uses the attention mask alone at timesteps above this one
# (__call__: `if t <= 800`), when the noise mask is still mostly noise.
ATTENTION_ONLY_ABOVE_TIMESTEP = 800
PLACES = ("up", "down")  # the reference's from_where; the middle block is left out
FIRST_TOKEN = 1  # a concept's tokens follow the start token


@functools.lru_cache(maxsize=8)
def gaussian_kernel(dtype: torch.dtype, device) -> torch.Tensor:
    """The reference's 3x3 smoothing kernel, sigma 0.5, normalised (built in float32; one
    copy per dtype and device)."""
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
    does; in float32 (autocast off: the WebUI samples under it), where half-precision scores
    would overflow."""
    with torch.autocast(x.device.type, enabled=False):
        return _probabilities(layer, layer.to_q(x).float(), layer.to_k(context).float())


def _probabilities(layer: torch.nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    heads, rows = layer.heads, q.shape[0]

    def split(t):  # [rows, n, heads * d] -> [rows * heads, n, d], the heads inner
        rows, n, width = t.shape
        return t.reshape(rows, n, heads, width // heads).permute(0, 2, 1, 3).reshape(
            rows * heads, n, width // heads)
    q, k = split(q), split(k)
    scores = torch.baddbmm(torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype,
                                       device=q.device),
                           q, k.transpose(-1, -2), beta=0, alpha=layer.scale)
    return scores.softmax(dim=-1).view(rows, heads, q.shape[1], k.shape[1])


def _context(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The context a cross-attention layer is called with: `context` (ldm, sgm),
    `encoder_hidden_states` (diffusers) or the second positional argument."""
    for name in ("context", "encoder_hidden_states"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return args[1] if len(args) > 1 else None


def query_size(latent_size: Tuple[int, int]) -> Tuple[int, int]:
    """The query grid at resolution / 4: two stride-2 downsamplings (3x3, padding 1) of the
    latents, each rounding up, so ceil(side / 4); the reference's size / 4 where it divides."""
    return tuple(-(-side // 4) for side in latent_size)


def _runs(rows: Sequence[int]) -> List[Tuple[int, int]]:
    """(start, length) of each run of consecutive rows in sorted `rows`."""
    runs: List[Tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][0] + runs[-1][1] == row:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((row, 1))
    return runs


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
        self._handles.append(self.unet.register_forward_pre_hook(self._model_call,
                                                                 with_kwargs=True))
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

    def _model_call(self, module, args, kwargs) -> None:
        self._offset += self._call_rows
        x = args[0] if args else kwargs.get("x", kwargs.get("sample"))
        if not isinstance(x, torch.Tensor):
            if self._rows:  # rows could no longer be told apart: better no image
                raise RuntimeError("the UNet was called without its latents as the first "
                                   "argument, so its rows cannot be counted")
            x = None
        self._call_rows = 0 if x is None else x.shape[0]

    def _hook(self, place: str) -> Callable:
        def record(layer, args, kwargs):
            if not self._rows:
                return
            x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
            if x.shape[1] != self._queries:
                return
            local = sorted(row - self._offset for row in self._rows
                           if self._offset <= row < self._offset + x.shape[0])
            context = _context(args, kwargs)
            if context is None:
                raise RuntimeError("a cross-attention layer was called without its context")
            for start, count in _runs(local):  # slices, not an index tensor: no device sync
                with torch.no_grad():
                    probs = probabilities(layer, x.narrow(0, start, count),
                                          context.narrow(0, start, count))
                for row, row_probs in enumerate(probs, start=start + self._offset):
                    concept, image = self._rows[row]
                    # kept: the concept's tokens summed, per head [heads, h * w]
                    first, last = FIRST_TOKEN, FIRST_TOKEN + self._tokens[concept]
                    self._store.setdefault((concept, image, place), []).append(
                        row_probs[..., first:last].sum(-1))
        return record

    def attention(self, concept: int, images: int) -> torch.Tensor:
        """[images, h, w]: the concept's attention summed over its tokens, averaged over the
        recorded heads and layers (up blocks first, as the reference concatenates them)."""
        maps = []
        for image in range(images):
            layers = [t for place in PLACES for t in self._store.get((concept, image, place), [])]
            if not layers:
                raise RuntimeError(
                    f"no cross-attention was recorded for concept {concept + 1} at "
                    f"{self.size[0]}x{self.size[1]}, a quarter of the latents' size: this UNet "
                    "has no cross-attention there, or runs without its own layers (another "
                    "UNet took its place); choose the noise mask")
            heads = torch.cat(layers)  # [layers * heads, h * w]
            maps.append((heads.sum(0) / heads.shape[0]).view(*self.size))
        return torch.stack(maps)
