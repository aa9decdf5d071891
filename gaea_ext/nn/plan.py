"""Structural planning of a mixed op's candidates: what the fused path can do without running
a candidate as its own module.

Each candidate is looked at once, by the modules it is made of (never by running it):
- Parameter-free: a bare nn.Identity or a 3x3, stride-1, pad-1 pool (avg with
  count_include_pad=False, or max) is computed from the edge input inside ops.mixed_op_pf and
  never written to memory (`pf_code`).
- A plain chain of modules (nn.Sequential, or a subclass without its own forward, nested)
  starting with a non-inplace ReLU shares one ReLU(x) with the edge's other such candidates.
- A chain ending in BatchNorm2d(affine=False) may have that BN folded into mixed_op_bn.
Anything else (a module with its own forward, an inplace ReLU, an affine BN) runs as a module.
A module with hooks is never taken apart: its hooks would not fire if its children ran alone.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import nn

from gaea_ext import reference


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def pf_code(module: nn.Module) -> Optional[int]:
    """The mixed_op_pf code of a bare stride-1 parameter-free candidate, else None."""
    if has_hooks(module):
        return None
    if type(module) is nn.Identity:
        return reference.PF_CODES["skip_connect"]
    if type(module) not in (nn.AvgPool2d, nn.MaxPool2d):
        return None
    window = (_pair(module.kernel_size), _pair(module.stride), _pair(module.padding))
    if window != ((3, 3), (1, 1), (1, 1)) or module.ceil_mode:
        return None
    if type(module) is nn.AvgPool2d:
        if module.count_include_pad or module.divisor_override is not None:
            return None
        return reference.PF_CODES["avg_pool_3x3"]
    if _pair(module.dilation) != (1, 1) or module.return_indices:
        return None
    return reference.PF_CODES["max_pool_3x3"]


def chain(module: nn.Module) -> List[nn.Module]:
    """The leaf modules a module applies one after another: itself unless it is an
    nn.Sequential (or a subclass that keeps Sequential's forward) without hooks."""
    if (not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward
            or has_hooks(module)):
        return [module]
    return [leaf for m in module for leaf in chain(m)]


class Plan(NamedTuple):
    """How the fused path runs one parametric candidate: ReLU(x) shared or not, the modules
    after it, and a trailing BatchNorm(affine=False) to fold (None: none to fold)."""

    relu: bool
    body: List[nn.Module]
    bn: Optional[nn.BatchNorm2d]

    def describe(self) -> str:
        parts = (["shared ReLU"] if self.relu else []) + [f"{len(self.body)} module(s)"]
        if self.bn is not None:
            parts.append("BN folded in training mode")
        return " + ".join(parts)


def plan(module: nn.Module) -> Plan:
    leaves = chain(module)
    first = leaves[0]
    relu = len(leaves) > 1 and type(first) is nn.ReLU and not first.inplace and not has_hooks(first)
    bn = leaves[-1] if len(leaves) > 1 else None
    if not (type(bn) is nn.BatchNorm2d and bn.weight is None and not has_hooks(bn)):
        bn = None
    return Plan(relu, leaves[int(relu):len(leaves) - (bn is not None)], bn)


class EdgePlan(NamedTuple):
    """Everything the fused path of one edge decides once (per set of computed candidates and
    train/eval mode), so a call only runs the candidate bodies and one op: the candidates in
    the op's order (plain outputs, BN inputs, pf codes), each with its weight's index in the
    edge's row, and the folded BNs' buffers."""

    relu: bool                       # some candidate starts with the shared ReLU(x)
    plain: List[Plan]                # run to an output y (BN, if any, run as a module)
    folded: List[Plan]               # run to the folded BN's input z
    pf: List[int]                    # mixed_op_pf codes
    pf_modules: List[nn.Module]      # the pf candidates' modules, for the eager fallback
    w_index: List[int]               # weight index per candidate: plain, folded, pf
    running_means: List[torch.Tensor]
    running_vars: List[torch.Tensor]
    batches_tracked: List[torch.Tensor]
    momentum: Optional[float]
    eps: float


def foldable(bn: nn.BatchNorm2d, folded: List[nn.BatchNorm2d]) -> bool:
    """A BN folds in training mode when it shares momentum, eps and running-stat tracking with
    the edge's first folded BN (one op takes one of each)."""
    if not bn.training:
        return False
    if not folded:
        return True
    first = folded[0]
    return (bn.eps, bn.momentum, bn.track_running_stats) == (first.eps, first.momentum, first.track_running_stats)
