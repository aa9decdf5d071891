"""Time one search step of a NAS-Bench-1Shot1 space at the paper-nb1shot1 size.

    OMP_NUM_THREADS=1 python bench/nb1shot1_step.py --space nb1shot1-2            # fused
    OMP_NUM_THREADS=1 python bench/nb1shot1_step.py --space nb1shot1-2 --no-fused # reference

A step is what the search loop does per minibatch with GAEA, bilevel: an EG architecture step
on one batch, then a clipped SGD weight step on another (random tensors; the cost does not
depend on the pixels). Prints the timed steps and their median.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gaea_ext.search.methods import GAEA
from gaea_ext.spaces import build_network


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default="nb1shot1-2", choices=("nb1shot1-1", "nb1shot1-2", "nb1shot1-3"))
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--cells", type=int, default=9)
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-fused", dest="fused", action="store_false")
    args = p.parse_args()

    torch.manual_seed(0)
    model = build_network(args.space, channels=args.channels, cells=args.cells, num_classes=10, in_channels=3,
                          exclude_none=False, fused=args.fused, partial=4)
    method = GAEA(model.arch_spec(), lr=0.1, edge_lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    shape = (args.batch, 3, args.resolution, args.resolution)
    x, xa = torch.randn(shape), torch.randn(shape)
    y, ya = torch.randint(0, 10, (args.batch,)), torch.randint(0, 10, (args.batch,))

    def step() -> None:
        params = method.params()
        loss = F.cross_entropy(model(xa, method.weights()), ya)
        for param, grad in zip(params, torch.autograd.grad(loss, params)):
            param.grad = grad
        method.optimizer.step()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, method.weights().detach()), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    print(f"{args.space} {'fused' if args.fused else 'no-fused'} C={args.channels} cells={args.cells} "
          f"batch={args.batch} {args.resolution}px threads={torch.get_num_threads()}: step s "
          f"{', '.join(f'{t:.2f}' for t in times)} (median {statistics.median(times):.2f})")


if __name__ == "__main__":
    main()
