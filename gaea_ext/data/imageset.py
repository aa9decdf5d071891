"""ImageSet: a whole labelled image dataset held in memory as one uint8 tensor."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence, Union

import torch


@dataclass(eq=False, repr=False)
class ImageSet:
    """Images and labels of one split, plus what a loader needs to normalize and augment them.

    images: uint8 [N, C, H, W], contiguous, on the CPU.
    labels: int64 [N], class indices in [0, num_classes).
    mean, std: per channel, in [0, 1] units (x_normalized = (x / 255 - mean) / std).
    flip: whether a horizontal flip is label-preserving (False for digits).
    name: the dataset name, e.g. "cifar10".
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool
    name: str

    def __post_init__(self) -> None:
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        self.num_classes = int(self.num_classes)
        self.flip = bool(self.flip)
        im, lb = self.images, self.labels
        if im.dtype != torch.uint8 or im.dim() != 4 or im.device.type != "cpu":
            raise ValueError(f"images must be a CPU uint8 [N, C, H, W] tensor, got {im.dtype} {tuple(im.shape)} on {im.device}")
        if lb.dtype != torch.int64 or lb.shape != (im.shape[0],) or lb.device.type != "cpu":
            raise ValueError(f"labels must be a CPU int64 [{im.shape[0]}] tensor, got {lb.dtype} {tuple(lb.shape)} on {lb.device}")
        if not im.is_contiguous():
            self.images = im.contiguous()
        channels = im.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean/std need {channels} values, got {len(self.mean)}/{len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if lb.numel() and (int(lb.min()) < 0 or int(lb.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got [{int(lb.min())}, {int(lb.max())}]")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, idx: Union[torch.Tensor, Sequence[int]]) -> "ImageSet":
        """The images at ``idx`` (int64 indices or a bool mask), in that order; stats are kept."""
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.to(torch.int64)
        return replace(self, images=self.images.index_select(0, idx), labels=self.labels.index_select(0, idx))

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        return (f"ImageSet(name={self.name!r}, n={len(self)}, shape=({c}, {h}, {w}), "
                f"num_classes={self.num_classes}, flip={self.flip})")
