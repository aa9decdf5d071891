"""Search quality on CIFAR-10 at the `cpu-proxy` preset: GAEA vs DARTS over seeds, scored by
the NAS-Bench-201 table, next to the space's random-architecture baseline.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296 \
      .venv/bin/python bench/search_quality.py --seeds 0 1 2 --markdown-out bench/RESULTS.md

Needs ../shared/data/cifar10-jpeg.tar.gz and ../shared/data/nb201-test-accuracy.csv (or
--data/--nb201). Each run is a real `gaea search` in its own process, so wall time includes
start-up and data loading (decoded images are cached after the first run).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from report import emit, machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")


def run_search(method, seed, args, out):
    cmd = [sys.executable, "-m", "gaea_ext", "search", "--preset", args.preset, "--method", method,
           "--seed", str(seed), "--data", args.data, "--nb201", args.nb201, "--out", out, *args.extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    with open(os.path.join(out, "result.json")) as f:
        res = json.load(f)
    with open(os.path.join(out, "log.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    return {"method": method, "seed": seed, "genotype": res["genotype"], "cifar10": res["nb201"]["cifar10"],
            "entropy": res["arch_entropy"], "wall_s": wall, "last_img_s": last["images_per_s"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-proxy")
    p.add_argument("--methods", nargs="+", default=["gaea", "darts"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data", default=os.path.join(SHARED, "cifar10-jpeg.tar.gz"))
    p.add_argument("--nb201", default=os.path.join(SHARED, "nb201-test-accuracy.csv"))
    p.add_argument("--markdown-out")
    p.add_argument("extra", nargs="*", help="more `gaea search` arguments (after --)")
    args = p.parse_args()
    for path in (args.data, args.nb201):
        if not os.path.exists(path):
            sys.exit(f"search_quality: {path} not found (needs ../shared/data or --data/--nb201)")

    from gaea_ext.benchmarks.nb201 import NB201Table

    base = NB201Table.load(args.nb201).stats("cifar10", exclude_none=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for seed in args.seeds:
                row = run_search(method, seed, args, os.path.join(tmp, f"{method}-{seed}"))
                rows.append(row)
                print(f"{method} seed {seed}: {row['cifar10']:.2f} entropy {row['entropy']:.3f} "
                      f"{row['wall_s']:.0f} s {row['genotype']}", flush=True)

    cmd = "python bench/search_quality.py " + " ".join(sys.argv[1:])
    lines = [f"### Search quality, `{args.preset}` ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)",
             "", f"Machine: {machine()}, torch threads default. Command: `{cmd}`", "",
             "| method | seed | CIFAR-10 test acc (NB201) | final mean entropy (nats) | wall s | last-epoch images/s | genotype |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seed']} | {r['cifar10']:.2f} | {r['entropy']:.3f} | {r['wall_s']:.0f} | "
                     f"{r['last_img_s']:.0f} | `{r['genotype']}` |")
    for method in args.methods:
        accs = [r["cifar10"] for r in rows if r["method"] == method]
        ents = [r["entropy"] for r in rows if r["method"] == method]
        lines.append(f"| **{method} mean** | | **{statistics.mean(accs):.2f}** (min {min(accs):.2f}) | "
                     f"{statistics.mean(ents):.3f} | {statistics.mean(r['wall_s'] for r in rows if r['method'] == method):.0f} | "
                     f"{statistics.median(r['last_img_s'] for r in rows if r['method'] == method):.0f} (median) | |")
    lines.append(f"| random arch (space without none, n={base['n']}) | | median {base['median']:.2f}, "
                 f"p90 {base['p90']:.2f}, max {base['max']:.2f} | ln 4 = 1.386 | | | |")
    emit("\n".join(lines) + "\n", args.markdown_out)


if __name__ == "__main__":
    main()
