"""Batched standard CIFAR augmentation: random crop with zero padding + horizontal flip.

Equivalent to torchvision's ``RandomCrop(H, padding=pad)`` (fill 0, i.e. black, before
normalization) and ``RandomHorizontalFlip()`` applied per image, but done for the whole batch
with one pad and one advanced-indexing gather on the batch's device. The random offsets and
flips are drawn on the CPU from the given generator, so a batch is identical on every device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip(images: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random ``H x W`` crops of the zero-padded [B, C, H, W] batch, each mirrored with
    probability 1/2 when ``flip``. Works on any dtype; returns a new contiguous tensor."""
    b, c, h, w = images.shape
    if pad == 0 and not flip:
        return images
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    mirror = torch.rand(b, generator=gen) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    dev = images.device
    dy, dx, mirror = dy.to(dev, non_blocking=True), dx.to(dev, non_blocking=True), mirror.to(dev, non_blocking=True)
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    rows = dy[:, None] + torch.arange(h, device=dev)  # [B, H] rows of padded to take
    cols = dx[:, None] + torch.arange(w, device=dev)  # [B, W]
    cols = torch.where(mirror[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
