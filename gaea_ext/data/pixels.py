"""Whole-dataset pixel operations on uint8 [N, C, H, W] tensors, done in chunks to bound memory."""
from __future__ import annotations

import torch
import torch.nn.functional as F

_CHUNK = 4096


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square ``size`` x ``size`` images by bilinear interpolation with antialiasing (so
    downsampling averages like PIL's filter; upsampling is plain bilinear), rounded to uint8."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for i in range(0, n, _CHUNK):
        x = images[i:i + _CHUNK].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[i:i + _CHUNK] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std over all pixels, in [0, 1] units."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for i in range(0, images.shape[0], _CHUNK):
        x = images[i:i + _CHUNK].transpose(0, 1).reshape(c, -1).double()
        total += x.sum(1)
        total_sq += (x * x).sum(1)
    count = images.numel() // c
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.full_like(std, 255.0))  # constant channel: std 1
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())
