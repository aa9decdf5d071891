"""Search-step throughput and peak memory, fused kernels vs the pure-PyTorch twin (--no-fused).

One process, same model, batch and data for both paths, steps interleaved (A B A B ...) so
machine noise hits both alike. A step is what `gaea search` does per minibatch by default: an
architecture step (forward + backward to the architecture weights, EG update) and a weight
step (forward + backward, SGD).

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296 \
      .venv/bin/python bench/search_speed.py --device cpu --markdown-out bench/RESULTS.md

Peak memory: CUDA max_memory_allocated during one step (minus what was allocated before it);
on CPU, the bytes of autograd-saved tensors of one forward (saved_tensors_hooks), which is the
activation memory the two paths differ in.
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from gaea_ext.search.methods import GAEA
from gaea_ext.spaces import NB201Network
from report import emit, machine


def build(fused, args, device):
    torch.manual_seed(0)
    model = NB201Network(args.channels, args.cells, 10, 3, exclude_none=True, fused=fused).to(device)
    method = GAEA(model.arch_shape(), lr=0.1, fused=fused).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    return model, method, opt


def step(model, method, opt, x, y, xa, ya):
    loss = F.cross_entropy(model(xa, method.weights()), ya)
    (method.alpha.grad,) = torch.autograd.grad(loss, [method.alpha])
    method.optimizer.step()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x, method.weights().detach()), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    opt.step()


def saved_bytes(model, method, x):
    seen = {}

    def pack(t):  # count each storage once: many ops save the same tensor
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, method.weights())
    return sum(seen.values())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--cells", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per path")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--markdown-out")
    args = p.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.resolution, args.resolution)
    x, xa = (torch.randn(shape, generator=g).to(device) for _ in range(2))
    y, ya = (torch.randint(0, 10, (args.batch_size,), generator=g).to(device) for _ in range(2))
    paths = {"fused": build(True, args, device), "no-fused": build(False, args, device)}
    times = {k: [] for k in paths}
    peak = {}
    for k, (model, method, opt) in paths.items():
        for _ in range(args.warmup):
            step(model, method, opt, x, y, xa, ya)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step(model, method, opt, x, y, xa, ya)
            sync(device)
            peak[k] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            peak[k] = saved_bytes(model, method, x) / 2**20
    for _ in range(args.steps):
        for k, (model, method, opt) in paths.items():
            sync(device)
            start = time.perf_counter()
            step(model, method, opt, x, y, xa, ya)
            sync(device)
            times[k].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: args.batch_size / med[k] for k in med}
    what = "CUDA peak MiB per step" if device.type == "cuda" else "saved activations MiB per forward"
    mach = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    lines = [
        f"### NB201 search step, C={args.channels} N={args.cells} batch {args.batch_size} "
        f"{args.resolution}x{args.resolution}, {args.device} ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "", f"Machine: {mach}; torch {torch.__version__}. Command: `python bench/search_speed.py {' '.join(sys.argv[1:])}`", "",
        f"| path | median step s | images/s (weight-step images) | {what} |", "|---|---:|---:|---:|",
    ]
    for k in paths:
        lines.append(f"| {k} | {med[k]:.3f} | {ips[k]:.1f} | {peak[k]:.1f} |")
    lines.append(f"| **fused / no-fused** | | **{ips['fused'] / ips['no-fused']:.2f}x** | "
                 f"**{peak['fused'] / peak['no-fused']:.2f}x** |")
    emit("\n".join(lines) + "\n", args.markdown_out)


if __name__ == "__main__":
    main()
