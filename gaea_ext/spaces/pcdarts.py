"""PC-DARTS partial channel connections (Xu et al., ICLR 2020).

Only 1/K of an edge's input channels go through the mixed op; the rest bypass it (max-pooled
when the edge strides) and the two parts are channel-shuffled back together, so every channel
takes the mixed path in some later edge. The mixed op thus runs on C/K channels: K times less
activation memory and compute per candidate, which is what lets PC-DARTS search with batch 256.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from gaea_ext.spaces.darts_ops import channel_shuffle, search_candidate
from gaea_ext.spaces.mixed import MixedOp


def edge_candidates(names: Sequence[str], c: int, stride: int):
    return {n: (lambda n=n: search_candidate(n, c, stride)) for n in names if n != "none"}


def dense_slice(x: torch.Tensor, part: int) -> torch.Tensor:
    """x[:, :part], made dense once, in x's own layout.

    The slice of the channel dim is dense in neither NCHW nor NHWC (its batch stride still
    spans all C channels), so the fused kernels, which keep a layout only when all their
    inputs share it, fell back to NCHW and transposed every candidate of a channels_last edge,
    in the forward and again in the backward. One copy here replaces those.
    """
    xs = x[:, :part]
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return xs.contiguous(memory_format=torch.channels_last)
    return xs.contiguous()


class PartialEdge(nn.Module):
    """A DARTS edge whose mixed op sees ``c // k`` channels (k=1: a plain DARTS edge)."""

    def __init__(self, c: int, stride: int, names: Sequence[str], fused: bool, k: int = 1):
        super().__init__()
        if c % k:
            raise ValueError(f"partial channels: {c} channels do not split into k={k} parts")
        self.k, self.part = k, c // k
        self.mixed = MixedOp(names, edge_candidates(names, self.part, stride), fused, stride)
        self.bypass = nn.MaxPool2d(2, 2) if (k > 1 and stride == 2) else None

    def forward(self, x: torch.Tensor, weights: torch.Tensor, hard: Optional[int] = None) -> torch.Tensor:
        if self.k == 1:
            return self.mixed(x, weights, hard)
        mixed = self.mixed(dense_slice(x, self.part), weights, hard)
        rest = x[:, self.part:]
        if self.bypass is not None:
            rest = self.bypass(rest)
        return channel_shuffle(torch.cat([mixed, rest], dim=1), self.k)
