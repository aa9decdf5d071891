"""Architecture parameters for the MixedOps of any model: one simplex row per choice.

ArchParameters(model) walks the model's modules; every MixedOp gets a row of 1/n (n its
candidates, zeros included) under its module name, or, when it was built with `key=...`, the
row of that key, shared with every MixedOp of the same key (they must name the same
candidates). The row is bound to the MixedOp (not registered in it: model.parameters() stays
the network weights, arch.parameters() the rows), so the model calls `op(x)`. Step the rows
with ExpGrad(arch.parameters()); read the result with choices(model).
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn

from gaea_ext.nn.mixed import MixedOp

__all__ = ["ArchParameters", "choices", "mixed_ops"]


def mixed_ops(model: nn.Module) -> Dict[str, MixedOp]:
    """The model's MixedOps by module name ("" for the model itself)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MixedOp)}


class ArchParameters(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.rows = nn.ParameterList()
        self.keys: List[str] = []              # row i's key
        self.names: List[List[str]] = []       # row i's candidate names
        self.edges: Dict[str, int] = {}        # MixedOp module name -> row index
        found = mixed_ops(model)
        if not found:
            raise ValueError("ArchParameters: the model has no gaea_ext.nn.MixedOp")
        for name, op in found.items():
            key = name if op.key is None else op.key
            if key not in self.keys:
                self.keys.append(key)
                self.names.append(list(op.names))
                self.rows.append(nn.Parameter(torch.full((len(op.names),), 1.0 / len(op.names))))
            i = self.keys.index(key)
            if self.names[i] != op.names:
                raise ValueError(f"ArchParameters: MixedOps sharing key {key!r} name different candidates: "
                                 f"{self.names[i]} and {op.names} ({name})")
            self.edges[name] = i
            object.__setattr__(op, "_arch_row", self.rows[i])  # bound, not registered in the model

    def row(self, key: str) -> nn.Parameter:
        return self.rows[self.keys.index(key)]

    def choices(self) -> Dict[str, str]:
        """The derived architecture: the highest-weighted candidate's name per MixedOp."""
        return {edge: self.names[i][int(self.rows[i].detach().argmax())] for edge, i in self.edges.items()}

    def entropy(self) -> float:
        """Mean entropy of the rows in nats (log n for a uniform row, 0 for a one-hot one)."""
        total = 0.0
        for r in self.rows:
            w = r.detach().double().clamp_min(1e-30)
            total += float(-(w * w.log()).sum())
        return total / len(self.rows)

    def max_entropy(self) -> float:
        return sum(math.log(len(n)) for n in self.names) / len(self.names)


def choices(model: nn.Module) -> Dict[str, str]:
    """The derived choice per MixedOp of `model`, by module name, from the rows bound to them."""
    out = {}
    for name, op in mixed_ops(model).items():
        if op._arch_row is None:
            raise RuntimeError(f"choices: MixedOp {name!r} has no bound weights (create ArchParameters(model))")
        out[name] = op.names[int(op._arch_row.detach().argmax())]
    return out
