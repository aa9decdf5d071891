"""Data layer for GAEA architecture search: whole datasets in memory, batches made on device.

    from gaea_ext.data import load, split, Loader
    train, valid = split(load("cifar10", "~/data/cifar"), 0.5)        # bilevel search split
    loader = Loader(train, 64, train=True, device="cuda")
    for epoch in range(epochs):
        for x, y in loader: ...

Modules: datasets (load), formats (file layouts), imageset (ImageSet), sampling (split, balanced
subsets), loader (Loader), augment (batched crop/flip), sources (directory/archive views),
folder/pickles/digits (readers), pixels (resize, statistics), cache (decoded-tensor cache),
seeding (derived RNG streams), errors (DataError).
"""
from .datasets import DATASETS, load
from .errors import DataError
from .imageset import ImageSet
from .loader import Loader
from .sampling import split

__all__ = ["DATASETS", "DataError", "ImageSet", "Loader", "load", "split"]
