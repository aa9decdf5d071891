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

ImageNet scale (too big for memory): folder_index (open_folder, class_subsets, subset_manifest)
and stream (StreamLoader: per-batch PIL decode in worker processes, imagenet_aug), e.g.
    index = open_folder("~/data/imagenet", "train")
    w, a = class_subsets(index.labels, (0.1, 0.025), seed=0)
    loader = StreamLoader(index.subset(w), 96, train=True, device="cuda", workers=8)
"""
from .datasets import DATASETS, load
from .errors import DataError
from .folder_index import FolderIndex, class_subsets, open_folder, subset_manifest, subsets_from_manifest
from .imageset import ImageSet
from .loader import Loader
from .sampling import split
from .stream import StreamLoader

# Datasets read per batch from an ImageFolder tree (open_folder + StreamLoader), not by load().
STREAMED = ("imagenet",)

__all__ = ["DATASETS", "STREAMED", "DataError", "FolderIndex", "ImageSet", "Loader", "StreamLoader", "class_subsets", "load",
           "open_folder", "split", "subset_manifest", "subsets_from_manifest"]
