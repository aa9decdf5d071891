"""The DARTS evaluation networks: a found cell stacked and trained from scratch.

Same structure, parameter counts and forward as quark0/darts ``cnn/model.py``, so published
numbers are comparable (DARTS_V2 at C=36, 20 cells, 10 classes: 3.3M parameters). Two
deliberate differences, neither of which changes a parameter:
  * the stems take ``in_channels`` (1 for the embedded digits);
  * the auxiliary heads pool to 2x2 adaptively when the feature map is not the size their
    fixed pool was designed for (8x8 for CIFAR at 32 px, 7x7 for ImageNet at 224 px), so
    small images (digits at 16 px) work; the global pool is adaptive (same as AvgPool2d(7)
    at 224 px).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from gaea_ext.spaces.darts_ops import OPS, FactorizedReduce, ReLUConvBN
from gaea_ext.spaces.genotypes import Genotype


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples with probability ``drop_prob`` and rescale the rest by 1/keep, so the
    expected value is unchanged. Draws from the global torch RNG (saved in checkpoints)."""
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


class Cell(nn.Module):
    """A cell compiled from a genotype: each node sums two ops applied to earlier nodes."""

    def __init__(self, genotype: Genotype, c_prev_prev: int, c_prev: int, c: int, reduction: bool,
                 reduction_prev: bool):
        super().__init__()
        # The cell two back is at twice our resolution when the previous cell reduced.
        self.preprocess0 = FactorizedReduce(c_prev_prev, c) if reduction_prev else ReLUConvBN(c_prev_prev, c, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(c_prev, c, 1, 1, 0)
        pairs = genotype.reduce if reduction else genotype.normal
        self.concat = list(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.multiplier = len(self.concat)
        self.indices = [j for _, j in pairs]
        # In a reduction cell only the edges leaving the two inputs stride.
        self.ops = nn.ModuleList(OPS[name](c, 2 if reduction and j < 2 else 1, True) for name, j in pairs)

    def forward(self, s0, s1, drop_prob: float = 0.0):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(len(self.ops) // 2):
            hs = []
            for k in (2 * i, 2 * i + 1):
                op = self.ops[k]
                h = op(states[self.indices[k]])
                # Identity edges are never dropped (DARTS): dropping a skip would drop the input.
                if self.training and drop_prob > 0 and not isinstance(op, nn.Identity):
                    h = drop_path(h, drop_prob)
                hs.append(h)
            states.append(hs[0] + hs[1])
        return torch.cat([states[i] for i in self.concat], dim=1)


def _pool_to_2x2(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h >= kernel and w >= kernel and (h - kernel) // stride == 1 and (w - kernel) // stride == 1:
        return F.avg_pool2d(x, kernel, stride, count_include_pad=False)
    return F.adaptive_avg_pool2d(x, 2)


class _AuxiliaryHead(nn.Module):
    """Classifier on the features after the second reduction; its loss, weighted, helps
    gradients reach the lower cells. Training only."""

    def __init__(self, c: int, num_classes: int, pool_stride: int, bn_after_768: bool):
        super().__init__()
        self.pool_stride = pool_stride
        tail = [nn.BatchNorm2d(768)] if bn_after_768 else []
        self.features = nn.Sequential(
            nn.Conv2d(c, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False), *tail, nn.ReLU(inplace=True))
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        x = _pool_to_2x2(F.relu(x), 5, self.pool_stride)
        return self.classifier(self.features(x).flatten(1))


class AuxiliaryHeadCIFAR(_AuxiliaryHead):
    def __init__(self, c: int, num_classes: int):
        super().__init__(c, num_classes, pool_stride=3, bn_after_768=True)


class AuxiliaryHeadImageNet(_AuxiliaryHead):
    def __init__(self, c: int, num_classes: int):
        # DARTS' ImageNet head has no BN after the 768 conv (a typo kept for its paper numbers).
        super().__init__(c, num_classes, pool_stride=2, bn_after_768=False)


class _Network(nn.Module):
    """Cells with reductions at layers//3 and 2*layers//3; the auxiliary head reads the
    output of the second reduction cell."""

    def _build_cells(self, genotype, c, c_stem, layers, reduction_prev, aux_cls, num_classes, auxiliary):
        self.layers, self.drop_path_prob = layers, 0.0
        self.aux_at = 2 * layers // 3
        c_prev_prev, c_prev, c_curr = c_stem, c_stem, c
        self.cells = nn.ModuleList()
        c_aux = None
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                c_curr *= 2
            cell = Cell(genotype, c_prev_prev, c_prev, c_curr, reduction, reduction_prev)
            reduction_prev = reduction
            self.cells.append(cell)
            c_prev_prev, c_prev = c_prev, cell.multiplier * c_curr
            if i == self.aux_at:
                c_aux = c_prev
        self.auxiliary_head = aux_cls(c_aux, num_classes) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def _cells_forward(self, s0, s1) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        logits_aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_at and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        return self.classifier(self.global_pooling(s1).flatten(1)), logits_aux


class NetworkCIFAR(_Network):
    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype: Genotype,
                 in_channels: int = 3):
        super().__init__()
        c_stem = 3 * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_stem, 3, padding=1, bias=False), nn.BatchNorm2d(c_stem))
        self._build_cells(genotype, C, c_stem, layers, False, AuxiliaryHeadCIFAR, num_classes, auxiliary)

    def forward(self, x):
        s = self.stem(x)
        return self._cells_forward(s, s)


class NetworkImageNet(_Network):
    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype: Genotype,
                 in_channels: int = 3):
        super().__init__()
        if C % 2:
            raise ValueError(f"the ImageNet network needs an even channel count, got {C}")
        # Three stride-2 convs: 224 px -> 28 px before the first cell.
        self.stem0 = nn.Sequential(
            nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=True), nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
        self.stem1 = nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
                                   nn.BatchNorm2d(C))
        # stem0's output is at twice stem1's resolution, hence reduction_prev=True for cell 0.
        self._build_cells(genotype, C, C, layers, True, AuxiliaryHeadImageNet, num_classes, auxiliary)

    def forward(self, x):
        s0 = self.stem0(x)
        return self._cells_forward(s0, self.stem1(s0))


def param_count_m(model: nn.Module) -> float:
    """Parameters in millions, auxiliary head excluded (as DARTS and the papers report)."""
    return sum(p.numel() for name, p in model.named_parameters() if "auxiliary" not in name) / 1e6
