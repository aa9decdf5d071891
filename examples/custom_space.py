"""GAEA on your own search space: a small MobileNet-like network on the embedded digits.

Every block chooses among depthwise-separable convolutions with kernel 3, 5 or 7, each with
expansion 1 (ReLU, depthwise kxk, pointwise, BN) or 3 (ReLU, pointwise up, BN, ReLU,
depthwise kxk, pointwise down, BN), and skip where the block keeps its shape. One block
strides and widens, so its candidates' outputs differ from its input. The whole space is a
model with gaea_ext.nn.MixedOp layers; ArchParameters gives each block a simplex row, ExpGrad
steps them, gaea_step is the single-level GAEA step with an independent architecture
minibatch. About a minute on a CPU:

    python examples/custom_space.py              # prints the entropy per epoch, then the choices
    python examples/custom_space.py --no-fused   # the same search with the eager sum
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gaea_ext.data import digits
from gaea_ext.nn import ArchParameters, ExpGrad, MixedOp, choices, gaea_step

KERNELS = (3, 5, 7)
EXPANSIONS = (1, 3)


def sep_conv(c_in: int, c_out: int, k: int, stride: int, expand: int) -> nn.Sequential:
    """Pre-activation depthwise-separable conv; BN(affine=False) last, as in DARTS-like search
    (so the fused path shares the first ReLU and folds the last BN)."""
    mid = c_in * expand
    up = [nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU()] if expand > 1 else []
    return nn.Sequential(nn.ReLU(), *up,
                         nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False),
                         nn.Conv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out, affine=False))


def block(c_in: int, c_out: int, stride: int, fused: bool) -> MixedOp:
    cands: Dict[str, nn.Module] = {f"k{k}_e{e}": sep_conv(c_in, c_out, k, stride, e)
                                   for k in KERNELS for e in EXPANSIONS}
    if stride == 1 and c_in == c_out:
        cands["skip"] = nn.Identity()
    return MixedOp(cands, fused=fused)


class Net(nn.Module):
    def __init__(self, c: int = 16, num_classes: int = 10, fused: bool = True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.blocks = nn.Sequential(block(c, c, 1, fused), block(c, c, 1, fused),
                                    block(c, 2 * c, 2, fused), block(2 * c, 2 * c, 1, fused))
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def shifted(x: torch.Tensor, gen: torch.Generator, pad: int = 1) -> torch.Tensor:
    """Each image moved by up to `pad` pixels each way (background fill): without it the
    supernet fits the 1437 training digits within a few epochs, the loss goes to zero and
    the architecture gradient with it."""
    b, _, h, w = x.shape
    p = F.pad(x, (pad,) * 4, value=float(x.min()))
    di = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=gen)
    dj = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=gen)
    rows = (di + torch.arange(h)[None, :, None]).expand(b, h, w)
    cols = (dj + torch.arange(w)[None, None, :]).expand(b, h, w)
    return p[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


def batches(x: torch.Tensor, y: torch.Tensor, size: int, gen: torch.Generator):
    """Endless shuffled, shifted minibatches (a fresh permutation per pass)."""
    while True:
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - size + 1, size):
            idx = perm[i:i + size]
            yield shifted(x[idx], gen), y[idx]


def load(split: str):
    images, labels = digits.read(split)
    x = images.float() / 255.0
    return (x - 0.3) / 0.35, labels


def search(epochs: int = 12, steps: Optional[int] = None, batch: int = 64, channels: int = 16, fused: bool = True,
           arch_lr: float = 6.0, lr: float = 0.05, seed: int = 0, dtype: torch.dtype = torch.float32,
           echo=print) -> Dict:
    """Run the search; returns the choices, the entropy before and after each epoch, test
    accuracy of the supernet. steps: per epoch (default: one pass over the training set)."""
    torch.manual_seed(seed)
    x, y = load("train")
    x = x.to(dtype)
    model = Net(channels, fused=fused).to(dtype)
    arch = ArchParameters(model).to(dtype)
    weight_opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=3e-4)
    arch_opt = ExpGrad(arch.parameters(), lr=arch_lr)
    train = batches(x, y, batch, torch.Generator().manual_seed(seed + 1))
    arch_data = batches(x, y, batch, torch.Generator().manual_seed(seed + 2))  # independent minibatches
    steps = steps or len(x) // batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(weight_opt, epochs * steps)
    entropy: List[float] = [arch.entropy()]
    echo(f"{len(arch.rows)} choices, entropy {entropy[0]:.3f} nats (uniform)")
    model.train()
    for epoch in range(epochs):
        start, total = time.perf_counter(), 0.0
        for _ in range(steps):
            total += float(gaea_step(model, F.cross_entropy, next(train), next(arch_data), weight_opt, arch_opt))
            sched.step()
        entropy.append(arch.entropy())
        echo(f"epoch {epoch + 1}/{epochs}: loss {total / steps:.3f}, entropy {entropy[-1]:.3f}, "
             f"{time.perf_counter() - start:.1f} s")
    model.eval()
    xt, yt = load("test")
    xt = xt.to(dtype)
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean()) * 100
    chosen = choices(model)
    for name, op in chosen.items():
        echo(f"  {name}: {op}")
    echo(f"supernet test accuracy {acc:.1f}%")
    return {"choices": chosen, "entropy": entropy, "test_acc": acc,
            "weights": {k: r.detach().clone() for k, r in zip(arch.keys, arch.rows)}}


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--steps", type=int, default=None, help="steps per epoch (default: one pass)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--arch-lr", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--double", action="store_true", help="float64, for an A/B comparison free of rounding")
    ap.add_argument("--no-fused", dest="fused", action="store_false", help="the eager sum, for A/B runs")
    a = ap.parse_args(argv)
    return search(a.epochs, a.steps, a.batch, a.channels, a.fused, a.arch_lr, seed=a.seed,
                  dtype=torch.float64 if a.double else torch.float32)


if __name__ == "__main__":
    main()
