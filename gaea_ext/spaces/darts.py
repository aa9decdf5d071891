"""DARTS search space (Liu et al., ICLR 2019) as a weight-sharing supernet, with PC-DARTS'
partial channels and edge weights as options (``--space pcdarts``).

A cell takes the outputs of the two previous cells (nodes 0, 1), computes 4 intermediate
nodes, each the sum over all earlier nodes of a mixed op (2+3+4+5 = 14 edges), and outputs
their concatenation. Cells at layers//3 and 2*layers//3 are reduction cells (stride 2 on the
edges from nodes 0 and 1, channels doubled). Normal and reduction cells each have their own
[14, ops] table of op weights; with edge weights (PC-DARTS) each node also has a row over its
inputs (beta), and an op's score is its weight times its edge's beta.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from gaea_ext.spaces import genotypes
from gaea_ext.spaces.arch import ArchParam
from gaea_ext.spaces.darts_ops import PRIMITIVES, FactorizedReduce, ReLUConvBN
from gaea_ext.spaces.pcdarts import PartialEdge

STEPS = 4
CELLS = ("normal", "reduce")


def edge_param(cell: str, node: int) -> str:
    return f"{cell}_edges{node}"


class SearchCell(nn.Module):
    def __init__(self, c_pp, c_p, c, reduction, reduction_prev, op_names, fused, k=1):
        super().__init__()
        self.reduction = reduction
        # affine=False as in every DARTS-family search: BN scales would fight the op weights.
        self.pre0 = FactorizedReduce(c_pp, c, affine=False) if reduction_prev else ReLUConvBN(c_pp, c, 1, 1, 0, False)
        self.pre1 = ReLUConvBN(c_p, c, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList(PartialEdge(c, 2 if reduction and j < 2 else 1, op_names, fused, k)
                                   for node in range(STEPS) for j in range(node + 2))

    def forward(self, s0, s1, weights, betas: Optional[List[torch.Tensor]], hard: Optional[List[int]]):
        states = [self.pre0(s0), self.pre1(s1)]
        weights = weights.unbind(0)  # one view per cell, one stack in backward (not a select per edge)
        if betas is not None:
            betas = [b[0].unbind(0) for b in betas]
        e = 0
        for node in range(STEPS):
            acc = None
            for j, h in enumerate(states):
                out = self.edges[e](h, weights[e], None if hard is None else hard[e])
                out = out if betas is None else betas[node][j] * out
                acc = out if acc is None else acc + out  # not sum(): no `0 + out` op
                e += 1
            states.append(acc)
        return torch.cat(states[2:], dim=1)


def imagenet_stem(c: int, in_channels: int):
    """Three stride-2 convolutions: 224 px in, 28 px into the first cell (PC-DARTS' ImageNet)."""
    stem0 = nn.Sequential(
        nn.Conv2d(in_channels, c // 2, 3, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(inplace=True),
        nn.Conv2d(c // 2, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c))
    stem1 = nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(c, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c))
    return stem0, stem1


class DartsNetwork(nn.Module):
    def __init__(self, c: int = 16, layers: int = 8, num_classes: int = 10, in_channels: int = 3, *,
                 exclude_none: bool = False, fused: bool = True, partial: int = 1, edge_weights: bool = False,
                 stem: str = "cifar", stem_multiplier: int = 3):
        super().__init__()
        self.op_names: List[str] = [o for o in PRIMITIVES if not (exclude_none and o == "none")]
        self.edge_weights = edge_weights
        self.num_edges = sum(2 + i for i in range(STEPS))
        if stem == "imagenet":
            self.stem0, self.stem1 = imagenet_stem(c, in_channels)
            c_pp = c_p = c
            reduction_prev = True
        else:
            self.stem0 = nn.Sequential(nn.Conv2d(in_channels, stem_multiplier * c, 3, padding=1, bias=False),
                                       nn.BatchNorm2d(stem_multiplier * c))
            self.stem1 = None
            c_pp = c_p = stem_multiplier * c
            reduction_prev = False
        cells, c_cur = [], c
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            c_cur *= 2 if reduction else 1
            cells.append(SearchCell(c_pp, c_p, c_cur, reduction, reduction_prev, self.op_names, fused, partial))
            reduction_prev = reduction
            c_pp, c_p = c_p, STEPS * c_cur
        self.cells = nn.ModuleList(cells)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_p, num_classes)

    def arch_spec(self) -> List[ArchParam]:
        spec = [ArchParam(cell, (self.num_edges, len(self.op_names))) for cell in CELLS]
        if self.edge_weights:
            spec += [ArchParam(edge_param(cell, n), (1, n + 2), "edges") for cell in CELLS for n in range(STEPS)]
        return spec

    def _betas(self, arch, cell) -> Optional[List[torch.Tensor]]:
        return [arch[edge_param(cell, n)] for n in range(STEPS)] if self.edge_weights else None

    def forward(self, x, arch):
        s0 = self.stem0(x)
        s1 = s0 if self.stem1 is None else self.stem1(s0)
        for cell in self.cells:
            kind = "reduce" if cell.reduction else "normal"
            s0, s1 = s1, cell(s0, s1, arch[kind], self._betas(arch, kind), arch.index(kind))
        return self.classifier(self.pool(s1).flatten(1))

    def scores(self, arch, cell: str) -> torch.Tensor:
        """[14, ops] op scores for derivation: weight, times the edge's beta with edge weights."""
        w = arch[cell].detach()
        if self.edge_weights:
            beta = torch.cat([arch[edge_param(cell, n)].detach()[0] for n in range(STEPS)])
            w = w * beta[:, None]
        return w

    def genotype(self, arch) -> genotypes.Genotype:
        return genotypes.derive(self.scores(arch, "normal"), self.scores(arch, "reduce"), self.op_names, STEPS)
