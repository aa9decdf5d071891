"""The mixed operation: a weighted sum of candidate ops on one edge.

`none` is never run: its output is zero, so it adds nothing to the sum and its weight's
gradient, sum(grad * 0), is exactly zero without computing it. Both the fused kernels and the
pure-PyTorch twin (`fused=False`, the `--no-fused` path) see the same candidate modules, so an
A/B comparison measures only the kernels and what they let autograd keep.

On the fused path each candidate is looked at structurally, once, at construction:
- Parameter-free candidates: when a stride-1 edge has a bare 3x3 pool (NB201's avg_pool_3x3;
  a max_pool_3x3 built the same way), the bare pools and skip_connect (nn.Identity) are not run
  as modules but computed from the edge input inside ops.mixed_op_pf, which never writes them
  to memory. A pool followed by anything, e.g. DARTS' search pools (pool + BatchNorm), is not
  bare; an edge with skip_connect but no bare pool (DARTS) keeps skip as an ordinary input:
  there is nothing to save.
- A candidate that is a plain chain of modules (nn.Sequential and subclasses without their own
  forward, nested) starting with ReLU shares one ReLU(x) with the edge's other such
  candidates (NB201's two ReLU-Conv-BN, DARTS' four sep/dil convs): one saved copy, not one
  per candidate.
- A chain ending in BatchNorm2d(affine=False) in training mode has that BN folded into
  gaea_ext.bn_mixed.mixed_op_bn: only its input z is saved, not the normalized output as well
  (DARTS' pools + BN included). The running statistics and num_batches_tracked advance as the
  module's own forward would advance them. In eval mode the BN runs as a module.
Weights are reordered to the ops' convention (plain outputs, then BN inputs, then pf codes).

With a hard choice (GDAS) only the chosen op runs, as a module. Its output is scaled by its
(one-hot, straight-through) weight, and the other weights are added as zero-valued scalars so
that they still receive a gradient, as in GDAS (Dong & Yang, CVPR 2019).
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from gaea_ext import ops, reference
import gaea_ext.bn_mixed  # noqa: F401  (mixed_op_bn's fake kernels)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def pf_code(module: nn.Module) -> Optional[int]:
    """The mixed_op_pf code of a bare stride-1 parameter-free candidate, else None."""
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
    nn.Sequential (or a subclass that keeps Sequential's forward)."""
    if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward:
        return [module]
    return [leaf for m in module for leaf in chain(m)]


class Plan(NamedTuple):
    """How the fused path runs one parametric candidate: ReLU(x) shared or not, the modules
    after it, and a trailing BatchNorm(affine=False) to fold (None: none to fold)."""

    relu: bool
    body: List[nn.Module]
    bn: Optional[nn.BatchNorm2d]


def plan(module: nn.Module) -> Plan:
    leaves = chain(module)
    relu = len(leaves) > 1 and type(leaves[0]) is nn.ReLU and not leaves[0].inplace
    bn = leaves[-1] if len(leaves) > 1 else None
    if not (type(bn) is nn.BatchNorm2d and bn.weight is None):
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
    w_index: List[int]               # weight index per candidate: plain, folded, pf
    running_means: List[torch.Tensor]
    running_vars: List[torch.Tensor]
    batches_tracked: List[torch.Tensor]
    momentum: Optional[float]
    eps: float


