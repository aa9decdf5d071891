"""NAS-Bench-1Shot1 (Zela et al., ICLR 2020): three one-shot cell spaces whose every cell is a
NAS-Bench-101 cell, so a search is scored by a table lookup (gaea_ext.benchmarks.nb101).

The one-shot model follows 1Shot1's (automl/nasbench-1shot1, optimizers/darts/model_search.py,
and its PC-DARTS variant, which the GAEA authors' fork reuses in optimizers/epc_edarts):

- a 3x3 conv-BN-ReLU stem to C channels, then `cells` cells (9) with the channels doubled and
  the input max-pooled (2x2, stride 2, padding 1, as 1Shot1 has it) before cells cells//3 and
  2*cells//3; a final ReLU-1x1 conv-BN, global average pooling and a linear classifier.
- a cell has K choice blocks (nodes 1..K; 4 in spaces 1 and 2, 5 in space 3). Each node's
  input is the sum of its candidate parents: node 0, the cell input through a 1x1
  conv-BN-ReLU projection of its own, and the earlier nodes 1..i-1. A node that picks its
  parents (more candidates than its parent count) weights them with a simplex row over its
  candidates; the others sum all of them unweighted. The block is a mixed op over 3x3
  max-pool, 3x3 conv-BN-ReLU, 1x1 conv-BN-ReLU (1Shot1's PRIMITIVES order) on the fused
  MixedOp, with PC-DARTS partial channels (1/K of the channels through the op, shuffled).
- the cell's output concatenates another projection of its input and every node, each scaled
  by its entry of the output row (the output node's parent weights).

Discretization (1Shot1's eval_darts_one_shot_model_in_nasbench.py): the argmax op of each
block, the top-k parents of each weighted node and of the output by weight (k = the node's
parent count; ties go to the lower node), the edges kept only where the output reaches them
backwards, a dummy vertex (never connected) before the output in spaces 1 and 2 so the matrix
is NAS-Bench-101's 7x7, then NAS-Bench-101's pruning and module hash.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torch import nn

from gaea_ext.benchmarks import nb101
from gaea_ext.spaces.arch import ArchParam
from gaea_ext.spaces.darts_ops import channel_shuffle
from gaea_ext.spaces.mixed import MixedOp
from gaea_ext.spaces.pcdarts import dense_slice

OPS = (nb101.MAXPOOL3X3, nb101.CONV3X3, nb101.CONV1X1)  # 1Shot1's PRIMITIVES order


@dataclass(frozen=True)
class SpaceDef:
    number: int
    parents: Dict[int, int]     # node -> number of parents (nodes 1..K, then K+1 the output)
    dummy: bool                 # insert NAS-Bench-101's unused 5th op vertex (spaces 1 and 2)
    best_test_error: float      # 1Shot1's test_min_error of the space (fraction)
    best_valid_error: float

    @property
    def steps(self) -> int:
        return len(self.parents) - 1

    @property
    def weighted(self) -> List[int]:
        """Intermediate nodes that choose parents: more candidates (node) than parents."""
        return [n for n in range(1, self.steps + 1) if n > self.parents[n]]


# Parent counts and best errors from nasbench_analysis/search_spaces/search_space_{1,2,3}.py.
SPACES: Dict[int, SpaceDef] = {
    1: SpaceDef(1, {1: 1, 2: 2, 3: 2, 4: 2, 5: 2}, True, 0.05448716878890991, 0.049278855323791504),
    2: SpaceDef(2, {1: 1, 2: 1, 3: 2, 4: 2, 5: 3}, True, 0.057592153549194336, 0.051582515239715576),
    3: SpaceDef(3, {1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 2}, False, 0.05338543653488159, 0.04847759008407593),
}
NAMES = {f"nb1shot1-{k}": k for k in SPACES}


def input_param(node: int) -> str:
    return f"inputs{node}"


def conv_bn_relu(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    # NAS-Bench-101's conv_bn_relu. 1Shot1 passes TF's BN decay 0.997 as PyTorch's momentum,
    # which makes the running statistics almost the last batch's; PyTorch's default is kept.
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU())


def candidates(c: int):
    return {nb101.MAXPOOL3X3: lambda: nn.MaxPool2d(3, 1, 1),
            nb101.CONV3X3: lambda: conv_bn_relu(c, c, 3),
            nb101.CONV1X1: lambda: conv_bn_relu(c, c, 1)}


class ChoiceBlock(nn.Module):
    """The mixed op of one node on 1/k of its channels (PC-DARTS), the rest passed through."""

    def __init__(self, c: int, fused: bool, k: int):
        super().__init__()
        if c % k:
            raise ValueError(f"partial channels: {c} channels do not split into k={k} parts")
        self.k, self.part = k, c // k
        self.mixed = MixedOp(OPS, candidates(self.part), fused)

    def forward(self, x, weights, hard=None):
        if self.k == 1:
            return self.mixed(x, weights, hard)
        mixed = self.mixed(dense_slice(x, self.part), weights, hard)
        return channel_shuffle(torch.cat([mixed, x[:, self.part:]], dim=1), self.k)


class Cell(nn.Module):
    def __init__(self, space: SpaceDef, c_in: int, c: int, fused: bool, k: int):
        super().__init__()
        self.space = space
        self.proj = nn.ModuleList(conv_bn_relu(c_in, c, 1) for _ in range(space.steps + 1))  # last: to output
        self.blocks = nn.ModuleList(ChoiceBlock(c, fused, k) for _ in range(space.steps))

    def forward(self, s0, ops_w, out_w, in_w: Dict[int, torch.Tensor], hard=None):
        states: List[torch.Tensor] = []
        rows = ops_w.unbind(0)
        for b, block in enumerate(self.blocks):
            node = b + 1
            inputs = [self.proj[b](s0)] + states
            row = in_w.get(node)
            acc = None
            for j, t in enumerate(inputs):
                t = t if row is None else row[0, j] * t
                acc = t if acc is None else acc + t
            states.append(block(acc, rows[b], None if hard is None else hard[b]))
        states.insert(0, self.proj[-1](s0))
        out_row = out_w[0]
        return torch.cat([out_row[j] * t for j, t in enumerate(states)], dim=1)


class NB1Shot1Network(nn.Module):
    def __init__(self, space: int, c: int = 16, cells: int = 9, num_classes: int = 10, in_channels: int = 3, *,
                 fused: bool = True, partial: int = 4):
        super().__init__()
        if space not in SPACES:
            raise ValueError(f"unknown NAS-Bench-1Shot1 space {space}; choose from 1, 2, 3")
        self.space = SPACES[space]
        self.op_names = list(OPS)
        steps = self.space.steps
        self.stem = conv_bn_relu(in_channels, c, 3)
        self.reductions = {cells // 3, 2 * cells // 3}
        self.pool = nn.MaxPool2d(2, 2, padding=1)
        layers, c_prev, c_cur = [], c, c
        for i in range(cells):
            if i in self.reductions:
                c_cur *= 2
            layers.append(Cell(self.space, c_prev if i == 0 else c_prev * (steps + 1), c_cur, fused, partial))
            c_prev = c_cur
        self.cells = nn.ModuleList(layers)
        self.post = nn.Sequential(nn.ReLU(), nn.Conv2d(c_prev * (steps + 1), c_cur, 1, bias=False),
                                  nn.BatchNorm2d(c_cur, affine=False))
        self.classifier = nn.Linear(c_cur, num_classes)

    def arch_spec(self) -> List[ArchParam]:
        steps = self.space.steps
        return ([ArchParam("ops", (steps, len(OPS))), ArchParam("output", (1, steps + 1), "edges")]
                + [ArchParam(input_param(n), (1, n), "edges") for n in self.space.weighted])

    def forward(self, x, arch):
        in_w = {n: arch[input_param(n)] for n in self.space.weighted}
        s = self.stem(x)
        for i, cell in enumerate(self.cells):
            if i in self.reductions:
                s = self.pool(s)
            s = cell(s, arch["ops"], arch["output"], in_w, arch.index("ops"))
        s = self.post(s)
        return self.classifier(s.mean((2, 3)))

    def genotype(self, arch) -> Dict[str, object]:
        return discretize(self.space, arch["ops"].detach().cpu(), arch["output"].detach().cpu(),
                          {n: arch[input_param(n)].detach().cpu() for n in self.space.weighted})


def top_k(row: Sequence[float], k: int) -> List[int]:
    """The k largest entries' indices, ties to the lower index, in increasing order."""
    order = sorted(range(len(row)), key=lambda i: (-float(row[i]), i))
    return sorted(order[:k])


