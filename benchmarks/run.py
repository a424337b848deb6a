"""Benchmarks of the extension's cost, side by side in one run (issue 7).

    python -m benchmarks.run [--quick] [--device cpu|cuda] [--out benchmarks/RESULTS.md]

Every figure is a count, or a ratio of two timings taken in the same run with their repeats
interleaved (A B, B A, A B, ...), reported as the median and the min-max of the per-repeat
ratios. Generations go through tests/webui_double, our double of the WebUI 1.10.1 contract,
with the extension's own script: the real hook code path. --quick uses a tiny UNet and one
repeat (CI's smoke test); the full run uses an SD 1.5-size UNet with random weights.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence

import torch

from tests import webui_harness as h  # puts the WebUI double's `modules` on sys.path
from ldg_core import Concept, GuidanceConfig, SemanticGuidance
from ldg_core.guidance import concepts_needed
from ldg_core.webui_generation import Generation
from modules import processing, script_callbacks, shared

from benchmarks.sd_model import SD15, TINY, BenchSD, build_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- settings of a run -----------------------------------------------------------------------

@dataclass
class Setup:
    quick: bool
    device: str
    repeats: int
    unet_config: dict
    model_name: str
    latent: int = 64  # latent side (64 = 512 px)
    steps: int = 2  # steps of a timed generation
    batches: Sequence[int] = (1,)
    concept_counts: Sequence[int] = (1, 2, 3, 4)
    math_latents: Sequence[int] = (64,)
    math_dtypes: Sequence[torch.dtype] = (torch.float32,)
    notes: List[str] = field(default_factory=list)
    command: str = "python -m benchmarks.run"
    _model: BenchSD = None

    @property
    def cuda(self):
        return self.device == "cuda"

    def model(self) -> BenchSD:
        if self._model is None:
            self._model = BenchSD(build_unet(self.unet_config, device=self.device))
        return self._model


def make_setup(quick: bool, device: str) -> Setup:
    if quick:
        return Setup(quick, device, repeats=1, unet_config=TINY, model_name="tiny UNet (quick)",
                     latent=16, steps=2, batches=(1, 2), concept_counts=(1, 2),
                     math_latents=(16,))
    if device == "cuda":
        return Setup(quick, device, repeats=5, unet_config=SD15,
                     model_name="SD 1.5 UNet, random weights", steps=4, batches=(1, 2),
                     math_latents=(64, 96, 128), math_dtypes=(torch.float32, torch.float16))
    # Two shared CPU cores: an SD 1.5 forward of one 64x64 row takes 6-15 s there, so the CPU
    # default is 32x32 latents (256 px), B = 1, one step per timed generation, 2 repeats.
    return Setup(quick, device, repeats=2, unet_config=SD15,
                 model_name="SD 1.5 UNet, random weights", latent=32, steps=1, batches=(1,),
                 math_latents=(32, 64))


# -- timing ----------------------------------------------------------------------------------

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int, device: str,
                warmup=True) -> Dict[str, List[float]]:
    """Times each function once per repeat, alternating their order from repeat to repeat so
    that drifting load hits every side alike. Returns seconds per call, per repeat. `warmup`:
    run every function (True), none (False) or the named ones once first, untimed."""
    names = list(fns)
    for name in names:
        if warmup is True or (warmup and name in warmup):
            fns[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def ratio(a: List[float], b: List[float]) -> str:
    """Median and min-max of the per-repeat ratios a/b."""
    r = [x / y for x, y in zip(a, b)]
    if len(r) == 1:
        return f"{r[0]:.3f}"
    return f"{statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f})"


def ms(values: List[float]) -> str:
    return f"{statistics.median(values) * 1e3:.1f}"


@dataclass
class Table:
    title: str
    columns: List[str]
    rows: List[list] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + self.notes
        return "\n".join(lines) + "\n"


# -- generations through the WebUI double ----------------------------------------------------

def concepts(count: int, warmup: int = 0, cooldown=None) -> List[dict]:
    words = ["smiling", "glasses", "oil painting", "a red hat"]
    return [{"prompt": words[i % len(words)], "scale": 5.0, "threshold": 0.9, "warmup": warmup,
             "cooldown": -1 if cooldown is None else cooldown} for i in range(count)]


def generation(setup: Setup, *, batch: int, steps: int, args, sampler="Euler", model=None,
               p_extra=None, after=None):
    """A function that runs one generation (args None: no extension at all). `p_extra`: more
    processing fields (img2img's); `after(p)`: sees the processing object when it is done."""
    kwargs = dict(sampler_name=sampler, steps=steps, batch_size=batch, prompt="a photo of a cat",
                  width=setup.latent * 8, height=setup.latent * 8, **(p_extra or {}))

    def run():
        shared.sd_model = model or setup.model()
        script_callbacks.ui_settings_callback()
        p = processing.Processing(**kwargs)
        entries = [] if args is None else [(h.SCRIPT_MODULE.LatentDiffusionGuidanceScript(), args)]
        runner = h.scripts.ScriptRunner(entries)
        torch.manual_seed(0)
        out = processing.process_images(p, runner)
        assert not runner.reported and not script_callbacks.reported, (
            runner.reported, script_callbacks.reported)
        if after is not None:
            after(p)
        return out
    return run


@contextlib.contextmanager
def method_timer(cls, names, device: str = "cpu"):
    """Accumulates the time spent inside the methods `names` of `cls` while in the block."""
    spent = [0.0]
    originals = {name: getattr(cls, name) for name in names}

    def timed(fn):
        def wrapper(*args, **kwargs):
            sync(device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(device)
                spent[0] += time.perf_counter() - start
        return wrapper
    for name, fn in originals.items():
        setattr(cls, name, timed(fn))
    try:
        yield spent
    finally:
        for name, fn in originals.items():
            setattr(cls, name, fn)


def hook_timer(device: str):
    """The time spent inside the extension's three CFG callbacks."""
    return method_timer(Generation, ("on_cfg_denoiser", "on_cfg_denoised", "on_cfg_after_cfg"),
                        device)


class UNetTimer:
    """Accumulates the time spent inside the model's apply_model (the UNet calls), and counts
    them."""

    def __init__(self, model, device):
        self.model, self.device, self.spent, self.calls = model, device, 0.0, 0

    def __enter__(self):
        inner = self.model.apply_model

        def timed(x, t, cond):
            sync(self.device)
            self.calls += 1
            start = time.perf_counter()
            try:
                return inner(x, t, cond)
            finally:
                sync(self.device)
                self.spent += time.perf_counter() - start
        self.model.apply_model = timed
        return self

    def __exit__(self, *exc):
        del self.model.apply_model


def script_timer():
    """The time spent inside our script's hooks."""
    return method_timer(h.SCRIPT_MODULE.LatentDiffusionGuidanceScript,
                        ("process", "process_before_every_sampling", "postprocess"))


class RowCounter:
    """Counts the rows of every model call (wraps the model's apply_model)."""

    def __init__(self, model):
        self.model, self.rows = model, []

    def __enter__(self):
        inner = self.model.apply_model

        def counted(x, t, cond):
            self.rows.append(x.shape[0])
            return inner(x, t, cond)
        self.model.apply_model = counted
        return self

    def __exit__(self, *exc):
        del self.model.apply_model


def ideal_forward(setup: Setup, rows: int):
    """One plain UNet forward over `rows` rows: the cost of those rows and nothing else."""
    model = setup.model()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 4, setup.latent, setup.latent, generator=g).to(setup.device)
    context = torch.randn(rows, 77, model.dim, generator=g).to(setup.device, model.dtype)
    t = torch.full((rows,), 500.0, device=setup.device)

    def run():
        with torch.no_grad():
            return model.unet(x.to(model.dtype), t, encoder_hidden_states=context).sample
    return run


# -- table 1: overhead vs the ideal ----------------------------------------------------------

def table_overhead(setup: Setup, collected: dict) -> Table:
    table = Table("1. Overhead vs the ideal",
                  ["B", "N", "rows per call", "ideal forward (ms, median)",
                   "guided step (ms, median)", "guided step / ideal",
                   "guided generation / its own UNet calls", "our hooks / step"])
    for batch in setup.batches:
        for n in setup.concept_counts:
            rows = (2 + n) * batch
            guided = generation(setup, batch=batch, steps=setup.steps,
                                args=h.script_args(concepts(n), momentum_scale=0.1))
            spent_per_repeat, unet_per_repeat = [], []

            def timed_guided():
                with hook_timer(setup.device) as spent, UNetTimer(setup.model(), setup.device) as unet:
                    guided()
                spent_per_repeat.append(spent[0])
                unet_per_repeat.append(unet.spent)
            # On a CPU only the first configuration is warmed up: a forward costs seconds and
            # the UNet stays warm from one configuration to the next.
            warm = True if setup.cuda or setup.quick or not collected else False
            times = interleaved({"ideal": ideal_forward(setup, rows), "guided": timed_guided},
                                setup.repeats, setup.device, warmup=warm)
            per_step = [t / setup.steps for t in times["guided"]]
            hooks = [s / t for s, t in zip(spent_per_repeat[-setup.repeats:], times["guided"])]
            own_unet = unet_per_repeat[-setup.repeats:]
            collected[(batch, n)] = {"ideal": times["ideal"], "step": per_step, "hooks": hooks}
            table.rows.append([batch, n, rows, ms(times["ideal"]), ms(per_step),
                               ratio(per_step, times["ideal"]),
                               ratio(times["guided"], own_unet),
                               f"{statistics.median(hooks) * 100:.3f}%"])
    table.notes += [
        f"Guided: a {setup.steps}-step Euler generation through the WebUI double with our script "
        "enabled, every concept active at every step (warmup 0, momentum 0.1), timed whole and "
        "divided by its steps (so it also carries the WebUI's own per-generation set-up, the "
        "CFG combination and the sampler). Ideal: one UNet forward over the same (2 + N) x B "
        "rows. Target: guided / ideal <= 1.03.",
        "Guided generation / its own UNet calls: the same guided runs, whole, against the time "
        "spent inside their own model calls (all (2 + N) x B rows in one call per step), timed "
        "within the same seconds, so load that drifts between repeats cancels out; the rest is "
        "everything a generation does besides the UNet (the WebUI's set-up, CFG and sampler, "
        "and our hooks).",
        "Our hooks / step: time inside the extension's three CFG callbacks (adding rows, eps "
        "conversions, masks, momentum, applying the edit) as a share of the guided step."]
    return table


# -- table 2: rows saved by exact skipping ---------------------------------------------------

SCHEDULES = {
    "1 concept, warmup 10, cooldown 25, momentum 0":
        ([Concept("a", warmup=10, cooldown=25)], 0.0),
    "same, momentum 0.1 (warmup steps feed momentum)":
        ([Concept("a", warmup=10, cooldown=25)], 0.1),
    "3 concepts: warmup 5 / warmup 10 cooldown 25 / cooldown 15, momentum 0":
        ([Concept("a", warmup=5), Concept("b", warmup=10, cooldown=25),
          Concept("c", warmup=0, cooldown=15)], 0.0),
    "same 3 concepts, momentum 0.1":
        ([Concept("a", warmup=5), Concept("b", warmup=10, cooldown=25),
          Concept("c", warmup=0, cooldown=15)], 0.1),
    "2 concepts, defaults (warmup 10, momentum 0.1)":
        ([Concept("a"), Concept("b")], 0.1),
}


def table_rows_saved(setup: Setup) -> Table:
    steps, batch = 30, 1
    table = Table("2. Rows saved by exact skipping (30 steps, B = 1)",
                  ["schedule", "concept rows: ours / reference", "UNet rows: ours / reference",
                   "time: skipping / every row"])
    for label, (made, momentum) in SCHEDULES.items():
        config = GuidanceConfig(concepts=made, momentum_scale=momentum)
        n = len(made)
        ours = sum(len(concepts_needed(config, i, steps)) for i in range(steps)) * batch
        reference = n * batch * steps
        unet_ours, unet_ref = ours + 2 * batch * steps, reference + 2 * batch * steps
        table.rows.append([label, f"{ours} / {reference} = {ours / reference:.2f}",
                           f"{unet_ours} / {unet_ref} = {unet_ours / unet_ref:.2f}", ""])
    # The time saved, side by side, for the mixed schedule on the quick model.
    label = "3 concepts: warmup 5 / warmup 10 cooldown 25 / cooldown 15, momentum 0"
    args = h.script_args([{"prompt": "smiling", "warmup": 5},
                          {"prompt": "glasses", "warmup": 10, "cooldown": 25},
                          {"prompt": "oil painting", "warmup": 0, "cooldown": 15}],
                         momentum_scale=0.0)
    tiny = BenchSD(build_unet(TINY, device=setup.device))
    run = generation(setup, batch=batch, steps=steps, args=args, model=tiny)

    def every_row():
        with evaluate_every_concept():
            run()
    times = interleaved({"skip": run, "all": every_row}, max(setup.repeats, 3), setup.device)
    for row in table.rows:
        if row[0] == label:
            row[3] = ratio(times["skip"], times["all"])
    table.notes += [
        "Counts are exact (the engine's concepts_needed over the schedule); the reference "
        "(diffusers' SemanticStableDiffusionPipeline) evaluates N x B concept rows at every step. "
        "UNet rows add the 2 x B prompt and negative rows of every step.",
        f"Time: 30-step Euler generations through the WebUI double on the tiny UNet at "
        f"{setup.latent}x{setup.latent} latents (not the SD 1.5 UNet: 30 steps of it do not fit a "
        "CPU run), with skipping vs with every concept evaluated at every step; "
        f"{max(setup.repeats, 3)} interleaved repeats. On a real UNet the time follows the rows."]
    return table


@contextlib.contextmanager
def evaluate_every_concept():
    original = SemanticGuidance.needed
    SemanticGuidance.needed = lambda self, step: tuple(range(len(self.config.concepts)))
    try:
        yield
    finally:
        SemanticGuidance.needed = original


# -- table 3: guidance math share ------------------------------------------------------------

def guidance_math(n: int, batch: int, latent: int, dtype, device: str):
    """One step's guidance math as the hooks do it for a k-diffusion sampler: x0 -> eps for
    uncond, cond and N concepts, SemanticGuidance.step, the edit back to x0 space."""
    g = torch.Generator().manual_seed(0)
    shape = (batch, 4, latent, latent)
    x = torch.randn(shape, generator=g).to(device, dtype)
    out = torch.randn((2 + n) * batch, 4, latent, latent, generator=g).to(device, dtype)
    sigma = torch.full((batch,), 3.0, device=device)
    config = GuidanceConfig(concepts=[Concept(f"c{i}", warmup=0) for i in range(n)])

    def per_image(s):
        return s.to(dtype).view(-1, 1, 1, 1)

    def run():
        guidance = SemanticGuidance(config)
        uncond = (x - out[-batch:]) / per_image(sigma)
        cond = (x - out[:batch]) / per_image(sigma)
        rows = out[batch:batch + n * batch].view(n, *shape)
        concept_eps = (x - rows) / per_image(sigma)
        for step in range(2):  # the second step carries momentum
            edit = guidance.step(step=step, uncond=uncond, cond=cond, concepts=concept_eps)
            edit = edit * -per_image(sigma)
        return edit
    return run


def thresholds(kind: str, flat: torch.Tensor, q: float) -> torch.Tensor:
    """The cutoff of torch.quantile(flat, q, dim=-1) ('linear'), computed other ways: the
    rank as torch.quantile takes it (q rounded to the input's dtype, then in double), and the
    two order statistics around it blended with the same lerp, so that equal order statistics
    give a bit-identical cutoff (checked in the table)."""
    if kind == "quantile":
        return torch.quantile(flat, q, dim=-1)
    n = flat.shape[-1]
    rank = float(torch.tensor(q, dtype=flat.dtype)) * (n - 1)
    below = int(rank)
    above = min(below + 1, n - 1)
    weight = torch.tensor(rank - below, dtype=flat.dtype, device=flat.device)
    if kind == "sort":
        s = flat.sort(dim=-1).values
        lo, hi = s[..., below], s[..., above]
    elif kind == "kthvalue":
        lo = flat.kthvalue(below + 1, dim=-1).values
        hi = lo if above == below else flat.kthvalue(above + 1, dim=-1).values
    elif kind == "topk":
        top = flat.topk(n - below, dim=-1, largest=True, sorted=True).values  # s[below:] reversed
        lo = top[..., -1]
        hi = lo if above == below else top[..., -2]
    else:
        raise ValueError(kind)
    return torch.lerp(lo, hi, weight)


def table_math_share(setup: Setup, collected: dict) -> Table:
    table = Table("3. Guidance math share of a step",
                  ["latent", "dtype", "N", "math (ms, median)", "UNet forward (ms, median)",
                   "math / UNet forward"])
    batch = 1
    for latent in setup.math_latents:
        for dtype in setup.math_dtypes:
            for n in setup.concept_counts:
                fns = {"math": guidance_math(n, batch, latent, dtype, setup.device)}
                known = collected.get((batch, n)) if latent == setup.latent and dtype == torch.float32 else None
                if known is None and not setup.cuda:  # no UNet forwards beyond table 1's on a CPU
                    times = interleaved(fns, max(setup.repeats, 5), setup.device)
                    math = [t / 2 for t in times["math"]]
                    table.rows.append([f"{latent}x{latent}", str(dtype).replace("torch.", ""), n,
                                       f"{statistics.median(math) * 1e3:.2f}", "not run", "GPU run"])
                    continue
                if known is None:
                    saved = setup.latent, setup.model()
                    setup.latent = latent
                    if dtype != setup.model().dtype:
                        setup._model = BenchSD(setup.model().unet.to(dtype))
                    fns["unet"] = ideal_forward(setup, (2 + n) * batch)
                    setup.latent = saved[0]
                    times = interleaved(fns, setup.repeats, setup.device)
                    setup._model = BenchSD(saved[1].unet.to(torch.float32))
                    unet = times["unet"]
                    math = [t / 2 for t in times["math"]]
                else:
                    times = interleaved(fns, max(setup.repeats, 5), setup.device)
                    math = [t / 2 for t in times["math"]]
                    unet = known["ideal"]
                share = statistics.median(math) / statistics.median(unet)
                table.rows.append([f"{latent}x{latent}", str(dtype).replace("torch.", ""), n,
                                   f"{statistics.median(math) * 1e3:.2f}", ms(unet),
                                   f"{share * 100:.3f}%"])
    # The quantile against other ways to the same cutoff.
    alt = Table("3b. The mask threshold: torch.quantile vs alternatives",
                ["latent", "way", "time (ms, median)", "vs quantile", "masks identical"])
    for latent in setup.math_latents:
        g = torch.Generator().manual_seed(1)
        direction = torch.randn(batch, 4, latent, latent, generator=g).to(setup.device) * 5
        magnitude = direction.abs()
        flat = magnitude.flatten(start_dim=2)
        ways = ["quantile", "sort", "kthvalue", "topk"]
        times = interleaved({w: (lambda w=w: thresholds(w, flat, 0.9)) for w in ways},
                            max(setup.repeats, 5) * 20, setup.device)
        for w in ways:
            for q in (0.0, 0.5, 0.9, 0.95, 1.0):
                cutoff = thresholds(w, flat, q)
                expected = torch.quantile(flat, q, dim=-1)
                same_mask = torch.equal(cutoff, expected) and torch.equal(
                    magnitude >= cutoff[..., None, None], magnitude >= expected[..., None, None])
                if not same_mask:
                    break
            alt.rows.append([f"{latent}x{latent}", w, f"{statistics.median(times[w]) * 1e3:.3f}",
                             ratio(times[w], times["quantile"]),
                             "yes: cutoffs and masks (q = 0, 0.5, 0.9, 0.95, 1)" if same_mask else "no"])
    table.notes += [
        "Math: what the hooks compute per step besides the model call (x0 -> eps for the "
        "uncond, prompt and N concept rows, SemanticGuidance.step with masks and momentum, the "
        "edit back to x0), on random tensors of the latent's shape, B = 1, averaged over a first "
        "and a momentum step. UNet forward: one forward over the (2 + N) rows of that step "
        "(table 1's, for the same size); the share is the ratio of the medians. Target: <= 2%.",
        alt.markdown()]
    if not setup.cuda:
        table.notes.append("On the CPU the UNet is timed only at table 1's latent size; 64x64, "
                           "96x96, 128x128 and float16 shares need a GPU (`--device cuda`).")
    return table


# -- table 4: disabled vs no extension -------------------------------------------------------

def table_disabled(setup: Setup) -> Table:
    table = Table("4. Disabled vs no extension at all",
                  ["model", "steps", "repeats", "disabled / not installed",
                   "time inside our script, disabled / generation", "callbacks left registered"])
    tiny = BenchSD(build_unet(TINY, device=setup.device))
    steps, repeats = 8, (3 if setup.quick else 21)
    off_run = generation(setup, batch=1, steps=steps,
                         args=h.script_args(concepts(2), enabled=False), model=tiny)
    none = generation(setup, batch=1, steps=steps, args=None, model=tiny)
    inside = []

    def off():
        with script_timer() as spent:
            off_run()
        inside.append(spent[0])
    times = interleaved({"off": off, "none": none}, repeats, setup.device)
    share = [s / t for s, t in zip(inside[-repeats:], times["off"])]
    table.rows.append([f"tiny UNet, {setup.latent}x{setup.latent}", steps, repeats,
                       ratio(times["off"], times["none"]),
                       f"{statistics.median(share) * 100:.4f}% (max {max(share) * 100:.4f}%)",
                       script_callbacks.registered_count()])
    table.notes.append(
        "Whole generations through the WebUI double: the extension installed with two concepts "
        "but Enable off, vs no extension. On the tiny UNet, where a step is cheap, any overhead "
        "of ours would show most; disabled, the script returns from process() without "
        "registering anything. Target: not measurable (<= 1%); the spread of the whole-run "
        "ratio is the noise floor of a shared machine, so the time spent inside our script's "
        "hooks (process, process_before_every_sampling, postprocess) is measured too, as a share "
        "of the same generation: what disabled costs at most.")
    return table


# -- table 5: peak memory and the row limit --------------------------------------------------

def activation_sizes(config: dict, latent: int, dtype) -> dict:
    """Sizes of the UNet's activations for one row, on the meta device (no values, no cost):
    the sum of every module's outputs and the largest single one."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config).to(dtype)
    sizes = []

    def hook(module, inputs, output):
        outputs = output if isinstance(output, (tuple, list)) else [output]
        for o in outputs:
            o = getattr(o, "sample", o)
            if isinstance(o, torch.Tensor):
                sizes.append(o.numel() * o.element_size())
    handles = [m.register_forward_hook(hook) for m in unet.modules() if not list(m.children())]
    with torch.no_grad():
        unet(torch.empty(1, 4, latent, latent, device="meta", dtype=dtype),
             torch.tensor([500.0], device="meta"),
             encoder_hidden_states=torch.empty(1, 77, config["cross_attention_dim"],
                                               device="meta", dtype=dtype))
    for handle in handles:
        handle.remove()
    return {"sum": sum(sizes), "largest": max(sizes)}


PEAK_CHILD = r"""
import gc, json, os, sys, torch
if os.environ.get("LDG_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["LDG_BENCH_THREADS"]))
from benchmarks.sd_model import SD15, TINY, build_unet
config, rows, latent = json.loads(sys.argv[1])
unet = build_unet(SD15 if config == "sd15" else TINY)
inputs = (torch.randn(rows, 4, latent, latent), torch.full((rows,), 500.0),
          torch.randn(rows, 77, unet.config.cross_attention_dim))

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
gc.collect()
with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak RSS, to the current RSS
    f.write("5")
before = status("VmRSS:")
with torch.no_grad():
    unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2])
