"""The mixed operation: a weighted sum of candidate ops on one edge.

`none` is never run: its output is zero, so it adds nothing to the sum and its weight's
gradient, sum(grad * 0), is exactly zero without computing it. Both the fused kernel and the
pure-PyTorch twin (`fused=False`, the `--no-fused` path) see the same candidate list, so an
A/B comparison measures only the kernels.

With a hard choice (GDAS) only the chosen op runs. Its output is scaled by its (one-hot,
straight-through) weight, and the other weights are added as zero-valued scalars so that they
still receive a gradient, as in GDAS (Dong & Yang, CVPR 2019).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from gaea_ext import ops, reference


def mix_fn(fused: bool) -> Callable:
    return ops.mixed_op if fused else reference.mixed_op


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
        w = weights if len(self.live) == len(self.names) else weights.index_select(0, self.live_idx)
        return self.mix([op(x) for op in self.ops], w)
