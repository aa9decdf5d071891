"""Decode and augment one ImageNet-style image with PIL (torchvision is not a dependency).

Train: RandomResizedCrop(S, scale=(0.08, 1), ratio=(3/4, 4/3)) + horizontal flip + optional
ColorJitter, with torchvision's parameter sampling. Eval: resize the short side to
round(S * 256 / 224), center crop S (torchvision's Resize + CenterCrop geometry).

All random draws come from the ``random.Random`` passed in, so an image's augmentation is a
pure function of that generator's seed (the loader derives it from seed, epoch, rank, batch
and position) -- the same in any worker process, in any order.

Speed. Crop and resize are one ``Image.resize(box=...)`` call, so only the crop is resampled,
never the whole image. JPEGs are decoded at 1/2, 1/4 or 1/8 scale (PIL ``draft``, the DCT
scaling of libjpeg) whenever the crop would still be at least S pixels on each side: most
ImageNet crops then decode several times faster. The crop box is fixed in original-image
coordinates *before* decoding, so drafting changes pixel values only by resampling detail.
"""
from __future__ import annotations

import io
import math
import random
from typing import Optional, Sequence

import numpy as np

from .errors import DataError

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in original pixels


def resized_crop_box(width: int, height: int, rng: random.Random) -> Box:
    """torchvision's RandomResizedCrop.get_params: 10 tries of a random area/aspect, then a
    center crop with the aspect ratio clamped to RATIO."""
    area = width * height
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int, size: int) -> Box:
    """Resize(round(size * 256 / 224)) then CenterCrop(size), as a box in original pixels."""
    short_to = int(round(size * 256 / 224))
    # torchvision's Resize(int): the long side is truncated, not rounded
    if width <= height:
        rw, rh = short_to, int(short_to * height / width)
    else:
        rw, rh = int(short_to * width / height), short_to
    top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    sx, sy = width / rw, height / rh
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def _jitter(im, strengths: Sequence[float], rng: random.Random):
    """ColorJitter(brightness, contrast, saturation, hue): factors uniform in [1 - s, 1 + s]
    (hue: shift in [-h, h] of a full turn), applied in a random order, like torchvision."""
    from PIL import Image, ImageEnhance

    b, c, s, h = strengths
    ops = [0, 1, 2, 3]
    rng.shuffle(ops)
    for op in ops:
        if op == 0 and b > 0:
            im = ImageEnhance.Brightness(im).enhance(rng.uniform(max(0.0, 1 - b), 1 + b))
        elif op == 1 and c > 0:
            im = ImageEnhance.Contrast(im).enhance(rng.uniform(max(0.0, 1 - c), 1 + c))
        elif op == 2 and s > 0:
            im = ImageEnhance.Color(im).enhance(rng.uniform(max(0.0, 1 - s), 1 + s))
        elif op == 3 and h > 0:
            shift = rng.uniform(-h, h)
            hue, sat, val = im.convert("HSV").split()
            hue_np = np.asarray(hue, dtype=np.uint8) + np.uint8(int(shift * 255) % 256)  # wraps around
            im = Image.merge("HSV", (Image.fromarray(hue_np, "L"), sat, val)).convert("RGB")
    return im


def load_image(data: bytes, size: int, rng: Optional[random.Random], *, flip: bool = True,
               jitter: Optional[Sequence[float]] = None, what: str = "image") -> np.ndarray:
    """uint8 [size, size, 3] from encoded image bytes: train augmentation when ``rng`` is given,
    the eval center crop otherwise. DataError (naming ``what``) if the bytes do not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            box = resized_crop_box(width, height, rng) if rng is not None else center_crop_box(width, height, size)
            mirror = rng is not None and flip and rng.random() < 0.5
            reduce = min(box[2] - box[0], box[3] - box[1]) / size
            if im.format == "JPEG" and reduce >= 2:
                im.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))
            rgb = im.convert("RGB")
            sx, sy = rgb.width / width, rgb.height / height
            out = rgb.resize((size, size), Image.Resampling.BILINEAR,
                             box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))
    except Exception as e:  # PIL raises many types for truncated/corrupt files
        raise DataError(f"cannot decode image {what}: {type(e).__name__}: {e}") from e
    if mirror:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng is not None and jitter is not None:
        out = _jitter(out, jitter, rng)
    return np.asarray(out, dtype=np.uint8)
