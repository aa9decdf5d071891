"""Host cost per search step, fused vs --no-fused: what a GPU would feel of it (issue 11).

On a GPU at the papers' sizes a search step is bound by the host: each op costs a dispatch and
a kernel launch of a few microseconds, about what the device needs to move a 1-4 MB tensor.
This measures, for the NB201 and DARTS spaces, on the real search step (bench/search_speed.py's
`search_path`: Search.step, i.e. arch_step then weight_step):

1. Ops dispatched to a backend per step, counted with a TorchDispatchMode around one steady-state
   step (after one warm-up step, so lazily made state, e.g. Adam's, exists). The count does not depend on
   tensor sizes, only on the network's structure, so it runs at the papers' cell counts with
   tiny tensors. Rule:
   - counted: every op that reaches the mode, i.e. below autograd, after CompositeImplicit ops
     have decomposed: aten compute ops, copies and fills (copy_, clone, _to_copy, zeros, ones,
     fill_, zero_), in-place and out= ops, foreach ops (one each), item() (_local_scalar_dense,
     a sync on a GPU), and the C++ custom ops of gaea_ext (torch.ops.gaea.*, one each);
   - descended into, not counted: custom ops whose kernel is Python (torch.library.custom_op,
     e.g. today's gaea::mixed_op_bn): the aten ops their Python body issues are counted one by
     one, as a GPU would launch each;
   - excluded as views (metadata only, no kernel): ops with torch.Tag.inplace_view, ops that
     write none of their arguments and return an alias of one (schema alias info: view,
     expand, select, slice, split, unbind, as_strided, t, permute, detach, alias, ...), and
     aten::_unsafe_view; also the profiler's record_function markers (optimizer steps);
   - excluded as pure allocations (uninitialised memory, no kernel): aten::empty, empty_strided,
     empty_like, new_empty, new_empty_strided.
   Each op is also labelled with its phase: upd (inside an optimizer's step(), seen through
   torch.optim's global step hooks, or inside gradient clipping: SGD, the EG update, clip),
   bwd (inside the autograd engine: torch._C._current_graph_task_id() != -1), fwd (the rest).
2. Host-bound step time: the same step on tiny inputs (C=4, 8x8 images, batch 2, the papers'
   cell counts), torch.set_num_threads(1), interleaved repetitions (A B B A ...), medians.
3. The paper-size CPU step, as search_speed.py measures it (images/s and saved activations),
   at the thread count the process has.

For 1 and 2 gradient clipping uses its foreach kernels, as torch picks by default on CUDA (on
CPU it would loop per tensor; those ops are the same on both paths); the weight step's SGD is
the fused one `gaea search` uses on every device (it skips a non-finite step on the device).
3 runs exactly as `gaea search` does on a CPU.

    .venv/bin/python bench/host_cost.py                       # ~5 min on 2 cores
    .venv/bin/python bench/host_cost.py --paper-steps 0       # counts and host time only (~1-2 min)
    .venv/bin/python bench/host_cost.py --smoke               # seconds: does it still run?
    .venv/bin/python bench/host_cost.py --markdown-out bench/RESULTS.md

The process's malloc is left as it is unless --tune-malloc (what the `gaea` command does,
gaea_ext.allocator) or GLIBC_TUNABLES; the table says which.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import os
import shlex
import statistics
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import emit, machine  # noqa: E402
from search_speed import DEFAULTS, Case, inputs, measure, per_case, search_path  # noqa: E402

CASES = ("nb201", "darts")
PHASES = ("fwd", "bwd", "upd")
ALLOCATIONS = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
               "aten::new_empty_strided"}
METADATA_ONLY = {"aten::_unsafe_view"}  # a view whose schema does not say so
# --smoke: the fewest cells that still build every kind of cell.
SMOKE_CELLS = {"nb201": 1, "darts": 3}


# -- counting -----------------------------------------------------------------------------------

def op_kind(func) -> str:
    """'view', 'alloc' or 'op' (see the module docstring for the rule)."""
    schema = func._schema
    if schema.name in ALLOCATIONS:
        return "alloc"
    if func.namespace == "profiler":  # record_function markers: no kernel
        return "view"
    if schema.name in METADATA_ONLY or torch.Tag.inplace_view in func.tags:
        return "view"
    writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    if not writes and any(r.alias_info is not None for r in schema.returns):
        return "view"
    return "op"


def python_kernel(func, args, kwargs):
    """The Python function implementing a torch.library.custom_op for these inputs' device,
    or None (C++ kernels, aten ops)."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # private API moved: count such ops as one
        return None
    opdef = OPDEFS.get(func._schema.name)
    if opdef is None:
        return None
    tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    device = tensors[0].device.type if tensors else None
    return opdef._backend_fns.get(device, opdef._backend_fns.get(None))




