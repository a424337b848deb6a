"""Trains the toy model from a seed: `python -m ldg_core.toy.train [--steps N] [--out PATH]`.

Images and captions are drawn fresh for every batch (ldg_core/toy/data.py); 10% of captions
are replaced by the empty prompt, so the empty prompt gives the unconditioned estimate that
classifier-free guidance (and semantic guidance) need. The weights saved are an exponential
moving average of the trained ones, as is usual for diffusion models.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time

import torch
from safetensors.torch import save_file

from . import data
from .model import ToyModel, image_to_latent

DEFAULT_OUT = __file__.replace("train.py", "toy_model.safetensors")


def noisy(model: ToyModel, x0: torch.Tensor, gen: torch.Generator):
    t = torch.randint(0, len(model.alphas_cumprod), (x0.shape[0],), generator=gen)
    a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = torch.randn(x0.shape, generator=gen)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps


def learning_rate(step: int, steps: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))))


def train(steps: int, batch: int = 64, seed: int = 0, lr: float = 1e-3, ema_decay: float = 0.999,
          caption_dropout: float = 0.1, log_every: int = 250):
    torch.manual_seed(seed)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    model = ToyModel()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses, start = [], time.time()
    for step in range(steps):
        images, captions = data.batch(rng, batch)
        captions = ["" if rng.random() < caption_dropout else c for c in captions]
        xt, t, eps = noisy(model, image_to_latent(torch.from_numpy(images)), gen)
        loss = torch.nn.functional.mse_loss(model(xt, t, model.encode(captions)), eps)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - ema_decay)
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(f"step {step + 1}/{steps}  loss {recent:.4f}  {time.time() - start:.0f} s",
                  flush=True)
    final_loss = sum(losses[-500:]) / len(losses[-500:])
    return ema, final_loss, time.time() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (1 trains faster on a machine that is busy)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, loss, seconds = train(args.steps, seed=args.seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out,
              metadata={"steps": str(args.steps), "seed": str(args.seed),
                        "final_loss": f"{loss:.4f}", "seconds": f"{seconds:.0f}"})
    print(f"final loss {loss:.4f} (mean of the last 500 steps), {seconds:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
