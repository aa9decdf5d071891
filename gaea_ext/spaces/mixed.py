"""The mixed operation: a weighted sum of candidate ops on one edge.

`none` is never run: its output is zero, so it adds nothing to the sum and its weight's
gradient, sum(grad * 0), is exactly zero without computing it. Both the fused kernel and the
pure-PyTorch twin (`fused=False`, the `--no-fused` path) see the same candidate list, so an
A/B comparison measures only the kernels.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
from torch import nn

from gaea_ext import ops, reference


def mix_fn(fused: bool) -> Callable:
    return ops.mixed_op if fused else reference.mixed_op


class MixedOp(nn.Module):
    def __init__(self, names: Sequence[str], build: Dict[str, Callable[[], nn.Module]], fused: bool):
        super().__init__()
        self.names = list(names)
        self.live = [i for i, n in enumerate(self.names) if n != "none"]
        self.ops = nn.ModuleList(build[self.names[i]]() for i in self.live)
        self.register_buffer("live_idx", torch.tensor(self.live, dtype=torch.long), persistent=False)
        self.mix = mix_fn(fused)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """weights: this edge's row of architecture weights, one per name (none included)."""
        if not self.live:
            return torch.zeros_like(x)
        w = weights if len(self.live) == len(self.names) else weights.index_select(0, self.live_idx)
        return self.mix([op(x) for op in self.ops], w)