def source() -> str:
    """The innermost gaea_ext line on the Python stack ('bn_mixed.py:62 _mixed_op_bn'), or what
    else issued the op: the autograd engine (a C++ backward formula or gradient accumulation),
    a torch Python function."""
    frames = traceback.extract_stack()[:-3]  # drop source(), __torch_dispatch__ and the mode's caller
    for f in reversed(frames):
        if f.name == "_engine_run_backward":  # reached the engine's entry first: a C++ formula
            return "autograd engine (C++ formulas, accumulation)"
        if f"{os.sep}gaea_ext{os.sep}" in f.filename:
            return f"{f.filename.rsplit(os.sep + 'gaea_ext' + os.sep, 1)[1]}:{f.lineno} {f.name}"
    for f in reversed(frames):
        if f"{os.sep}torch{os.sep}" in f.filename and "_python_dispatch" not in f.filename:
            return f"torch/{f.filename.rsplit(os.sep + 'torch' + os.sep, 1)[1]} {f.name}"
    return "autograd C++ (no Python frame)"


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched below autograd while active: `ops[(phase, name)]`, with views,
    allocations and the Python-kernel custom ops descended into kept apart."""

    def __init__(self, where: bool = False):
        super().__init__()
        self.where = where  # also record where each counted op was called from (slower)
        self.sources: Dict[str, Counter] = {}
        self.inside = 0  # > 0 while running a Python-kernel custom op's body
        self.in_python_ops = 0  # ops counted inside such bodies
        self.ops: Counter = Counter()
        self.views: Counter = Counter()
        self.allocs: Counter = Counter()
        self.descended: Counter = Counter()
        self.updating = 0  # > 0 inside an optimizer's step() or gradient clipping

    def phase(self) -> str:
        if self.updating:
            return "upd"
        return "bwd" if torch._C._current_graph_task_id() != -1 else "fwd"

    def _enter_update(self, *_):
        self.updating += 1

    def _leave_update(self, *_):
        self.updating -= 1

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._hooks = [register_optimizer_step_pre_hook(self._enter_update),
                       register_optimizer_step_post_hook(self._leave_update)]
        clip = self._clip = torch.nn.utils.clip_grad_norm_

        def clip_marked(*a, **k):
            self._enter_update()
            try:
                return clip(*a, **k)
            finally:
                self._leave_update()

        torch.nn.utils.clip_grad_norm_ = clip_marked
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        torch.nn.utils.clip_grad_norm_ = self._clip
        for h in self._hooks:
            h.remove()
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        fn = python_kernel(func, args, kwargs)
        if fn is not None:
            self.descended[name] += 1
            self.inside += 1
            try:
                with _reentered(self):  # the mode is popped while we run; push it again to see the body's ops
                    return fn(*args, **kwargs)
            finally:
                self.inside -= 1
        kind = op_kind(func)
        {"op": self.ops, "view": self.views, "alloc": self.allocs}[kind][(self.phase(), name)] += 1
        if kind == "op":
            self.in_python_ops += self.inside > 0
            if self.where:
                self.sources.setdefault(name, Counter())[source()] += 1
        return func(*args, **kwargs)

    def total(self, which: Optional[str] = None) -> int:
        return sum(n for (ph, _), n in self.ops.items() if which is None or ph == which)

    def by_name(self) -> Counter:
        out: Counter = Counter()
        for (_, name), n in self.ops.items():
            out[name] += n
        return out


@contextlib.contextmanager
def _reentered(mode: TorchDispatchMode):
    """Push `mode` again from inside its own __torch_dispatch__ (TorchDispatchMode.__enter__,
    without the hooks OpCounter.__enter__ adds)."""
    TorchDispatchMode.__enter__(mode)
    try:
        yield
    finally:
        TorchDispatchMode.__exit__(mode, None, None, None)


@contextlib.contextmanager
def cuda_like_foreach():
    """Gradient clipping with its foreach kernels (torch's default on CUDA, not on CPU)."""
    orig = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = partial(orig, foreach=True)
    try:
        yield
    finally:
        torch.nn.utils.clip_grad_norm_ = orig


def edges(model: torch.nn.Module) -> int:
    return sum(1 for m in model.modules() if type(m).__name__ == "MixedOp")


def tiny_step(case: Case, fused: bool, args):
    """(model, step()) on the tiny inputs, clipping with foreach kernels."""
    device = torch.device("cpu")
    model, step = search_path(case, fused, args, device)
    x, y, xa, ya = inputs(case, device, 2)

    def run():
        with cuda_like_foreach():
            step(x, y, xa, ya)

    return model, run


def count(case: Case, fused: bool, args, where: bool = False) -> OpCounter:
    torch.manual_seed(1000)
    _, run = tiny_step(case, fused, args)
    run()  # warm-up: optimizers make their state lazily on the first step
    torch.manual_seed(1001)
    with OpCounter(where) as c:
        run()
    return c


def cuda_launches(case: Case, fused: bool, args) -> int:
    """Kernels the GPU runs in one steady-state search step at the case's own sizes (CUDA only):
    device-side events of the profiler (kernels, memcpys, memsets), after one warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda")
    torch.manual_seed(1000)
    _, step = search_path(case, fused, args, device)
    x, y, xa, ya = inputs(case, device, 2)
    step(x, y, xa, ya)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(x, y, xa, ya)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def host_times(case: Case, args, mkldnn: bool = True) -> Dict[str, float]:
    """Median seconds per tiny step, one thread, interleaved A B B A ... mkldnn=False runs the
    convolutions on ATen's plain CPU kernels instead of oneDNN, whose fixed cost per call
    (~50-70 us for a 2x4x8x8 conv here, the same on both paths) is a CPU library's, not a
    dispatch cost a GPU launch would have."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    flags = torch.backends.mkldnn.flags(enabled=mkldnn)
    flags.__enter__()
    try:
        runs = {name: tiny_step(case, fused, args)[1] for name, fused in (("fused", True), ("no-fused", False))}
        for i in range(args.host_warmup):
            for name, run in runs.items():
                torch.manual_seed(i)
                run()
        times: Dict[str, List[float]] = {name: [] for name in runs}
        order = list(runs)
        gc.collect()
        for i in range(args.reps):
            for name in (order if i % 2 == 0 else order[::-1]):
                torch.manual_seed(100 + i)
                t = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - t)
        return {name: statistics.median(v) for name, v in times.items()}
    finally:
        flags.__exit__(None, None, None)
        torch.set_num_threads(threads)