def discretize(space: SpaceDef, ops_w: torch.Tensor, out_w: torch.Tensor, in_w: Dict[int, torch.Tensor]
               ) -> Dict[str, object]:
    """The NAS-Bench-101 cell of a set of weights: {"matrix", "ops"} as queried (7 vertices),
    the pruned {"pruned_matrix", "pruned_ops"} and the module "hash"."""
    steps, out = space.steps, space.steps + 1
    ops = [OPS[int(i)] for i in ops_w.argmax(-1).tolist()]
    parents: Dict[int, List[int]] = {}
    for node in range(1, steps + 1):
        if node in in_w:
            parents[node] = top_k(in_w[node][0].tolist(), space.parents[node])
        else:
            parents[node] = list(range(node))  # every candidate (node 1: the input; space 1 node 2: 0 and 1)
    parents[out] = top_k(out_w[0].tolist(), space.parents[out])
    n = steps + 2
    matrix = [[0] * n for _ in range(n)]
    stack, seen = [out], {out}
    while stack:  # only what the output reaches backwards (1Shot1's _create_adjacency_matrix)
        v = stack.pop()
        for p in parents[v]:
            matrix[p][v] = 1
            if p != 0 and p not in seen:
                seen.add(p)
                stack.append(p)
    labels = [nb101.INPUT] + ops + [nb101.OUTPUT]
    if space.dummy:  # upscale_to_nasbench_format: an unconnected vertex 5, labelled conv1x1
        for row in matrix:
            row.insert(5, 0)
        matrix.insert(5, [0] * (n + 1))
        labels.insert(5, nb101.CONV1X1)
    pruned = nb101.prune(matrix, labels)
    assert pruned is not None, "every node's parents lead to the input"
    return {"matrix": matrix, "ops": labels, "pruned_matrix": pruned[0], "pruned_ops": pruned[1],
            "hash": nb101.spec_hash(matrix, labels)}
