#!/usr/bin/env python
"""Interleaved A/B timing of the fused gaea_ext kernels against their PyTorch baselines.

    python bench/kernels.py --device cpu [--reps 30] [--markdown-out FILE]

For each case (mixed_op forward and forward+backward on ys of shape 64x16x32x32, K=5 and
K=8, float32 (and bf16 on CUDA); an NB201 edge's fused mixed_op_bn against its eager
expression; eg_update_ on the DARTS-sized architecture parameters) all
contenders are built once on shared, pre-allocated inputs (torch.compile contenders are
compiled and warmed up here, outside any timing), then timed in one run: `--reps`
repetitions, and in each repetition every contender once, in rotating order, so that drift
and noise on the machine hit all of them alike. Each sample times a batch of calls sized
to last at least `--min-sample-ms`. The table reports the per-call median, interquartile
range and minimum, GB/s (from the median) against the bytes that must move, and each
contender's time over the fused kernel's (eager/fused: how many times faster fused is).
See bench_cases.py for the contenders and the byte counts. Every contender's result is
first checked against a float64 oracle.

CPU samples are timed with time.perf_counter, CUDA ones with torch.cuda.Event pairs (the
device is synchronized before each sample). On CUDA the script also measures device-to-device
copy bandwidth (dst.copy_(src) of a 1 GiB float32 tensor, counting 2x bytes) and reports
mixed_op forward as a percentage of it, counting (K+1)*N elements moved.

Environment: run benchmarks with

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296

Every step allocates fresh multi-MiB outputs; with glibc's default (dynamic) mmap threshold
those allocations are mmap'ed and page-faulted afresh, which is slow and erratic on this
machine. The script itself sets nothing; the header line it writes records the command,
including GLIBC_TUNABLES when it is set.

--markdown-out FILE appends a header line (date in UTC, machine, torch version, exact
command) and the table to FILE.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cases as cases  # noqa: E402

CPU_TARGETS = (  # (case group, contender, minimum contender/fused time ratio)
    (cases.mixed_group("cpu", torch.float32, 5, True), "eager", 2.0),
    (cases.mixed_group("cpu", torch.float32, 8, True), "eager", 2.0),
    (cases.eg_group("cpu"), "loop", 3.0),
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def batch_timer(device: str) -> Callable[[Callable[[], object], int], float]:
    """Seconds for `inner` back-to-back calls of fn."""
    if device == "cuda":
        def time_batch(fn, inner):
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def time_batch(fn, inner):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            return time.perf_counter() - t0
    return time_batch


def quantile(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_interleaved(fns: Dict[str, Callable[[], object]], device: str, reps: int,
                     min_sample_s: float) -> Dict[str, List[float]]:
    """Per-call seconds, `reps` samples per contender, contenders interleaved per rep."""
    time_batch = batch_timer(device)
    inner = {}
    for name, fn in fns.items():  # calibrate the batch size (fns are already warm)
        t = min(time_batch(fn, 1) for _ in range(3))
        inner[name] = max(1, min(100_000, math.ceil(min_sample_s / max(t, 1e-9))))
    names = list(fns)
    samples: Dict[str, List[float]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            for name in names[r % len(names):] + names[:r % len(names)]:
                samples[name].append(time_batch(fns[name], inner[name]) / inner[name])
    finally:
        gc.enable()
    return samples


def copy_bandwidth(reps: int, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy GB/s (read + write counted: 2 x nbytes per copy)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    for _ in range(3):
        fn()
    samples = time_interleaved({"copy": fn}, "cuda", reps, 0.0)["copy"]
    del src, dst
    return 2 * nbytes / statistics.median(samples) / 1e9


def machine_line(device: str) -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [platform.platform(), f"{cpu} (nproc {nproc}, torch threads {torch.get_num_threads()})"]
    if device == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name()}")
    return "; ".join(parts)


def command_line() -> str:
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    argv[0] = Path(argv[0]).name
    env = os.environ.get("GLIBC_TUNABLES")
    return (f"GLIBC_TUNABLES={env} " if env is not None else "") + shlex.join(argv)


def fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.4f}" if ms < 0.1 else f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def fmt_gbps(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=30, help="interleaved repetitions (default 30)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per contender (default 3)")
    ap.add_argument("--min-sample-ms", type=float, default=None,
                    help="shortest timed batch (default: 2 on CPU, 1 on CUDA)")
    ap.add_argument("--markdown-out", metavar="FILE", help="append the header line and table here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    min_sample_s = (args.min_sample_ms if args.min_sample_ms is not None
                    else 1.0 if args.device == "cuda" else 2.0) / 1e3

    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"### {date} · {machine_line(args.device)} · torch {torch.__version__} · "
              f"`{command_line()}`")

    rows, notes, problems = [], [], []
    results: Dict[str, Dict[str, float]] = {}  # group -> contender -> median seconds
    fwd_cases = []
    problems += cases.check_eg(args.device)
    for case in cases.all_cases(args.device, warmup=args.warmup, log=log):
        fns = {n: c.fn for n, c in case.contenders.items() if c.skip is None}
        if case.kind.startswith("mixed"):
            problems += [f"{case.group}: {p}" for p in cases.check_mixed(
                args.device, case.dtype, case.K, case.kind == "mixed_fwdbwd", fns)]
        elif case.kind == "edge_fwdbwd":
            problems += [f"{case.group}: {p}" for p in cases.check_edge(args.device, case.dtype, fns)]
        log(f"timing {case.group}: {', '.join(fns)} x {args.reps} reps")
        samples = time_interleaved(fns, args.device, args.reps, min_sample_s)
        med = {n: statistics.median(s) for n, s in samples.items()}
        results[case.group] = med
        fused = med.get("fused")
        for name, c in case.contenders.items():
            if c.skip is not None:
                rows.append((case.group, name, "skipped", "", "", "", ""))
                notes.append(f"{case.group} / {name}: {c.skip}")
                continue
            s = samples[name]
            rows.append((case.group, name, fmt_ms(med[name]),
                         f"{fmt_ms(quantile(s, 0.25))}–{fmt_ms(quantile(s, 0.75))}",
                         fmt_ms(min(s)), fmt_gbps(case.nbytes / med[name] / 1e9),
                         f"{med[name] / fused:.2f}×" if fused else "n/a"))
        if case.kind == "mixed_fwd":
            fwd_cases.append((case.group, case.nbytes))
        del case, fns, samples  # free this case's buffers before building the next

    lines = ["| case | contender | median ms | IQR ms | min ms | GB/s | time / fused |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if notes:
        lines += ["", "Skipped:"] + [f"- {n}" for n in notes]

    if args.device == "cuda":
        log("timing device-to-device copy")
        copy_gbps = copy_bandwidth(args.reps)
        lines += ["", f"Device-to-device copy (dst.copy_(src), 1 GiB, 2x bytes counted): "
                      f"{copy_gbps:.0f} GB/s", "",
                  "| mixed_op forward | contender | GB/s ((K+1)·N elements) | % of copy |",
                  "|---|---|---:|---:|"]
        for group, nbytes in fwd_cases:
            for name, t in results[group].items():
                gbps = nbytes / t / 1e9
                lines.append(f"| {group} | {name} | {gbps:.0f} | {100 * gbps / copy_gbps:.0f}% |")

    if args.device == "cpu":
        lines += ["", "Targets (CPU):"]
        for group, baseline, want in CPU_TARGETS:
            med = results.get(group, {})
            if "fused" in med and baseline in med:
                ratio = med[baseline] / med["fused"]
                verdict = "met" if ratio >= want else "NOT met"
                lines.append(f"- {group}: {baseline}/fused = {ratio:.2f}× (target ≥ {want:g}×): {verdict}")
            else:
                lines.append(f"- {group}: {baseline}/fused not measured")

    lines += ["", "Sanity check vs float64 oracle: " +
              ("all contenders agree" if not problems else "PROBLEMS")]
    lines += [f"- {p}" for p in problems]

    text = "\n".join([header, ""] + lines) + "\n"
    print(text)
    if args.markdown_out:
        with open(args.markdown_out, "a") as f:
            f.write(text + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
