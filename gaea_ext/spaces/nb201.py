"""NAS-Bench-201 topology space (Dong & Yang, ICLR 2020) as a weight-sharing supernet.

A cell is a 4-node DAG with 6 edges (0->1, 0->2, 1->2, 0->3, 1->3, 2->3); node j sums the
mixed ops on its incoming edges, node 3 is the output. The macro net is stem, N cells at C,
a residual reduction block, N cells at 2C, a reduction block, N cells at 4C, BN-ReLU, global
pool, linear. All cells share one set of architecture weights, passed in at forward time so
the search method owns them (simplex for GAEA, softmax logits for DARTS).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from gaea_ext.benchmarks.nb201 import EDGES, OPS, arch_str
from gaea_ext.spaces.arch import ArchParam
from gaea_ext.spaces.mixed import MixedOp


def _table(arch):
    """(weights [6, ops], hard choices or None) from ArchWeights or a bare tensor."""
    if isinstance(arch, torch.Tensor):
        return arch, None
    return arch["cell"], arch.index("cell")


class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in, c_out, kernel, stride, padding, affine=True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class ResidualReduction(nn.Module):
    """NB201's ResNet basic block with stride 2 between stages."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, 2, 1)
        self.conv_b = ReLUConvBN(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(c_in, c_out, 1, bias=False))

    def forward(self, x):
        return self.shortcut(x) + self.conv_b(self.conv_a(x))


def candidate_builders(c: int):
    # Cells' BN is affine=False, as in NB201 and GAEA's search runs.
    return {
        "skip_connect": nn.Identity,
        "nor_conv_1x1": lambda: ReLUConvBN(c, c, 1, 1, 0, affine=False),
        "nor_conv_3x3": lambda: ReLUConvBN(c, c, 3, 1, 1, affine=False),
        "avg_pool_3x3": lambda: nn.AvgPool2d(3, 1, 1, count_include_pad=False),
    }


class SearchCell(nn.Module):
    def __init__(self, c: int, op_names: Sequence[str], fused: bool):
        super().__init__()
        build = candidate_builders(c)
        self.edges = nn.ModuleList(MixedOp(op_names, build, fused) for _ in EDGES)

    def forward(self, x, weights, hard=None):
        # One unbind per cell (a view; its backward is one stack) rather than a select per
        # edge (a select_backward each, then one add per edge into the table's gradient).
        weights = weights.unbind(0)
        nodes = [x]
        for j in range(1, 4):
            node = None
            for e, (i, t) in enumerate(EDGES):
                if t == j:
                    out = self.edges[e](nodes[i], weights[e], None if hard is None else hard[e])
                    node = out if node is None else node + out  # not sum(): no `0 + out` op
            nodes.append(node)
        return nodes[3]


class NB201Network(nn.Module):
    def __init__(self, c: int = 16, n: int = 5, num_classes: int = 10, in_channels: int = 3,
                 exclude_none: bool = True, fused: bool = True):
        super().__init__()
        self.op_names: List[str] = [o for o in OPS if not (exclude_none and o == "none")]
        self.num_edges = len(EDGES)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        layers: List[nn.Module] = []
        c_prev = c
        for stage, width in enumerate((c, 2 * c, 4 * c)):
            if stage > 0:
                layers.append(ResidualReduction(c_prev, width))
            layers += [SearchCell(width, self.op_names, fused) for _ in range(n)]
            c_prev = width
        self.layers = nn.ModuleList(layers)
        self.head = nn.Sequential(nn.BatchNorm2d(c_prev), nn.ReLU(inplace=False))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def arch_shape(self):
        return (self.num_edges, len(self.op_names))

    def arch_spec(self):
        return [ArchParam("cell", self.arch_shape())]

    def forward(self, x: torch.Tensor, arch) -> torch.Tensor:
        """arch: ArchWeights with a [6, n_ops] "cell" table (rows on the simplex) shared by all
        cells, or that table as a tensor."""
        weights, hard = _table(arch)
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x, weights, hard) if isinstance(layer, SearchCell) else layer(x)
        x = self.pool(self.head(x)).flatten(1)
        return self.classifier(x)

    def genotype(self, arch) -> str:
        """Argmax op per edge, as the benchmark's architecture string."""
        best = _table(arch)[0].detach().argmax(dim=-1).tolist()
        return arch_str([self.op_names[i] for i in best])
