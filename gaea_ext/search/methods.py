"""Architecture-search methods: who owns the architecture weights and how they move.

A space declares its architecture parameters as ArchParams: ``ops`` tables (one row per edge,
mixing that edge's candidate ops) and, in PC-DARTS, ``edges`` rows (one per node, weighting its
incoming edges). Every row is a distribution; the method decides how it is parameterized.

- gaea: rows on the simplex (uniform init), exponentiated-gradient steps (ExpGrad), used as
  mixing weights directly, no softmax. Single-level by default. Edge rows take their own EG step
  (lr 0.1, no clamp), as in GAEA PC-DARTS.
- darts / pcdarts: softmax logits (1e-3 randn init), Adam(betas (0.5, 0.999), wd 1e-3), first
  order, bilevel: the baselines (pcdarts is darts on the partial-channel space).
- gaea-gdas: rows on the simplex, EG steps; the forward pass samples one op per edge,
  one-hot(argmax((log theta + Gumbel) / tau)), with a straight-through gradient through the
  softmax, and computes only that op. A KL-to-uniform term keeps rows from collapsing early;
  tau anneals linearly from tau_max to tau_min at the last epoch.
- random: no weights to learn; one uniformly random architecture of the space.
"""
from __future__ import annotations

import math
import random as pyrandom
from typing import List, Optional, Sequence

import torch
from torch import nn

from gaea_ext.optim import ExpGrad
from gaea_ext.spaces.arch import ArchParam, ArchWeights

METHODS = ("gaea", "darts", "pcdarts", "gaea-gdas", "random")


