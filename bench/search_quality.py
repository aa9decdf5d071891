"""Search quality on CIFAR-10 at the `cpu-proxy` preset: GAEA against fair baselines over many
seeds, every final cell scored in the NAS-Bench-201 table.

    python bench/search_quality.py --runs gaea gaea-bilevel darts --seeds 0 1 2 3 4 5 6 7 8 9 \\
        --jobs 2 --jsonl runs.jsonl --markdown-out bench/RESULTS.md

Run labels (each a real `gaea search --preset PRESET --seed S ...` in its own process):
- `gaea`: the preset as a user runs it (single-level GAEA, independent architecture minibatch).
- `gaea-bilevel`: GAEA on the 50/50 train/validation split.
- `darts`: first-order DARTS (softmax, Adam) with `--darts-lr` (tuned: bench/RESULTS.md).
- `LABEL=ARGS`: anything else, e.g. `darts-3e-4=--method darts --arch-lr 3e-4`.
Bilevel runs see half the images per epoch, so they get twice the preset's epochs
(`--bilevel-epochs`) and warm-up epochs: the same number of steps, hence about the same wall
time (reported).

The random baseline is exact, from the table: a uniformly random cell of the space (without
`none`, as the preset searches) has the table's median, mean and p90. A method's "beats p90"
column is the fraction of seeds whose cell scores above that p90.

`--jsonl` appends every finished run to a file and skips runs already in it, so an interrupted
sweep resumes and several invocations add up to one table (`--report-only` just prints it).
`--jobs N` runs N searches at once, each with `OMP_NUM_THREADS=cores/N`; wall times then include
the sharing (say so when quoting them). Needs ../shared/data/cifar10-jpeg.tar.gz and
../shared/data/nb201-test-accuracy.csv (or --data/--nb201).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Dict, List, Sequence

from report import emit, machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")
# DARTS' architecture learning rate tuned at the cpu-proxy preset (bench/RESULTS.md, issue 16).
DARTS_LR = 3e-2


def run_args(label: str, args) -> List[str]:
    """The `gaea search` arguments of a run label (see the module docstring)."""
    if "=" in label:
        return shlex.split(label.split("=", 1)[1])
    # Bilevel runs see half the images per epoch: twice the epochs (and warm-up epochs) of the
    # preset give them the same steps, architecture steps and wall time.
    twice = ["--epochs", str(args.bilevel_epochs)]
    if args.bilevel_warmup:
        twice += ["--arch-warmup", str(args.bilevel_warmup)]
    builtin = {
        "gaea": ["--method", "gaea"],
        "gaea-bilevel": ["--method", "gaea", "--bilevel", *twice],
        "darts": ["--method", "darts", "--arch-lr", repr(args.darts_lr), *twice],
    }
    if label not in builtin:
        raise SystemExit(f"search_quality: unknown run label {label!r} (use gaea, gaea-bilevel, darts or LABEL=ARGS)")
    return builtin[label]


def label_name(label: str) -> str:
    return label.split("=", 1)[0]


def run_search(label: str, seed: int, args, out: str, threads: int) -> Dict:
    cmd = [sys.executable, "-m", "gaea_ext", "search", "--preset", args.preset, "--seed", str(seed),
           "--data", args.data, "--nb201", args.nb201, "--out", out, *run_args(label, args), *args.extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if args.jobs > 1 else None
    start = time.perf_counter()
    res = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr[-2000:]}")
    with open(os.path.join(out, "result.json")) as f:
        result = json.load(f)
    with open(os.path.join(out, "log.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    return {"label": label_name(label), "args": run_args(label, args) + list(args.extra), "preset": args.preset,
            "seed": seed, "genotype": result["genotype"], "cifar10": result["nb201"]["cifar10"],
            "entropy": result["arch_entropy"], "wall_s": wall, "last_img_s": last["images_per_s"],
            "threads": threads if args.jobs > 1 else None, "jobs": args.jobs,
            "finished": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC"}


def load_rows(path: str) -> List[Dict]:
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(rows: Sequence[Dict], base: Dict) -> List[Dict]:
    """Per label: n, mean, sd, min, max, fraction above the random p90, mean entropy, median wall."""
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        rs = [r for r in rows if r["label"] == label]
        accs = [r["cifar10"] for r in rs]
        out.append({"label": label, "n": len(rs), "mean": statistics.fmean(accs),
                    "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0, "min": min(accs), "max": max(accs),
                    "beats_p90": sum(a > base["p90"] for a in accs) / len(accs),
                    "entropy": statistics.fmean(r["entropy"] for r in rs),
                    "wall_median": statistics.median(r["wall_s"] for r in rs),
                    "seeds": sorted(r["seed"] for r in rs)})
    return out


def markdown(rows: Sequence[Dict], base: Dict, title: str, command: str) -> str:
    lines = [f"### {title}", "", f"Machine: {machine()}. Command: `{command}`", "",
             "| method | seeds | CIFAR-10 acc mean ± sd | min | max | beats random p90 | final entropy (mean) | wall s (median) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summarize(rows, base):
        lines.append(f"| **{s['label']}** | {s['n']} | **{s['mean']:.2f}** ± {s['sd']:.2f} | {s['min']:.2f} | "
                     f"{s['max']:.2f} | {100 * s['beats_p90']:.0f} % | {s['entropy']:.3f} | {s['wall_median']:.0f} |")
    lines.append(f"| random cell (table, n={base['n']}) | | mean {base['mean']:.2f}, median {base['median']:.2f} | | "
                 f"max {base['max']:.2f} | 10 % (p90 = {base['p90']:.2f}) | ln 4 = 1.386 | 0 |")
    lines += ["", "| method | seed | CIFAR-10 acc | entropy | wall s | threads x jobs | `gaea search` args | genotype |",
              "|---|---:|---:|---:|---:|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["label"], r["seed"])):
        par = f"{r['threads']} x {r['jobs']}" if r.get("threads") else "default x 1"
        lines.append(f"| {r['label']} | {r['seed']} | {r['cifar10']:.2f} | {r['entropy']:.3f} | {r['wall_s']:.0f} | "
                     f"{par} | `{' '.join(r['args'])}` | `{r['genotype']}` |")
    return "\n".join(lines) + "\n"


def main():
    from gaea_ext.search.config import PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-proxy")
    p.add_argument("--runs", nargs="+", default=["gaea", "gaea-bilevel", "darts"], help="run labels (see above)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    p.add_argument("--darts-lr", type=float, default=DARTS_LR)
    p.add_argument("--bilevel-epochs", type=int, help="default: twice the preset's epochs")
    p.add_argument("--jobs", type=int, default=1, help="searches at once (each with cores/jobs threads)")
    p.add_argument("--jsonl", help="append finished runs here; runs already in it are skipped")
    p.add_argument("--report-only", action="store_true", help="only print the table of the runs in --jsonl")
    p.add_argument("--data", default=os.path.join(SHARED, "cifar10-jpeg.tar.gz"))
    p.add_argument("--nb201", default=os.path.join(SHARED, "nb201-test-accuracy.csv"))
    p.add_argument("--markdown-out")
    p.add_argument("extra", nargs="*", help="more `gaea search` arguments for every run (after --)")
    args = p.parse_args()
    if args.bilevel_epochs is None:
        args.bilevel_epochs = 2 * PRESETS[args.preset].get("epochs", 10)
    args.bilevel_warmup = 2 * PRESETS[args.preset].get("arch_warmup", 0)
    for path in (args.data, args.nb201):
        if not os.path.exists(path):
            sys.exit(f"search_quality: {path} not found (needs ../shared/data or --data/--nb201)")

    from gaea_ext.benchmarks.nb201 import NB201Table

    base = NB201Table.load(args.nb201).stats("cifar10", exclude_none=True)
    done = load_rows(args.jsonl)
    if not args.report_only:
        have = {(r["label"], r["seed"], tuple(r["args"]), r["preset"]) for r in done}
        todo = [(label, seed) for label in args.runs for seed in args.seeds
                if (label_name(label), seed, tuple(run_args(label, args) + list(args.extra)), args.preset) not in have]
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_search, label, seed, args, os.path.join(tmp, f"{label_name(label)}-{seed}"), threads)
                       for label, seed in todo]
            for fut in as_completed(futures):
                row = fut.result()
                done.append(row)
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(row) + "\n")
                print(f"{row['label']} seed {row['seed']}: {row['cifar10']:.2f} entropy {row['entropy']:.3f} "
                      f"{row['wall_s']:.0f} s {row['genotype']}", flush=True)
    wanted = {label_name(label) for label in args.runs}
    rows = [r for r in done if r["label"] in wanted and r["preset"] == args.preset and r["seed"] in args.seeds]
    title = f"Search quality, `{args.preset}` ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)"
    emit(markdown(rows, base, title, "python bench/search_quality.py " + " ".join(sys.argv[1:])), args.markdown_out)


if __name__ == "__main__":
    main()