print(json.dumps({"before": before, "peak": status("VmHWM:")}))
"""


def peak_rss(config: str, rows: int, latent: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PEAK_CHILD, json.dumps([config, rows, latent])],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rows_per_call(setup: Setup, batch: int, n: int, limit: int) -> List[int]:
    tiny = BenchSD(build_unet(TINY, device=setup.device))
    shared.opts.ldg_max_rows_per_call = limit
    try:
        with RowCounter(tiny) as counter:
            generation(setup, batch=batch, steps=1, model=tiny,
                       args=h.script_args(concepts(n), momentum_scale=0.1))()
    finally:
        shared.opts.ldg_max_rows_per_call = 0
    return counter.rows


def cuda_peak(setup: Setup, batch: int, n: int, limit: int) -> int:
    run = generation(setup, batch=batch, steps=1, args=h.script_args(concepts(n)))
    shared.opts.ldg_max_rows_per_call = limit
    try:
        run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    finally:
        shared.opts.ldg_max_rows_per_call = 0


def table_memory(setup: Setup) -> Table:
    table = Table("5. Peak memory vs N, with and without a row limit",
                  ["B", "N", "limit", "model calls per step (rows)", "largest call (rows)",
                   "activations of the largest call, fp32 / fp16 (MiB)",
                   "peak RSS of that call (MiB)" if not setup.cuda else "GPU peak (MiB)"])
    config = setup.unet_config
    per_row = {dtype: activation_sizes(config, setup.latent, dtype)
               for dtype in (torch.float32, torch.float16)}
    config_name = "tiny" if setup.quick else "sd15"
    peaks: Dict[int, dict] = {}
    for batch in ((1, 2) if setup.cuda or setup.quick else (1,)):
        for n in setup.concept_counts:
            for limit in (0, 2 * batch):
                rows = rows_per_call(setup, batch, n, limit)
                largest = max(rows)
                acts = " / ".join(f"{per_row[d]['sum'] * largest / 2 ** 20:.0f}"
                                  for d in (torch.float32, torch.float16))
                if setup.cuda:
                    peak = f"{cuda_peak(setup, batch, n, limit) / 2 ** 20:.0f}"
                elif setup.quick or largest in (2 * batch, (2 + max(setup.concept_counts)) * batch):
                    if largest not in peaks:  # on a CPU, only the smallest and largest calls
                        peaks[largest] = peak_rss(config_name, largest, setup.latent)
                    got = peaks[largest]
                    peak = (f"{got['peak'] / 2 ** 20:.0f} (+{(got['peak'] - got['before']) / 2 ** 20:.0f}"
                            " over the model)")
                else:
                    peak = "not run (CPU time)"
                table.rows.append([batch, n, limit or "0 (none)", f"{len(rows)} ({'+'.join(map(str, rows))})",
                                   largest, acts, peak])
    weights = sum(p.numel() * p.element_size() for p in setup.model().unet.parameters())
    table.notes += [
        f"The limit is the Settings' \"Max rows per UNet call\"; here 2 x B, the WebUI's own call, "
        "so no call is larger than a generation without guidance. Calls and rows are counted "
        f"through the WebUI double (one Euler step). Activations: the sum of every UNet "
        f"module's output for one row at {setup.latent}x{setup.latent}, measured on the meta "
        f"device ({per_row[torch.float32]['sum'] / 2 ** 20:.0f} MiB fp32 per row; largest single "
        f"tensor {per_row[torch.float32]['largest'] / 2 ** 20:.1f} MiB), times the rows of the "
        "largest call: an upper bound of what a call holds at once, linear in its rows.",
        f"UNet weights: {weights / 2 ** 20:.0f} MiB in fp32."]
    sizes = Table("5b. Activations per row by latent size (meta device: shapes only)",
                  ["latent", "dtype", "sum of module outputs per row (MiB)",
                   "largest single tensor (MiB)"])
    for latent in sorted({setup.latent, 64, 96, 128} if not setup.quick else {setup.latent}):
        for dtype in (torch.float32, torch.float16):
            a = activation_sizes(config, latent, dtype)
            sizes.rows.append([f"{latent}x{latent}", str(dtype).replace("torch.", ""),
                               f"{a['sum'] / 2 ** 20:.0f}", f"{a['largest'] / 2 ** 20:.1f}"])
    table.notes.append(sizes.markdown())
    if not setup.cuda:
        table.notes.append(
            "CPU: peak RSS (VmHWM, reset after the UNet is built) of a fresh process running one "
            "forward of that many rows, and how much of it the forward added over the resident "
            "model; on the CPU only the smallest and largest calls are run. It is a CPU process "
            "figure, not VRAM. The GPU "
            "figure (torch.cuda.max_memory_allocated of a guided step through the double) needs "
            "`--device cuda`; no GPU was available for this run.")
    return table


# -- table 6: against the reference pipeline -------------------------------------------------

def reference_pipeline(setup: Setup, unet):
    from transformers import CLIPTextConfig, CLIPTextModel
    from tests.reference_pipeline import _tokenizer, semantic_pipeline
    tokenizer, vocab = _tokenizer()
    dim = unet.config.cross_attention_dim
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=dim, num_hidden_layers=1,
        num_attention_heads=max(dim // 64, 1), max_position_embeddings=77, bos_token_id=0,
        eos_token_id=1, pad_token_id=1)).to(setup.device)
    return semantic_pipeline(unet, text_encoder, tokenizer)


def table_reference(setup: Setup) -> Table:
    n, batch = 2, 1
    steps = 3 if setup.quick else (2 if not setup.cuda else 20)
    table = Table("6. Against the reference pipeline (same UNet, DDIM, N = 2, B = 1)",
                  ["side", "UNet calls", "rows per call", "time per UNet call: ours / reference"])
    model = setup.model()
    pipe = reference_pipeline(setup, model.unet)
    made = concepts(n)
    counted = {}

    def reference():
        calls = []
        shapes = counted.setdefault("shapes", set())

        def hook(module, args, kwargs):
            calls.append(args[0].shape[0])
            shapes.add(tuple(args[0].shape[1:]))
        hook = model.unet.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            size = setup.latent * pipe.vae_scale_factor  # the stand-in VAE downsamples by 2
            pipe(prompt="a photo of a cat", height=size, width=size,
                 num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
                 generator=torch.Generator().manual_seed(0),
                 editing_prompt=[c["prompt"] for c in made],
                 reverse_editing_direction=[False] * n, edit_guidance_scale=[5.0] * n,
                 edit_threshold=[0.9] * n, edit_warmup_steps=[0] * n,
                 edit_cooldown_steps=[steps + 1] * n, edit_weights=[1.0] * n,
                 edit_momentum_scale=0.1, edit_mom_beta=0.4)
        finally:
            hook.remove()
        counted["reference"] = calls

    ours_run = generation(setup, batch=batch, steps=steps, sampler="DDIM",
                          args=h.script_args(made, momentum_scale=0.1))

    def ours():
        with RowCounter(model) as counter:
            ours_run()
        counted["ours"] = counter.rows

    times = interleaved({"reference": reference, "ours": ours}, setup.repeats, setup.device,
                        warmup=True if setup.cuda or setup.quick else ("reference",))
    ref_calls, our_calls = len(counted["reference"]), len(counted["ours"])
    per_ref = [t / ref_calls for t in times["reference"]]
    per_ours = [t / our_calls for t in times["ours"]]
    assert counted["shapes"] == {(4, setup.latent, setup.latent)}, counted["shapes"]
    table.rows.append(["diffusers SemanticStableDiffusionPipeline", ref_calls,
                       sorted(set(counted["reference"])), ""])
    table.rows.append(["ours, through the WebUI double", our_calls, sorted(set(counted["ours"])),
                       ratio(per_ours, per_ref)])
    table.notes += [
        f"{steps} DDIM steps each, latents returned (no VAE decode on either side), every concept "
        "active at every step (warmup 0) so both evaluate the same rows; model calls are "
        "counted on each side and the time is compared per call. The pipeline's text encoder "
        "is a 1-layer CLIP of the UNet's width; ours is a table of word vectors; both are "
        "negligible next to the UNet. The reference also evaluates every concept at every step "
        "regardless of warmup and cooldown (see table 2 for what skipping saves), and copies "
        "every estimate to the CPU each step (free when everything is on the CPU)."]
    return table


# -- profile ---------------------------------------------------------------------------------

# -- table 7: Forge's separate call vs batched rows ---------------------------------------

def table_host_calls(setup: Setup) -> Table:
    """What a step of UNet work costs on each host, on the same UNet: A1111 and reForge put
    the concepts' rows in the host's own model call (2B + KB rows), lllyasviel's Forge and
    Forge Neo evaluate them in a call of their own after it (2B, then KB rows; the call
    patterns are pinned in tests/test_forge.py and tests/test_reforge.py)."""
    table = Table("7. Forge's separate concept call vs the batched rows of A1111 and reForge",
                  ["B", "concepts", "A1111 / reForge: rows per call", "Forge: rows per call",
                   "Forge time / batched (median, min-max)", "batched ms", "Forge ms"])
    for b in setup.batches:
        for n in setup.concept_counts:
            batched = ideal_forward(setup, (2 + n) * b)
            prompt, concepts_alone = ideal_forward(setup, 2 * b), ideal_forward(setup, n * b)

            def separate():
                prompt()
                return concepts_alone()
            times = interleaved({"batched": batched, "separate": separate}, setup.repeats,
                                setup.device)
            table.rows.append([b, n, (2 + n) * b, f"{2 * b} + {n * b}",
                               ratio(times["separate"], times["batched"]),
                               ms(times["batched"]), ms(times["separate"])])
    table.notes.append("Same rows, same UNet, timed side by side: the difference is only the "
                       "second call (its launch, and a batch the hardware fills less well).")
    return table


# -- table 8: img2img keeping the image (LEDITS++ inversion) --------------------------------

def img2img(setup: Setup, *, sampler: str, steps: int, strength: float, args, counter=None):
    """A function that runs one img2img generation (args None: no extension at all)."""
    g = torch.Generator().manual_seed(3)
    init = torch.randn(1, 4, setup.latent, setup.latent, generator=g).to(setup.device)

    def count_maps(p):
        if counter is not None:
            counter["maps"] = Generation.of(p).noise_map_bytes
    return generation(setup, batch=1, steps=steps, args=args, sampler=sampler,
                      p_extra={"init_latent": init, "denoising_strength": strength},
                      after=count_maps)


def table_inversion(setup: Setup) -> Table:
    """What "Keep the image" costs: the inversion's model calls and the noise maps' memory."""
    from ldg_core.ui_args import KEEP_IMAGE
    table = Table("8. Keep the image (LEDITS++ inversion) vs plain img2img",
                  ["sampler", "steps", "UNet calls: plain / keep", "time: keep / plain",
                   "plain ms", "keep ms", "noise maps (KiB)", "maps / one latent"])
    steps = 4  # DDIM at strength 0.99 of 4 steps takes 2 (its img2img schedule), DPM++ 2M SDE 4
    for sampler in ("DPM++ 2M SDE", "DDIM"):
        keep = h.script_args([])
        keep[KEEP_IMAGE] = True
        counts, maps = {}, {}
        runs = {"plain": img2img(setup, sampler=sampler, steps=steps, strength=0.99, args=None),
                "keep": img2img(setup, sampler=sampler, steps=steps, strength=0.99, args=keep,
                                counter=maps)}
        for name, run in runs.items():
            with UNetTimer(setup.model(), setup.device) as unet:
                run()
            counts[name] = unet.calls
        times = interleaved(runs, setup.repeats, setup.device)
        latent_bytes = 4 * setup.latent * setup.latent * 4
        table.rows.append([sampler, steps, f"{counts['plain']} / {counts['keep']}",
                           ratio(times["keep"], times["plain"]), ms(times["plain"]),
                           ms(times["keep"]), f"{maps['maps'] / 1024:.0f}",
                           f"{maps['maps'] / latent_bytes:.0f}"])
    table.notes.append(
        "img2img at denoising strength 0.99 through the WebUI double, B = 1, no concept (the "
        "inversion's cost does not depend on the concepts). Keep: one CFG denoiser call per "
        "step runs the inversion before sampling (the WebUI's CFG: prompt and negative rows, "
        "so twice the plain run's UNet calls), then the same sampling. Noise maps: the inverted "
        "start, one map per step with noise (DPM++ 2M SDE's last step has none; its residual "
        "takes that place), float32, held on the latents' device for the pass and dropped "
        "when sampling ends.")
    return table


def table_attention_mask(setup: Setup) -> Table:
    """What LEDITS++'s cross-attention masks cost over its noise mask."""
    from ldg_core.ui_args import KEEP_IMAGE, KEEP_IMAGE_MASK
    table = Table("9. Keep the image: cross-attention masks vs the noise mask",
                  ["sampler", "concepts", "time: attention / noise", "time: both / noise",
                   "noise ms", "attention ms", "both ms"])
    steps = 4
    for sampler in ("DPM++ 2M SDE", "DDIM"):
        for count in (1, 2):
            runs = {}
            for mask in ("noise", "attention", "both"):
                args = h.script_args(concepts(count))
                args[KEEP_IMAGE], args[KEEP_IMAGE_MASK] = True, mask
                runs[mask] = img2img(setup, sampler=sampler, steps=steps, strength=0.99,
                                     args=args)
            times = interleaved(runs, setup.repeats, setup.device)
            table.rows.append([sampler, count, ratio(times["attention"], times["noise"]),
                               ratio(times["both"], times["noise"]), ms(times["noise"]),
                               ms(times["attention"]), ms(times["both"])])
    table.notes.append(
        "img2img with Keep the image at denoising strength 0.99 through the WebUI double, "
        "B = 1, concepts acting at every step. The attention masks recompute each concept "
        "row's query and key projections in the cross-attention layers at the latents' "
        "resolution / 4 (SD 1.5: 2 down + 3 up layers) and its attention probabilities there, "
        "then smooth and threshold a map of (H/4) x (W/4); the UNet's own attention kernels "
        "run unchanged. The inversion is the same in all three.")
    return table