class ArchMethod(nn.Module):
    """Holds the architecture parameters (an nn.ParameterDict) and their optimizer."""

    learns = True

    def __init__(self, spec: Sequence[ArchParam], *, lr: float):
        super().__init__()
        self.spec = list(spec)
        self.lr = lr
        self.arch = nn.ParameterDict()

    def params(self) -> List[nn.Parameter]:
        return [self.arch[p.name] for p in self.spec]

    def mixing(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def weights(self) -> ArchWeights:
        return ArchWeights({p.name: self.mixing(p.name) for p in self.spec})

    def regularizer(self) -> Optional[torch.Tensor]:
        return None

    def set_epoch(self, epoch: int, epochs: int) -> None:
        pass

    def entropy(self) -> float:
        """Mean over edges of the op-mixing weights' entropy, in nats (ln n_ops = uniform)."""
        rows = [self.mixing(p.name).detach().double().clamp_min(1e-30) for p in self.spec if p.kind == "ops"]
        w = torch.cat(rows)
        return float(-(w * w.log()).sum(-1).mean())

    def to_json(self):
        """Mixing weights as lists: one table for a single-parameter space (NB201), else by name."""
        w = {p.name: self.mixing(p.name).detach().cpu().tolist() for p in self.spec}
        return next(iter(w.values())) if len(w) == 1 else w


class GAEA(ArchMethod):
    def __init__(self, spec, *, lr: float = 0.1, eps: float = 1e-5, edge_lr: float = 0.1, fused: bool = True):
        super().__init__(spec, lr=lr)
        for p in self.spec:
            self.arch[p.name] = nn.Parameter(torch.full(p.shape, 1.0 / p.shape[-1]))
        groups = [{"params": [self.arch[p.name] for p in self.spec if p.kind == "ops"]},
                  {"params": [self.arch[p.name] for p in self.spec if p.kind == "edges"], "lr": edge_lr, "eps": 0.0}]
        self.optimizer = ExpGrad([g for g in groups if g["params"]], lr=lr, eps=eps, fused=fused)

    def mixing(self, name):
        return self.arch[name]


class DARTS(ArchMethod):
    def __init__(self, spec, *, lr: float = 3e-4, weight_decay: float = 1e-3, generator=None, **_):
        super().__init__(spec, lr=lr)
        for p in self.spec:
            self.arch[p.name] = nn.Parameter(1e-3 * torch.randn(p.shape, generator=generator))
        # fused: one kernel, and it can skip a non-finite step on the device (found_inf)
        self.optimizer = torch.optim.Adam(self.params(), lr=lr, betas=(0.5, 0.999), weight_decay=weight_decay,
                                          fused=True)

    def mixing(self, name):
        return torch.softmax(self.arch[name], dim=-1)


class GDAS(GAEA):
    """GAEA-GDAS: simplex parameters and EG steps; a hard Gumbel sample per edge in training."""

    def __init__(self, spec, *, lr: float = 0.01, kl: float = 0.01, tau_max: float = 10.0, tau_min: float = 0.1,
                 fused: bool = True, **_):
        super().__init__(spec, lr=lr, fused=fused)
        self.kl, self.tau_max, self.tau_min = kl, tau_max, tau_min
        self.tau = tau_max

    def set_epoch(self, epoch, epochs):
        self.tau = self.tau_max - (self.tau_max - self.tau_min) * epoch / max(1, epochs - 1)

    def weights(self) -> ArchWeights:
        if not self.training:
            return super().weights()
        w, hard = {}, {}
        for p in self.spec:
            theta = self.arch[p.name]
            if p.kind != "ops":
                w[p.name] = theta
                continue
            logits = theta.clamp_min(1e-30).log()
            gumbel = -torch.empty_like(logits).exponential_().log()
            soft = torch.softmax((logits + gumbel) / self.tau, dim=-1)
            index = soft.detach().argmax(-1)
            onehot = torch.zeros_like(soft).scatter_(-1, index[:, None], 1.0)
            w[p.name] = onehot - soft.detach() + soft  # value one-hot, gradient of the softmax
            hard[p.name] = index.tolist()  # one host sync per table: the op choice is control flow
        return ArchWeights(w, hard)

    def regularizer(self):
        if not self.kl:
            return None
        terms = []
        for p in self.spec:
            if p.kind == "ops":
                theta = self.arch[p.name].clamp_min(1e-30)
                terms.append((theta * (theta.log() + math.log(theta.shape[-1]))).sum(-1).mean())
        return self.kl * torch.stack(terms).mean()


class RandomArch(ArchMethod):
    """One uniformly random architecture per seed: the baseline every method must beat.

    Each op row puts a random height h in [0.5, 1) on a random op and spreads 1 - h over the
    rest: the argmax is the random op, and a derivation that ranks edges by their best weight
    (DARTS space) picks random inputs too. Edge rows are uniform."""

    learns = False

    def __init__(self, spec, *, seed: int = 0, **_):
        super().__init__(spec, lr=0.0)
        rng = pyrandom.Random(seed)
        for p in self.spec:
            n = p.shape[-1]
            if p.kind == "ops":
                t = torch.zeros(p.shape, dtype=torch.float64)
                for e in range(p.shape[0]):
                    h = 0.5 + 0.5 * rng.random() if n > 1 else 1.0
                    t[e] = (1.0 - h) / max(1, n - 1)
                    t[e, rng.randrange(n)] = h
                t = t.float()
            else:
                t = torch.full(p.shape, 1.0 / n)
            self.arch[p.name] = nn.Parameter(t, requires_grad=False)

    def mixing(self, name):
        return self.arch[name]


METHOD_ARCH_LR = {"gaea": 0.1, "darts": 3e-4, "pcdarts": 6e-4, "gaea-gdas": 0.01, "random": 0.0}


def make_method(name: str, spec, *, arch_lr: float, arch_eps: float, fused: bool, seed: int,
                edge_lr: float = 0.1, gdas_kl: float = 0.01, tau=(10.0, 0.1)) -> ArchMethod:
    if name == "gaea":
        return GAEA(spec, lr=arch_lr, eps=arch_eps, edge_lr=edge_lr, fused=fused)
    if name in ("darts", "pcdarts"):
        return DARTS(spec, lr=arch_lr, generator=torch.Generator().manual_seed(seed))
    if name == "gaea-gdas":
        return GDAS(spec, lr=arch_lr, kl=gdas_kl, tau_max=tau[0], tau_min=tau[1], fused=fused)
    if name == "random":
        return RandomArch(spec, seed=seed)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