class MixedOp(nn.Module):
    def __init__(self, names: Sequence[str], build: Dict[str, Callable[[], nn.Module]], fused: bool,
                 stride: int = 1):
        super().__init__()
        self.names = list(names)
        self.stride = stride
        self.fused = fused
        self.live = [i for i, n in enumerate(self.names) if n != "none"]
        self.ops = nn.ModuleList(build[self.names[i]]() for i in self.live)
        self.slot = {k: s for s, k in enumerate(self.live)}  # weight index -> position in self.ops
        self.all_slots = tuple(range(len(self.ops)))
        # Fused path (see the module docstring): pf code per slot computed in the kernel, and
        # the plan of every other slot. Plain python containers: the modules stay registered
        # once, in self.ops.
        self.pf_slots: Dict[int, int] = {}
        self.plans: Dict[int, Plan] = {}
        if fused:
            codes = [pf_code(op) if stride == 1 else None for op in self.ops]
            if any(c in (reference.PF_CODES["avg_pool_3x3"], reference.PF_CODES["max_pool_3x3"]) for c in codes):
                self.pf_slots = {s: c for s, c in enumerate(codes) if c is not None}
            self.plans = {s: plan(op) for s, op in enumerate(self.ops) if s not in self.pf_slots}
        self._orders: Dict[tuple, torch.Tensor] = {}
        self._edge_plans: Dict[tuple, EdgePlan] = {}

    def _apply(self, fn, *args, **kwargs):
        # .to() / .double() / .cuda() may replace the BN buffers the cached plans hold.
        self._edge_plans.clear()
        self._orders.clear()
        return super()._apply(fn, *args, **kwargs)

    def _zero(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x[:, :, ::self.stride, ::self.stride])

    def _index(self, order: List[int], device: torch.device) -> torch.Tensor:
        key = (tuple(order), device)
        if key not in self._orders:
            self._orders[key] = torch.tensor(order, dtype=torch.long, device=device)
        return self._orders[key]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, hard: Union[int, Tuple[int, ...], None] = None
                ) -> torch.Tensor:
        """weights: this edge's row of mixing weights, one per name (none included). hard:
        None, the full mixture; an int, the only op to compute (GDAS); a tuple of indices,
        the ops still computed (--prune-below), mixed with their weights as usual."""
        if isinstance(hard, int):
            chosen = self.ops[self.slot[hard]](x) if hard in self.slot else self._zero(x)
            others = weights.sum() - weights[hard]  # zero in value, carries the gradient
            return chosen * weights[hard] + others
        slots = self.all_slots if hard is None else tuple(self.slot[k] for k in hard if k in self.slot)
        if not slots:
            return self._zero(x)
        if self.fused:
            return self._fused(x, weights, slots)
        if len(slots) == len(self.names):
            w = weights
        else:
            w = weights.index_select(0, self._index([self.live[s] for s in slots], weights.device))
        return reference.mixed_op([self.ops[s](x) for s in slots], w)

    def edge_plan(self, slots: Tuple[int, ...]) -> EdgePlan:
        """The fused path's plan for computing `slots`, in the current train/eval mode (cached;
        a BN folds when it is in training mode and shares momentum, eps and running-stat
        tracking with the edge's first folded BN: one op takes one of each)."""
        key = (slots, self.training)
        cached = self._edge_plans.get(key)
        if cached is not None:
            return cached
        plain, folded, bns, codes = [], [], [], []
        order_y, order_z, order_pf = [], [], []
        relu = False
        for s in slots:
            if s in self.pf_slots:
                codes.append(self.pf_slots[s])
                order_pf.append(self.live[s])
                continue
            p = self.plans[s]
            relu = relu or p.relu
            if p.bn is not None and self._foldable(p.bn, bns):
                folded.append(p)
                bns.append(p.bn)
                order_z.append(self.live[s])
            else:
                plain.append(p)
                order_y.append(self.live[s])
        first = bns[0] if bns else None
        track = first is not None and first.track_running_stats and first.running_mean is not None
        made = EdgePlan(
            relu, plain, folded, codes, order_y + order_z + order_pf,
            [bn.running_mean for bn in bns] if track else [],
            [bn.running_var for bn in bns] if track else [],
            [bn.num_batches_tracked for bn in bns] if track and first.num_batches_tracked is not None else [],
            None if first is None else first.momentum, 1e-5 if first is None else first.eps)
        self._edge_plans[key] = made
        return made

    @staticmethod
    def _body(p: Plan, x: torch.Tensor, relu: Optional[torch.Tensor]) -> torch.Tensor:
        h = relu if p.relu else x
        for m in p.body:
            h = m(h)
        return h

    def _fused(self, x: torch.Tensor, weights: torch.Tensor, slots: Tuple[int, ...]) -> torch.Tensor:
        e = self.edge_plan(slots)
        relu = torch.relu(x) if e.relu else None
        ys = [self._body(p, x, relu) if p.bn is None else p.bn(self._body(p, x, relu)) for p in e.plain]
        if e.folded:
            # One native op (csrc/): BN statistics, running-stat update, normalize, pool/skip
            # from x and mix; weights is the edge's whole row, read through w_index.
            zs = [self._body(p, x, relu) for p in e.folded]
            return torch.ops.gaea.mixed_op_bn.default(
                x, ys, zs, weights, e.pf, e.running_means, e.running_vars, e.batches_tracked, e.momentum, e.eps,
                e.w_index)[0]
        order = e.w_index
        w = weights if order == list(range(len(self.names))) else weights.index_select(0, self._index(order, weights.device))
        if e.pf:
            return ops.mixed_op_pf(x, ys, w, e.pf)
        return ops.mixed_op(ys, w)

    @staticmethod
    def _foldable(bn: nn.BatchNorm2d, folded: List[nn.BatchNorm2d]) -> bool:
        if not bn.training:
            return False
        if not folded:
            return True
        first = folded[0]
        return (bn.eps, bn.momentum, bn.track_running_stats) == (first.eps, first.momentum, first.track_running_stats)