def profile(setup: Setup, top: int = 14) -> str:
    """cProfile of one guided generation (N = 2, B = 1, `setup.steps` Euler steps): the top
    entries by cumulative time, then the extension's own functions."""
    run = generation(setup, batch=1, steps=setup.steps, args=h.script_args(concepts(2)))
    run()
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    parts = []
    for restriction in ([top], ["ldg_core|latent_diffusion_guidance", top]):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(*restriction)
        lines = [line for line in text.getvalue().splitlines() if line.strip()]
        start = next(i for i, line in enumerate(lines) if "ncalls" in line)
        parts.append("\n".join([lines[0].strip()] + lines[start:]))
    return "\n\n".join(parts)


# -- the report ------------------------------------------------------------------------------

def machine(setup: Setup) -> List[str]:
    import diffusers
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if setup.cuda else f"CPU, {os.cpu_count()} cores"
    return [f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- Machine: {cpu}, {os.cpu_count()} logical cores, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}",
            f"- Device: {device}; dtype float32 unless a table says otherwise; torch threads "
            f"{torch.get_num_threads()}",
            f"- torch {torch.__version__}, diffusers {diffusers.__version__}",
            f"- Model: {setup.model_name}, latents {setup.latent}x{setup.latent} "
            f"({setup.latent * 8} px); {setup.repeats} interleaved repeats after one warm-up "
            "unless a table says otherwise; ratios are the median (min-max) of per-repeat ratios",
            f"- Command: `{setup.command}`"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny UNet, one repeat (smoke test)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    parser.add_argument("--only", default="", help="comma-separated table numbers, e.g. 1,2")
    parser.add_argument("--profile", action="store_true", help="also profile one guided generation")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=0, help="override the repeats")
    parser.add_argument("--latent", type=int, default=0, help="override the latent side")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["LDG_BENCH_THREADS"] = str(args.threads)  # for the child processes
    setup = make_setup(args.quick, args.device)
    if args.repeats:
        setup.repeats = args.repeats
    if args.latent:
        setup.latent = args.latent
        setup.math_latents = tuple(sorted({args.latent, *setup.math_latents}))
    setup.command = " ".join(["python -m benchmarks.run"] + (argv if argv is not None else sys.argv[1:]))
    only = {int(x) for x in args.only.split(",") if x}
    started = time.perf_counter()
    collected: dict = {}
    builders = [(1, lambda: table_overhead(setup, collected)), (2, lambda: table_rows_saved(setup)),
                (3, lambda: table_math_share(setup, collected)), (4, lambda: table_disabled(setup)),
                (5, lambda: table_memory(setup)), (6, lambda: table_reference(setup)),
                (7, lambda: table_host_calls(setup)), (8, lambda: table_inversion(setup)),
                (9, lambda: table_attention_mask(setup))]
    sections = []
    for number, build in builders:
        if only and number not in only:
            continue
        table = build()
        text = table.markdown()
        print(text, flush=True)
        sections.append(text)
    if args.profile:
        text = "## Profile of one guided generation (cProfile, cumulative)\n\n```\n" + profile(setup) + "\n```\n"
        print(text, flush=True)
        sections.append(text)
    elapsed = time.perf_counter() - started
    header = ["# Benchmark results", ""] + machine(setup) + [f"- Run time: {elapsed:.0f} s", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(header) + "\n" + "\n".join(sections))
    print(f"written to {args.out} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
