"""MixedOp: one choice among candidate modules, as the weighted sum GAEA searches over.

`MixedOp(candidates)` takes a dict name -> module (or a list, named "0", "1", ...); a
candidate given as None is the zero op, which is never run (its output is zero, so it adds
nothing to the sum and its weight's gradient, sum(grad * 0), is exactly zero). `op(x,
weights)` (or `op.edge(x, weights)`) returns sum_k weights[k] * candidate_k(x) with weights
one row of the simplex, one entry per candidate; `op(x)` reads the row that
gaea_ext.nn.ArchParameters bound to it.

Fused (the default), each candidate is planned once, structurally (gaea_ext/nn/plan.py), and
a call runs only the candidates' bodies and one native op: mixed_op, mixed_op_pf
(parameter-free candidates computed from x in the kernel) or mixed_op_bn (trailing
BatchNorm(affine=False) folded, only its input saved), with one ReLU(x) shared by the
candidates that start with one. Strides and output shapes are free, as long as every
computed candidate returns one shape. Where the kernels cannot take the outputs (more than
64 candidates, dtypes that differ or are not float, weights of another dtype) the edge falls
back to the eager sum over the same modules, warns, and says why in `fallback_reason`;
`fusion()` tells how each candidate runs. `fused=False` is the pure-PyTorch twin (each
candidate a module, then the eager sum) for A/B runs.

`hard` selects what is computed: an int, only that candidate, scaled by its (one-hot,
straight-through) weight, the other weights added as zero-valued scalars so that they still
receive a gradient (GDAS, Dong & Yang, CVPR 2019); a tuple of indices, the candidates still
computed (pruning), mixed as usual.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from gaea_ext import ops, reference
import gaea_ext.bn_mixed  # noqa: F401  (mixed_op_bn's fake kernels)
from gaea_ext.nn.plan import EdgePlan, Plan, foldable, pf_code, plan

MAX_CANDIDATES = 64  # csrc/common.h kMaxK: computed outputs one kernel call takes
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_POOLS = (reference.PF_CODES["avg_pool_3x3"], reference.PF_CODES["max_pool_3x3"])

Candidates = Union[Mapping[str, Optional[nn.Module]], Sequence[Optional[nn.Module]]]


class MixedOp(nn.Module):
    def __init__(self, candidates: Candidates, fused: bool = True, *, key: Optional[str] = None, stride: int = 1):
        """candidates: name -> module (None: the zero op), or a list. key: ArchParameters
        gives MixedOps with one key one shared row (default: a row per MixedOp). stride:
        only shapes the zero output when no other candidate is computed."""
        super().__init__()
        items = list(candidates.items()) if isinstance(candidates, Mapping) else \
            [(str(i), m) for i, m in enumerate(candidates)]
        for name, m in items:
            if m is not None and not isinstance(m, nn.Module):
                raise TypeError(f"MixedOp: candidate {name!r} is a {type(m).__name__}, not an nn.Module or None")
        self.names = [str(n) for n, _ in items]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"MixedOp: candidate names repeat: {self.names}")
        self.live = [i for i, (_, m) in enumerate(items) if m is not None]
        if not self.live:
            raise ValueError("MixedOp: no candidate to compute (all are None)")
        self.key, self.stride = key, stride
        self.ops = nn.ModuleList(items[i][1] for i in self.live)
        self.slot = {k: s for s, k in enumerate(self.live)}  # weight index -> position in self.ops
        self.all_slots = tuple(range(len(self.ops)))
        self._arch_row: Optional[torch.Tensor] = None  # bound by ArchParameters; not registered here
        self.fused = fused  # plans the fused path

    @property
    def fused(self) -> bool:
        return self._fused_flag

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused_flag = bool(value)
        self.replan()

    def replan(self) -> None:
        """Plan the fused path again (after hooks were added inside a candidate, say). Plain
        python containers: the modules stay registered once, in self.ops."""
        self.pf_slots: Dict[int, int] = {}  # slot -> mixed_op_pf code, computed in the kernel
        self.plans: Dict[int, Plan] = {}    # every other slot's plan
        self._static_reason: Optional[str] = None  # the whole edge mixes eagerly, and why
        self.__dict__.pop("_last_reason", None)
        self._orders: Dict[tuple, torch.Tensor] = {}
        self._edge_plans: Dict[tuple, EdgePlan] = {}
        if not self.fused:
            return
        codes = [pf_code(op) for op in self.ops]
        # Skip alone saves nothing in the kernel (it is x itself); with a bare pool, skip and
        # the pools are all read from x there and never written.
        if any(c in _POOLS for c in codes):
            self.pf_slots = {s: c for s, c in enumerate(codes) if c is not None}
        self.plans = {s: plan(op) for s, op in enumerate(self.ops) if s not in self.pf_slots}
        if len(self.plans) > MAX_CANDIDATES:
            self._static_reason = f"{len(self.plans)} computed candidates, the kernels take {MAX_CANDIDATES}"

    def _apply(self, fn, *args, **kwargs):
        # .to() / .double() / .cuda() may replace the BN buffers the cached plans hold.
        self._edge_plans.clear()
        self._orders.clear()
        return super()._apply(fn, *args, **kwargs)

    @property
    def candidates(self) -> Dict[str, Optional[nn.Module]]:
        return {n: (self.ops[self.slot[k]] if k in self.slot else None) for k, n in enumerate(self.names)}

    def fusion(self) -> Dict[str, str]:
        """How each candidate runs on this edge (training mode, all computed), by name."""
        if not self.fused:
            how = {s: "module, eager sum (fused=False)" for s in self.all_slots}
        elif self._static_reason is not None:
            how = {s: f"module, eager sum ({self._static_reason})" for s in self.all_slots}
        else:
            names = {c: n for n, c in reference.PF_CODES.items()}
            how = {s: f"in the kernel from x ({names[c]}), never stored" for s, c in self.pf_slots.items()}
            how.update({s: p.describe() for s, p in self.plans.items()})
        return {n: (how[self.slot[k]] if k in self.slot else "zero, never run") for k, n in enumerate(self.names)}

    def _zero(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x[:, :, ::self.stride, ::self.stride])

    def _index(self, order: List[int], device: torch.device) -> torch.Tensor:
        key = (tuple(order), device)
        if key not in self._orders:
            self._orders[key] = torch.tensor(order, dtype=torch.long, device=device)
        return self._orders[key]

    def _pick(self, weights: torch.Tensor, order: List[int]) -> torch.Tensor:
        if order == list(range(len(self.names))):
            return weights
        return weights.index_select(0, self._index(order, weights.device))

    def edge(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_k weights[k] * candidate_k(x); weights: one entry per candidate, zeros included."""
        return self.forward(x, weights)

    def forward(self, x: torch.Tensor, weights: Optional[torch.Tensor] = None,
                hard: Union[int, Tuple[int, ...], None] = None) -> torch.Tensor:
        """weights: this edge's row of mixing weights, one per candidate name (None: the row
        ArchParameters bound). hard: see the module docstring."""
        if weights is None:
            weights = self._arch_row
            if weights is None:
                raise RuntimeError("MixedOp: no weights given and none bound; pass op(x, weights) or create "
                                   "gaea_ext.nn.ArchParameters(model) first")
        if isinstance(hard, int):
            chosen = self.ops[self.slot[hard]](x) if hard in self.slot else self._zero(x)
            others = weights.sum() - weights[hard]  # zero in value, carries the gradient
            return chosen * weights[hard] + others
        slots = self.all_slots if hard is None else tuple(self.slot[k] for k in hard if k in self.slot)
        if not slots:
            return self._zero(x)
        if self.fused and self._static_reason is None:
            return self._fused(x, weights, slots)
        order = [self.live[s] for s in slots]
        ys = [self.ops[s](x) for s in slots]
        self._check_shapes(ys, order)
        return reference.mixed_op(ys, self._pick(weights, order))

    def edge_plan(self, slots: Tuple[int, ...]) -> EdgePlan:
        """The fused path's plan for computing `slots`, in the current train/eval mode (cached)."""
        key = (slots, self.training)
        cached = self._edge_plans.get(key)
        if cached is not None:
            return cached
        plain, folded, bns, codes, pf_modules = [], [], [], [], []
        order_y, order_z, order_pf = [], [], []
        relu = False
        for s in slots:
            if s in self.pf_slots:
                codes.append(self.pf_slots[s])
                pf_modules.append(self.ops[s])
                order_pf.append(self.live[s])
                continue
            p = self.plans[s]
            relu = relu or p.relu
            if p.bn is not None and foldable(p.bn, bns):
                folded.append(p)
                bns.append(p.bn)
                order_z.append(self.live[s])
            else:
                plain.append(p)
                order_y.append(self.live[s])
        first = bns[0] if bns else None
        track = first is not None and first.track_running_stats and first.running_mean is not None
        made = EdgePlan(
            relu, plain, folded, codes, pf_modules, order_y + order_z + order_pf,
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
        zs = [self._body(p, x, relu) for p in e.folded]
        outs = ys + zs
        ref = x if e.pf else outs[0]
        shape, dtype = ref.shape, ref.dtype
        ok = dtype in _FLOATS and (weights.dtype is torch.float32 or weights.dtype is dtype)
        for t in outs:  # one cheap pass on every call; the diagnosis only when it fails
            ok = ok and t.shape == shape and t.dtype is dtype
        if not ok:
            self._check_shapes(outs, e.w_index, x if e.pf else None)
            return self._fallback(_unfusable(x if e.pf else None, outs, weights), x, ys, zs, weights, e)
        if e.folded:
            # One native op (csrc/): BN statistics, running-stat update, normalize, pool/skip
            # from x and mix; weights is the edge's whole row, read through w_index.
            return torch.ops.gaea.mixed_op_bn.default(
                x, ys, zs, weights, e.pf, e.running_means, e.running_vars, e.batches_tracked, e.momentum, e.eps,
                e.w_index)[0]
        w = self._pick(weights, e.w_index)
        if e.pf:
            return ops.mixed_op_pf(x, ys, w, e.pf)
        return ops.mixed_op(ys, w)

    def _fallback(self, reason: str, x, ys, zs, weights, e: EdgePlan) -> torch.Tensor:
        """The eager sum over what the fused path already ran: folded BNs and parameter-free
        candidates run as their modules (the BNs' running statistics advance once, as usual)."""
        if not torch.compiler.is_compiling() and reason != self.__dict__.get("_last_reason"):
            self.__dict__["_last_reason"] = reason
            warnings.warn(f"gaea_ext.nn.MixedOp: eager sum on this edge: {reason}", stacklevel=3)
        outs = [*ys, *(p.bn(z) for p, z in zip(e.folded, zs)), *(m(x) for m in e.pf_modules)]
        return reference.mixed_op(outs, self._pick(weights, e.w_index))

    def _check_shapes(self, outs: List[torch.Tensor], order: List[int], x: Optional[torch.Tensor] = None) -> None:
        """Candidates of one edge must agree in shape (the parameter-free ones return x's)."""
        shape = x.shape if x is not None else outs[0].shape
        if any(t.shape != shape for t in outs):
            got = {self.names[k]: tuple(t.shape) for k, t in zip(order, outs)}
            if x is not None:
                got.update({self.names[k]: tuple(x.shape) for k in order[len(outs):]})
            raise ValueError(f"MixedOp: candidate outputs differ in shape, so they cannot be summed: {got}")

    @property
    def fallback_reason(self) -> Optional[str]:
        """Why this edge mixes eagerly on the fused path: for good (e.g. too many candidates),
        or the last time the outputs did not suit the kernels (None: it never did)."""
        return self._static_reason or self.__dict__.get("_last_reason")


def _unfusable(x: Optional[torch.Tensor], outs: List[torch.Tensor], weights: torch.Tensor) -> Optional[str]:
    """Why the kernels cannot take these outputs (None: they can); the fakes' and csrc's checks
    that are not plain errors of the model."""
    ref = outs[0] if outs else x
    dtype = ref.dtype
    if dtype not in _FLOATS:
        return f"candidate outputs are {dtype}, the kernels take float32/64, float16 and bfloat16"
    if any(t.dtype != dtype for t in outs) or (x is not None and x.dtype != dtype):
        kinds = sorted({str(t.dtype) for t in outs} | ({str(x.dtype)} if x is not None else set()))
        return f"candidate outputs (and input) mix dtypes {', '.join(kinds)}"
    if weights.dtype not in (torch.float32, dtype):
        return f"weights are {weights.dtype}, the kernels take float32 or the outputs' {dtype}"
    return None
