"""Architecture-search methods: who owns the architecture weights and how they move.

- gaea: weights on the simplex (uniform init), exponentiated-gradient steps (ExpGrad), used
  as mixing weights directly, no softmax. Single-level by default.
- darts: softmax logits (1e-3 randn init), Adam(3e-4, betas (0.5, 0.999), wd 1e-3), first
  order, bilevel: the baseline that collapses to skip connections on long searches.
- random: no weights to learn; a uniformly random architecture of the space.
"""
from __future__ import annotations

import random as pyrandom

import torch
from torch import nn

from gaea_ext.optim import ExpGrad

METHODS = ("gaea", "darts", "random")


class ArchMethod(nn.Module):
    """Holds the [edges, ops] architecture parameter and its optimizer."""

    learns = True

    def __init__(self, shape, *, lr: float):
        super().__init__()
        self.lr = lr

    def weights(self) -> torch.Tensor:
        raise NotImplementedError

    def entropy(self) -> float:
        """Mean over edges of the mixing weights' entropy, in nats (ln n_ops = uniform)."""
        w = self.weights().detach().double().clamp_min(1e-30)
        return float(-(w * w.log()).sum(-1).mean())


class GAEA(ArchMethod):
    def __init__(self, shape, *, lr: float = 0.1, eps: float = 1e-5, fused: bool = True):
        super().__init__(shape, lr=lr)
        self.alpha = nn.Parameter(torch.full(shape, 1.0 / shape[-1]))
        self.optimizer = ExpGrad([self.alpha], lr=lr, eps=eps, fused=fused)

    def weights(self):
        return self.alpha


class DARTS(ArchMethod):
    def __init__(self, shape, *, lr: float = 3e-4, weight_decay: float = 1e-3, generator=None, **_):
        super().__init__(shape, lr=lr)
        self.alpha = nn.Parameter(1e-3 * torch.randn(shape, generator=generator))
        self.optimizer = torch.optim.Adam([self.alpha], lr=lr, betas=(0.5, 0.999), weight_decay=weight_decay)

    def weights(self):
        return torch.softmax(self.alpha, dim=-1)


class RandomArch(ArchMethod):
    """One uniformly random architecture per seed: the baseline every method must beat."""

    learns = False

    def __init__(self, shape, *, seed: int = 0, **_):
        super().__init__(shape, lr=0.0)
        rng = pyrandom.Random(seed)
        onehot = torch.zeros(shape)
        for e in range(shape[0]):
            onehot[e, rng.randrange(shape[1])] = 1.0
        self.register_buffer("alpha", onehot)

    def weights(self):
        return self.alpha


def make_method(name: str, shape, *, arch_lr: float, arch_eps: float, fused: bool, seed: int) -> ArchMethod:
    if name == "gaea":
        return GAEA(shape, lr=arch_lr, eps=arch_eps, fused=fused)
    if name == "darts":
        return DARTS(shape, lr=arch_lr, generator=torch.Generator().manual_seed(seed))
    if name == "random":
        return RandomArch(shape, seed=seed)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
