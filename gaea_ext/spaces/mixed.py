"""The mixed operation: a weighted sum of candidate ops on one edge.

`none` is never run: its output is zero, so it adds nothing to the sum and its weight's
gradient, sum(grad * 0), is exactly zero without computing it. Both the fused kernel and the
pure-PyTorch twin (`fused=False`, the `--no-fused` path) see the same candidate list, so an
A/B comparison measures only the kernels.

Parameter-free candidates on the fused path: when a stride-1 edge has a bare 3x3 pool
(NB201's avg_pool_3x3; a max_pool_3x3 built the same way), the bare pools and skip_connect
(nn.Identity) are not run as modules but computed from the edge input inside
ops.mixed_op_pf, which never writes them to memory: autograd keeps x once instead of one
pooled copy per pool, and the pools' own forward and backward passes disappear. Recognition
is structural (the module's type and exact settings), so a pool followed by anything, e.g.
DARTS' search pools, which are nn.Sequential(pool, BatchNorm2d(affine=False)) and need the
pooled tensor's batch statistics, stays an ordinary candidate, and an edge with skip_connect
but no bare pool (DARTS) keeps plain mixed_op: there is nothing to save. The weights are
reordered to the op's convention (parametric candidates first); `fused=False` runs every
module as before.

With a hard choice (GDAS) only the chosen op runs. Its output is scaled by its (one-hot,
straight-through) weight, and the other weights are added as zero-valued scalars so that they
still receive a gradient, as in GDAS (Dong & Yang, CVPR 2019).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from gaea_ext import ops, reference


def mix_fn(fused: bool) -> Callable:
    return ops.mixed_op if fused else reference.mixed_op


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


class MixedOp(nn.Module):
    def __init__(self, names: Sequence[str], build: Dict[str, Callable[[], nn.Module]], fused: bool,
                 stride: int = 1):
        super().__init__()
        self.names = list(names)
        self.stride = stride
        self.live = [i for i, n in enumerate(self.names) if n != "none"]
        self.ops = nn.ModuleList(build[self.names[i]]() for i in self.live)
        self.slot = {k: s for s, k in enumerate(self.live)}  # weight index -> position in self.ops
        self.register_buffer("live_idx", torch.tensor(self.live, dtype=torch.long), persistent=False)
        self.mix = mix_fn(fused)
        # Fused stride-1 edges with a bare pool: slots run as modules, then the pf codes of
        # the rest, and the weight order that goes with them (see the module docstring).
        self.param_slots: Optional[List[int]] = None
        codes = [pf_code(op) if fused and stride == 1 else None for op in self.ops]
        if any(c in (reference.PF_CODES["avg_pool_3x3"], reference.PF_CODES["max_pool_3x3"]) for c in codes):
            self.param_slots = [s for s, c in enumerate(codes) if c is None]
            pf_slots = [s for s, c in enumerate(codes) if c is not None]
            self.pf_codes = [codes[s] for s in pf_slots]
            order = [self.live[s] for s in self.param_slots + pf_slots]
            self.register_buffer("pf_order", torch.tensor(order, dtype=torch.long), persistent=False)

    def _zero(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x[:, :, ::self.stride, ::self.stride])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, hard: Optional[int] = None) -> torch.Tensor:
        """weights: this edge's row of mixing weights, one per name (none included);
        hard: index of the only op to compute (GDAS), or None for the full mixture."""
        if hard is not None:
            chosen = self.ops[self.slot[hard]](x) if hard in self.slot else self._zero(x)
            others = weights.sum() - weights[hard]  # zero in value, carries the gradient
            return chosen * weights[hard] + others
        if not self.live:
            return self._zero(x)
        if self.param_slots is not None:
            w = weights.index_select(0, self.pf_order)
            return ops.mixed_op_pf(x, [self.ops[s](x) for s in self.param_slots], w, self.pf_codes)
        w = weights if len(self.live) == len(self.names) else weights.index_select(0, self.live_idx)
        return self.mix([op(x) for op in self.ops], w)