# -- the report ---------------------------------------------------------------------------------

@dataclass
class Result:
    case: Case
    tiny: Case
    edges: int = 0
    counts: Dict[str, OpCounter] = field(default_factory=dict)
    host_s: Dict[str, float] = field(default_factory=dict)
    host_plain_s: Dict[str, float] = field(default_factory=dict)  # oneDNN off
    launches: Dict[str, int] = field(default_factory=dict)  # CUDA kernels per step (--launches)
    paper: Optional[Dict[str, Dict[str, float]]] = None
    paper_case: Optional[Case] = None
    reps: int = 0


@dataclass
class SimpleArgs:  # what search_speed.measure reads
    steps: int
    warmup: int
    amp: Optional[str]
    channels_last: bool


def ratio(a: float, b: float) -> str:
    return f"**{a / b:.2f}**" if b else ""


def malloc_state(tuned: Optional[str]) -> str:
    if tuned:
        return f"gaea_ext.allocator.configure() -> {tuned}"
    env = os.environ.get("GLIBC_TUNABLES")
    return f"GLIBC_TUNABLES={env}" if env else "glibc default (not tuned)"


def report(results: List[Result], argv: List[str], tuned: Optional[str], top: int) -> str:
    now = dt.datetime.now(dt.timezone.utc)
    lines = [
        f"### Host cost per step: {', '.join(r.case.name for r in results)} ({now:%Y-%m-%d %H:%M} UTC)", "",
        f"Machine: {machine()}; torch {torch.__version__}; malloc: {malloc_state(tuned)}. "
        f"Command: `python bench/host_cost.py {shlex.join(argv)}`", "",
        "| case | measure | fused | no-fused | fused / no-fused |", "|---|---|---:|---:|---:|",
    ]
    for r in results:
        f, n = r.counts.get("fused"), r.counts.get("no-fused")
        t = r.tiny
        if f and n:
            lines.append(f"| {t.name} | ops dispatched per step ({r.edges} edges) | {f.total()} | {n.total()} | "
                         f"{ratio(f.total(), n.total())} |")
            for ph, what in (("fwd", "forward"), ("bwd", "backward"), ("upd", "updates (clip, SGD, EG)")):
                lines.append(f"| {t.name} | ... {what} | {f.total(ph)} | {n.total(ph)} | {ratio(f.total(ph), n.total(ph))} |")
            if f.descended or n.descended:
                lines.append(f"| {t.name} | ... of which inside Python-kernel custom ops ({', '.join(f.descended) or '-'}) "
                             f"| {f.in_python_ops} | {n.in_python_ops} | |")
            lines.append(f"| {t.name} | (not counted: views / allocations) | {sum(f.views.values())} / "
                         f"{sum(f.allocs.values())} | {sum(n.views.values())} / {sum(n.allocs.values())} | |")
        if r.host_s:
            lines.append(f"| {t.name} | host-bound step ms (C={t.channels}, {t.resolution}x{t.resolution}, batch "
                         f"{t.batch}, 1 thread, median of {r.reps}) | {1e3 * r.host_s['fused']:.1f} | "
                         f"{1e3 * r.host_s['no-fused']:.1f} | {ratio(r.host_s['fused'], r.host_s['no-fused'])} |")
        if r.launches:
            lines.append(f"| {t.name} | CUDA kernels per step (profiler, {r.case.setup()}) | {r.launches['fused']} | "
                         f"{r.launches['no-fused']} | {ratio(r.launches['fused'], r.launches['no-fused'])} |")
        if r.host_plain_s:
            h = r.host_plain_s
            lines.append(f"| {t.name} | ... the same, convolutions on ATen's plain kernels (oneDNN off) | "
                         f"{1e3 * h['fused']:.1f} | {1e3 * h['no-fused']:.1f} | {ratio(h['fused'], h['no-fused'])} |")
        if r.paper:
            p, c = r.paper, r.paper_case
            lines.append(f"| {t.name} | paper-size CPU step images/s ({c.setup()}, {torch.get_num_threads()} threads) | "
                         f"{p['fused']['ips']:.1f} | {p['no-fused']['ips']:.1f} | "
                         f"{ratio(p['fused']['ips'], p['no-fused']['ips'])} |")
            lines.append(f"| {t.name} | ... saved activations MiB | {p['fused']['mib']:.1f} | {p['no-fused']['mib']:.1f} | "
                         f"{ratio(p['fused']['mib'], p['no-fused']['mib'])} |")
    for r in results:
        f, n = r.counts.get("fused"), r.counts.get("no-fused")
        if not (f and n):
            continue
        fb, nb = f.by_name(), n.by_name()
        names = [k for k, _ in fb.most_common(top)]
        names += [k for k, _ in nb.most_common(top) if k not in names]
        lines += ["", f"Top ops, {r.tiny.name} ({r.edges} edges; count = fwd + bwd + upd; where: the fused path's "
                      "main call sites):", "",
                  "| op | fused | no-fused | fused - no-fused | where (fused) |", "|---|---:|---:|---:|---|"]

        def cell(c: OpCounter, name: str) -> str:
            parts = [c.ops.get((ph, name), 0) for ph in PHASES]
            return f"{sum(parts)} ({'+'.join(map(str, parts))})" if sum(parts) else "0"

        for name in names:
            where = "; ".join(f"{loc} ({k})" for loc, k in f.sources.get(name, Counter()).most_common(3))
            lines.append(f"| {name} | {cell(f, name)} | {cell(n, name)} | {fb[name] - nb[name]:+d} | {where} |")
        if f.descended or n.descended:
            lines.append(f"\nPython-kernel custom ops descended into (their aten ops counted instead), fused: "
                         f"{dict(f.descended)}; no-fused: {dict(n.descended)}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--reps", type=int, default=None, help="host-bound timed steps per path (default 30; --smoke 2)")
    p.add_argument("--host-warmup", type=int, default=2)
    p.add_argument("--tiny-channels", type=int, default=4)
    p.add_argument("--tiny-batch", type=int, default=2)
    p.add_argument("--tiny-resolution", type=int, default=8)
    p.add_argument("--no-host", action="store_true", help="skip the host-bound timing")
    p.add_argument("--launches", action="store_true",
                   help="also count CUDA kernels per step with the profiler, at the papers' sizes (needs a GPU)")
    p.add_argument("--paper-steps", type=int, default=None,
                   help="timed paper-size steps per path (default 3; 0 skips; --smoke 1 at toy size)")
    p.add_argument("--paper-batch", default="nb201=64,darts=16",
                   help="paper-size batch, N or case=N (default nb201=64,darts=16: the DARTS supernet is slow on a CPU)")
    p.add_argument("--no-where", action="store_true", help="do not record where the fused path's ops come from")
    p.add_argument("--top", type=int, default=15, help="op names listed per case")
    p.add_argument("--tune-malloc", action="store_true", help="apply the gaea command's malloc settings first")
    p.add_argument("--smoke", action="store_true", help="fewest cells, 2 reps, toy paper step: checks that it runs")
    p.add_argument("--markdown-out", help="append the dated tables to this markdown file")
    args = p.parse_args(argv)
    args.reps = args.reps if args.reps is not None else (2 if args.smoke else 30)
    args.paper_steps = args.paper_steps if args.paper_steps is not None else (1 if args.smoke else 3)
    args.amp, args.channels_last = None, False  # what search_path / measure read
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    bad = [n for n in names if n not in CASES]
    if bad or not names:
        p.error(f"--cases: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(CASES)}")
    tuned = None
    if args.tune_malloc:
        from gaea_ext import allocator
        tuned = allocator.configure()
    batches = per_case(args.paper_batch, "--paper-batch")
    results = []
    for n in names:
        case = DEFAULTS[n]
        if args.smoke:
            case = replace(case, cells=SMOKE_CELLS[n])
        tiny = replace(case, channels=args.tiny_channels, batch=args.tiny_batch, resolution=args.tiny_resolution)
        r = Result(case, tiny)
        r.reps = args.reps
        print(f"== {n}: counting", file=sys.stderr, flush=True)
        r.counts = {name: count(tiny, fused, args, where=not args.no_where)
                    for name, fused in (("fused", True), ("no-fused", False))}
        r.edges = edges(tiny_step(tiny, True, args)[0])
        if args.launches:
            if not torch.cuda.is_available():
                p.error("--launches needs a CUDA device")
            print(f"== {n}: CUDA kernels per step", file=sys.stderr, flush=True)
            r.launches = {name: cuda_launches(replace(case, batch=batches.get(n, case.batch)), fused, args)
                          for name, fused in (("fused", True), ("no-fused", False))}
        if not args.no_host:
            print(f"== {n}: host-bound time, {args.reps} reps", file=sys.stderr, flush=True)
            r.host_s = host_times(tiny, args)
            r.host_plain_s = host_times(tiny, args, mkldnn=False)
        if args.paper_steps > 0:
            r.paper_case = replace(case, batch=batches.get(n, case.batch))
            if args.smoke:
                r.paper_case = replace(tiny, batch=4, resolution=16)
            print(f"== {n}: paper-size step: {r.paper_case.setup()}", file=sys.stderr, flush=True)
            r.paper = measure(r.paper_case, SimpleArgs(steps=args.paper_steps, warmup=1, amp=None, channels_last=False),
                              torch.device("cpu"))
        results.append(r)
        gc.collect()
    emit(report(results, argv, tuned, args.top), args.markdown_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
