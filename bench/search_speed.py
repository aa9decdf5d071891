"""Step throughput and peak activation memory: search steps, fused kernels vs the pure-PyTorch
twin (--no-fused), on the NB201, DARTS and PC-DARTS spaces and with GAEA-GDAS; and the
DARTS evaluation network's training step.

Cases (--cases, default all; sizes are the papers' unless overridden):
  nb201    NB201 supernet, C=16, N=5 cells per stage, batch 64 at 32x32; GAEA single-level.
  darts    DARTS supernet, C=16, 8 cells, 8 ops (none included), batch 64; GAEA single-level.
  pcdarts  PC-DARTS supernet (1/K=1/4 of the channels through the mixed op, edge weights),
           C=16, 8 cells, batch 256; GAEA bilevel.
  gdas     DARTS supernet as `darts`, GAEA-GDAS (bilevel): one sampled op per edge is computed.
           Reported also as images/s relative to `darts` (same path, same batch).
  train    the DARTS evaluation network (gaea_ext.train.network.NetworkCIFAR), DARTS_V2 cell,
           C=36, 20 layers, auxiliary head (weight 0.4), drop path 0.2, cutout 16, batch 96.
           It has no mixed ops, so it is measured once (path "-"). Skipped with a message when
           gaea_ext.train cannot be imported.

A search step is exactly what `gaea search` runs per minibatch: Search.arch_step on its own
batch (an independent training batch single-level, the held-out batch bilevel: the same work)
then Search.weight_step, called on the real code with a stand-in for the Search object (no
data loaders). The train step is Trainer.step, the same way. Both paths of a case are built
from the same seed and fed the same tensors; timed steps are interleaved (A B A B ...) so
machine noise hits both alike, and every step reseeds the global RNG with its index, so
GDAS's samples and drop path's masks are the same on both paths.

Columns: images/s = batch / median step seconds (the images the weight step trains on, as
`gaea search` and `gaea train` count them; a search step also reads an architecture batch).
Peak memory, on CUDA: max_memory_allocated during one step minus what was allocated before
it. On CPU: bytes of the tensors autograd saves during the largest forward of the step
(saved_tensors_hooks on the network's forward; each storage counted once; parameters and
buffers excluded): the activation memory the two paths differ in.

    # GPU, the papers' sizes:
    python bench/search_speed.py --device cuda --markdown-out bench/RESULTS.md
    # 2 CPU cores, about 10 minutes (smaller batches; the DARTS supernet is slow on a CPU):
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296 \\
      .venv/bin/python bench/search_speed.py --device cpu --steps 6 --warmup 1 \\
      --batch 16,nb201=64,pcdarts=64,train=32 --markdown-out bench/RESULTS.md
    # seconds, toy sizes, every case: does it still run?
    .venv/bin/python bench/search_speed.py --smoke --device cpu

bench/host_cost.py reuses `search_path` to count the ops a step dispatches and to time it on
tiny, host-bound inputs (issue 11).

Overrides take a value for every case or case=value pairs: --batch 32, --batch pcdarts=64,
--batch 16,pcdarts=64 (the bare value for all, pairs for the named). --smoke runs every case
at toy sizes (seconds), to check that the script and the steps it calls still work.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, replace
from itertools import chain
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

import torch

from gaea_ext.precision import Precision
from gaea_ext.search import faults
from gaea_ext.search.config import SearchConfig
from gaea_ext.search.loop import Search
from gaea_ext.search.methods import METHOD_ARCH_LR, make_method
from gaea_ext.spaces import build_network
from report import machine, emit

CASES = ("nb201", "darts", "pcdarts", "gdas", "train")
NUM_CLASSES = 10


@dataclass
class Case:
    name: str
    batch: int
    channels: int
    cells: int
    resolution: int = 32
    space: Optional[str] = None  # None: the train case
    method: str = "gaea"
    bilevel: bool = False
    partial: int = 1

    def setup(self) -> str:
        size = f"batch {self.batch}, {self.resolution}x{self.resolution}"
        if self.name == "nb201":
            return f"NB201 C={self.channels} N={self.cells}, GAEA single-level, {size}"
        if self.name == "darts":
            return f"DARTS C={self.channels} {self.cells} cells, GAEA single-level, {size}"
        if self.name == "pcdarts":
            return f"PC-DARTS K={self.partial} C={self.channels} {self.cells} cells, GAEA bilevel, {size}"
        if self.name == "gdas":
            return f"DARTS C={self.channels} {self.cells} cells, GAEA-GDAS bilevel, {size}"
        return (f"NetworkCIFAR DARTS_V2 C={self.channels} {self.cells} layers, aux 0.4, drop path 0.2, "
                f"cutout 16, {size}")


DEFAULTS: Dict[str, Case] = {
    "nb201": Case("nb201", batch=64, channels=16, cells=5, space="nb201"),
    "darts": Case("darts", batch=64, channels=16, cells=8, space="darts"),
    "pcdarts": Case("pcdarts", batch=256, channels=16, cells=8, space="pcdarts", bilevel=True, partial=4),
    "gdas": Case("gdas", batch=64, channels=16, cells=8, space="darts", method="gaea-gdas", bilevel=True),
    "train": Case("train", batch=96, channels=36, cells=20),
}
# --smoke: toy sizes that still build every kind of cell (3 DARTS cells: 1 normal, 2 reduction;
# PC-DARTS channels divisible by K at every width).
SMOKE = {
    "nb201": dict(batch=4, channels=4, cells=1, resolution=16),
    "darts": dict(batch=4, channels=4, cells=3, resolution=16),
    "pcdarts": dict(batch=8, channels=4, cells=3, resolution=16),
    "gdas": dict(batch=4, channels=4, cells=3, resolution=16),
    "train": dict(batch=4, channels=8, cells=3, resolution=16),
}


def per_case(text: Optional[str], flag: str) -> Dict[str, int]:
    """'32' -> every case 32; 'pcdarts=64' -> that case; '16,pcdarts=64' -> both."""
    out: Dict[str, int] = {}
    if not text:
        return out
    for item in text.split(","):
        name, _, value = item.strip().rpartition("=")
        if name and name not in CASES:
            raise SystemExit(f"{flag}: unknown case {name!r}; cases: {', '.join(CASES)}")
        try:
            n = int(value)
        except ValueError:
            raise SystemExit(f"{flag}: {item!r} is not N or case=N") from None
        if n < 1:
            raise SystemExit(f"{flag}: {item!r} must be >= 1")
        for c in ([name] if name else CASES):
            if name or c not in out:
                out[c] = n
    return out


# -- steps: the real ones, on a stand-in object ---------------------------------------------

def search_path(case: Case, fused: bool, args, device: torch.device):
    """(network, step(x, y, xa, ya)) running Search.step (arch_step, then weight_step), with the
    weight optimizer `gaea search` builds (fused SGD, which skips non-finite steps on the device)."""
    torch.manual_seed(0)
    cfg = SearchConfig(space=case.space, method=case.method, batch_size=case.batch, channels=case.channels,
                       cells=case.cells, exclude_none=case.space == "nb201", partial=case.partial, stem="cifar",
                       bilevel=case.bilevel, arch_lr=METHOD_ARCH_LR[case.method], amp=args.amp,
                       channels_last=args.channels_last, fused=fused, device=str(device))
    model = build_network(cfg.space, channels=cfg.channels, cells=cfg.cells, num_classes=NUM_CLASSES, in_channels=3,
                          exclude_none=cfg.exclude_none, fused=fused, partial=cfg.partial, stem=cfg.stem).to(device)
    method = make_method(cfg.method, model.arch_spec(), arch_lr=cfg.arch_lr, arch_eps=cfg.arch_eps, fused=fused,
                         seed=cfg.seed, edge_lr=cfg.edge_lr, gdas_kl=cfg.gdas_kl,
                         tau=(cfg.tau_max, cfg.tau_min)).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    w_opt = faults.weight_optimizer(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    s = SimpleNamespace(cfg=cfg, model=model, method=method, w_opt=w_opt, forward=model,  # eager, as Search
                        prec=Precision(cfg.amp, device, cfg.channels_last))         # without --compile
    s.weights = lambda: Search.weights(s)
    # What Search.__init__ sets for the non-finite guard (a step counts its verdict on the
    # device, as in a run) and the epoch sums (None: outside an epoch, so no architecture skip
    # counting).
    s.world, s.sums, s.ok = 1, None, None
    s.guard = faults.Guard(cfg.checkpoint_every, cfg.max_nonfinite, device)
    s.buffers = faults.Buffers(model)
    s.arch_update = lambda params, ok=None: Search.arch_update(s, params, ok)
    s.arch_step = lambda xa, ya: Search.arch_step(s, xa, ya)
    s.weight_step = lambda x, y, arch_too=False: Search.weight_step(s, x, y, arch_too)
    model.train()
    method.train()
    method.set_epoch(0, cfg.epochs)

    def step(x, y, xa, ya):
        Search.step(s, False, x, y, xa, ya)

    return model, step


def train_path(case: Case, args, device: torch.device):
    """(network, step(x, y, i)) running Trainer.step; raises ImportError without gaea_ext.train."""
    from gaea_ext.spaces.genotypes import NAMED
    from gaea_ext.train.config import TrainConfig
    from gaea_ext.train.loop import Trainer
    from gaea_ext.train.network import NetworkCIFAR

    torch.manual_seed(0)
    cfg = TrainConfig(genotype="DARTS_V2", batch_size=case.batch, channels=case.channels, layers=case.cells,
                      cutout=16, auxiliary_weight=0.4, drop_path=0.2, amp=args.amp,
                      channels_last=args.channels_last, device=str(device))
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = NetworkCIFAR(cfg.channels, NUM_CLASSES, cfg.layers, True, NAMED["DARTS_V2"]).to(device, memory_format=fmt)
    model.drop_path_prob = cfg.drop_path
    model.train()
    params = list(model.parameters())
    prec = Precision(cfg.amp, device, cfg.channels_last)
    # What Trainer.__init__ sets and Trainer.step reads (precision both as a Precision and as
    # the dtype/scaler pair an earlier Trainer used), without its data loaders.
    t = SimpleNamespace(cfg=cfg, epoch=0, rank=0, world=1, device=device, model=model, params=params,
                        memory_format=fmt, prec=prec, amp_dtype=prec.dtype, scaler=prec.scaler,
                        opt=faults.weight_optimizer(params, cfg.lr, cfg.momentum, cfg.weight_decay))
    t.autocast = prec.autocast
    t.guard = faults.Guard(cfg.checkpoint_every, cfg.max_nonfinite, device)
    t.buffers = faults.Buffers(model)

    def step(x, y, i):
        Trainer.step(t, x, y, i)

    return model, step


# -- measuring --------------------------------------------------------------------------------

class SavedBytes:
    """Bytes autograd saves during each forward of ``model`` (each storage once, parameters and
    buffers excluded); ``peak`` is the largest forward's."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.forwards: List[int] = []
        self.current: Optional[Dict[int, int]] = None

    def __enter__(self):
        own = {t.untyped_storage().data_ptr() for t in chain(self.model.parameters(), self.model.buffers())}

        def pack(t):
            if self.current is not None:
                st = t.untyped_storage()
                if st.data_ptr() not in own:
                    self.current[st.data_ptr()] = st.nbytes()
            return t

        def pre(*_):
            self.current = {}

        def post(*_):
            self.forwards.append(sum(self.current.values()))
            self.current = None

        self.handles = [self.model.register_forward_pre_hook(pre), self.model.register_forward_hook(post)]
        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        for h in self.handles:
            h.remove()

    @property
    def peak(self) -> int:
        return max(self.forwards, default=0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(model, run: Callable[[], None], device: torch.device) -> float:
    """One step's peak: CUDA allocation above the baseline, or CPU saved activations."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with SavedBytes(model) as saved:
        run()
    return saved.peak / 2**20


def inputs(case: Case, device: torch.device, n: int):
    g = torch.Generator().manual_seed(0)
    shape = (case.batch, 3, case.resolution, case.resolution)
    out = []
    for _ in range(n):
        out += [torch.randn(shape, generator=g).to(device), torch.randint(0, NUM_CLASSES, (case.batch,), generator=g).to(device)]
    return out


def measure(case: Case, args, device: torch.device) -> Dict[str, Dict[str, float]]:
    """{path: {"step_s": median, "ips": images/s, "mib": peak}} for one case."""
    if case.space is None:
        model, step = train_path(case, args, device)
        x, y = inputs(case, device, 1)
        paths = {"-": (model, lambda i: step(x, y, i))}
    else:
        x, y, xa, ya = inputs(case, device, 2)
        paths = {}
        for name, fused in (("fused", True), ("no-fused", False)):
            model, step = search_path(case, fused, args, device)
            paths[name] = (model, lambda i, step=step: step(x, y, xa, ya))

    def run(name, i):
        torch.manual_seed(1000 + i)  # same GDAS samples / drop-path masks on every path
        paths[name][1](i)

    for i in range(args.warmup):
        for name in paths:
            run(name, i)
    peak = {name: peak_mib(model, lambda: run(name, args.warmup), device) for name, (model, _) in paths.items()}
    times: Dict[str, List[float]] = {name: [] for name in paths}
    for i in range(args.steps):
        for name in paths:
            sync(device)
            start = time.perf_counter()
            run(name, args.warmup + 1 + i)
            sync(device)
            times[name].append(time.perf_counter() - start)
    out = {}
    for name in paths:
        med = statistics.median(times[name])
        out[name] = {"step_s": med, "ips": case.batch / med, "mib": peak[name]}
    return out


# -- the report -------------------------------------------------------------------------------

def table(cases: List[Case], results: Dict[str, object], device: torch.device, argv: List[str]) -> str:
    cpu = device.type == "cpu"
    mem = "saved activations MiB (largest forward)" if cpu else "CUDA peak MiB per step"
    mach = machine() if cpu else torch.cuda.get_device_name(device)
    now = dt.datetime.now(dt.timezone.utc)
    lines = [
        f"### Step speed: {', '.join(c.name for c in cases)}, {device.type} ({now:%Y-%m-%d %H:%M} UTC)", "",
        f"Machine: {mach}; torch {torch.__version__}, {torch.get_num_threads()} threads. "
        f"Command: `python bench/search_speed.py {shlex.join(argv)}`", "",
        f"| case | setup | path | median step s | images/s | speed fused / no-fused | {mem} | memory fused / no-fused |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for c in cases:
        r = results[c.name]
        if isinstance(r, str):
            lines.append(f"| {c.name} | {c.setup()} | | | | | | |")
            notes.append(f"{c.name}: {r}")
            continue
        for path, v in r.items():
            speed = memory = ""
            if path == "fused" and "no-fused" in r:
                speed = f"**{v['ips'] / r['no-fused']['ips']:.2f}x**"
                memory = f"**{v['mib'] / r['no-fused']['mib']:.2f}x**" if r["no-fused"]["mib"] else ""
            lines.append(f"| {c.name} | {c.setup()} | {path} | {v['step_s']:.3f} | {v['ips']:.1f} | {speed} | "
                         f"{v['mib']:.1f} | {memory} |")
    darts, gdas = results.get("darts"), results.get("gdas")
    if isinstance(darts, dict) and isinstance(gdas, dict):
        d, g = next(c for c in cases if c.name == "darts"), next(c for c in cases if c.name == "gdas")
        same = (d.batch, d.channels, d.cells, d.resolution) == (g.batch, g.channels, g.cells, g.resolution)
        rel = ", ".join(f"{p} {gdas[p]['ips'] / darts[p]['ips']:.2f}x images/s, "
                        f"{gdas[p]['mib'] / darts[p]['mib']:.2f}x memory" for p in gdas if p in darts and darts[p]['mib'])
        notes.insert(0, f"gdas / darts (only the sampled op vs every op, same path): {rel}"
                        + ("" if same else " (NOT comparable: the two cases ran at different sizes)"))
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="timed steps per path (default 10; --smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per path first (default 2; --smoke 0: the memory step warms up)")
    p.add_argument("--batch", help="batch size: N for every case and/or case=N pairs")
    p.add_argument("--channels", help="initial channels: N and/or case=N")
    p.add_argument("--cells", help="nb201: cells per stage; darts/pcdarts/gdas: cells; train: layers")
    p.add_argument("--resolution", help="image side in pixels (default 32): N and/or case=N")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="autocast dtype, as `gaea search --amp`")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--smoke", action="store_true", help="every case at toy sizes: checks that it runs")
    p.add_argument("--markdown-out", help="append the dated table to this markdown file (bench/RESULTS.md)")
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 2)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    bad = [n for n in names if n not in CASES]
    if bad or not names:
        p.error(f"--cases: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(CASES)}")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    over = {k: per_case(getattr(args, k), f"--{k}") for k in ("batch", "channels", "cells", "resolution")}
    cases = []
    for n in names:
        c = replace(DEFAULTS[n], **(SMOKE[n] if args.smoke else {}))
        cases.append(replace(c, **{k: v[n] for k, v in over.items() if n in v}))

    results: Dict[str, object] = {}
    failed = False
    for c in cases:
        print(f"== {c.name}: {c.setup()}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            results[c.name] = measure(c, args, device)
        except ImportError as e:
            if c.space is not None:
                raise
            results[c.name] = f"skipped: gaea_ext.train is not importable ({e})"
        except Exception as e:  # record and go on: one case (say an OOM at batch 256) should not lose the rest
            traceback.print_exc()
            results[c.name] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            failed = True
        print(f"   {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    emit(table(cases, results, device, argv), args.markdown_out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
