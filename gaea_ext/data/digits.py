"""``digits``: scikit-learn's bundled 8x8 handwritten digits, the offline default dataset.

1797 real images (about 180 per class), pixel values 0..16 mapped to 0..255 (round(v * 255/16)),
one channel. train/test is a stratified 80/20 split with a fixed seed, independent of the
``seed`` argument of ``load``, so every run and every user sees the same test set.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from .errors import DataError
from .sampling import stratified_indices

TRAIN_FRACTION = 0.8
SPLIT_SEED = 20240607
NUM_CLASSES = 10


@functools.lru_cache(maxsize=1)
def _all() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
    bunch = load_digits()
    images = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return (images, labels, *stratified_indices(labels, TRAIN_FRACTION, SPLIT_SEED, NUM_CLASSES))


def read(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 1, 8, 8], labels int64 [N]) of ``split`` ("train" or "test"), new tensors."""
    images, labels, train, test = _all()
    idx = train if split == "train" else test
    return images[idx], labels[idx]
