"""Checkpoint overhead of `gaea search` at the paper's NB201 size on this machine.

Builds the real Search of `--preset paper-cifar10` (C=16, N=5 cells per stage, batch 64,
32x32, GAEA single-level) on the embedded digits data resized to 32x32 (step cost depends on
the sizes, not on the pixels; the stem has 1 input channel instead of 3, 288 weights fewer),
times search steps and mid-epoch checkpoint saves separately (the save is what the loop does
at a due step: gather the epoch sums, state_dict, torch.save, atomic write with fsync), and
reports the overhead at every N: save / (N x step).

    python bench/checkpoint_cost.py --steps 5 --saves 8            # CPU, about a minute
    python bench/checkpoint_cost.py --device cuda --steps 50 --saves 20
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from gaea_ext.search import faults, rundir  # noqa: E402
from gaea_ext.search.config import SearchConfig, resolve  # noqa: E402
from gaea_ext.search.loop import Search, epoch_sums  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=5, help="timed search steps (after one warm-up step)")
    p.add_argument("--saves", type=int, default=8, help="timed checkpoint saves")
    p.add_argument("--every", type=int, default=SearchConfig.checkpoint_every, help="N to report (default: the default)")
    p.add_argument("--dir", help="where to write the checkpoint (default: a temporary directory)")
    args = p.parse_args()

    cfg = resolve("paper-cifar10", dict(dataset="digits", resolution=32, epochs=1, device=args.device))
    out = args.dir or tempfile.mkdtemp(prefix="gaea-ckpt-")
    os.makedirs(out, exist_ok=True)
    s = Search(cfg, out, echo=lambda *a: None)
    s.model.train()
    s.method.train()
    s.sums = epoch_sums(s.device, counts=("arch_nonfinite",))  # as Search.train_epoch starts them
    sync = torch.cuda.synchronize if s.device.type == "cuda" else (lambda: None)
    batches = iter(s.loader_w)
    step_s = []
    for i in range(args.steps + 1):
        x, y = next(batches)
        xa, ya = s.next_arch_batch()
        sync()
        t = time.perf_counter()
        loss, _ = s.step(False, x, y, xa, ya)
        float(loss)
        sync()
        if i:  # the first step warms up
            step_s.append(time.perf_counter() - t)
        print(f"step {i}: {time.perf_counter() - t:.3f} s{' (warm-up)' if not i else ''}", flush=True)
    path = os.path.join(out, "checkpoint.pt")
    save_s = []
    for _ in range(args.saves):
        sync()
        t = time.perf_counter()
        s.saved_sums = faults.gather_sums(s.sums, s.device)
        rundir.save_checkpoint(path, s.state_dict())
        save_s.append(time.perf_counter() - t)
        print(f"save: {save_s[-1]:.4f} s", flush=True)
    step, save = statistics.median(step_s), statistics.median(save_s)
    mb = os.path.getsize(path) / 2**20
    print(f"device {s.device}, C={cfg.channels} N={cfg.cells} batch {cfg.batch_size} res 32, "
          f"torch threads {torch.get_num_threads()}")
    print(f"step s: median {step:.3f} (of {len(step_s)}: {', '.join(f'{v:.3f}' for v in step_s)})")
    print(f"save s: median {save:.4f}, max {max(save_s):.4f} (of {len(save_s)}), checkpoint {mb:.1f} MiB in {out}")
    for n in sorted({1, 10, 50, args.every}):
        print(f"N={n}: overhead {100 * save / (n * step):.3f} % of step time")
    s.close()


if __name__ == "__main__":
    main()
