"""Where each dataset's files live inside a root, and how to read them into tensors.

Pickled layouts: torchvision's CIFAR directories and NAS-Bench-201's ImageNet16 batches.
Folder layouts: ``train/<class>/*`` and ``test/`` (or ``val/``) ``<class>/*``. Layouts are
searched at the root and one level below it (archives often wrap everything in one folder).
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import folder, pickles
from .cache import cached
from .errors import DataError, MissingSplit
from .pixels import resize
from .sources import join


@dataclass(frozen=True)
class Pickled:
    subdir: Optional[str]  # torchvision's directory name, also accepted as the root itself
    files: dict  # split -> batch file names, read in this order
    label_key: str
    size: int  # stored resolution
    num_classes: int
    one_based: bool = False  # ImageNet16: labels 1..1000, only 1..num_classes kept (as 0-based)


PICKLED = {
    "cifar10": Pickled("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)],
                                               "test": ["test_batch"]}, "labels", 32, 10),
    "cifar100": Pickled("cifar-100-python", {"train": ["train"], "test": ["test"]}, "fine_labels", 32, 100),
    "imagenet16-120": Pickled(None, {"train": [f"train_data_batch_{i}" for i in range(1, 11)],
                                     "test": ["val_data"]}, "labels", 16, 120, one_based=True),
}
# Datasets readable from ImageFolder trees: required class count (None: any) and decode size
# (None: the requested resolution; CIFAR is decoded at 32 and then resized like its pickles).
FOLDERS = {"cifar10": (10, 32), "cifar100": (100, 32), "imagefolder": (None, None)}
_PICKLE_NAMES = {n for p in PICKLED.values() for names in p.files.values() for n in names}


def keep_in_archive(name: str) -> bool:
    """Which archive members any layout may need to read."""
    base = posixpath.basename(name)
    return base in _PICKLE_NAMES or folder.is_image(base)


def find_layout(key: str, src) -> Optional[tuple[str, str]]:
    """("pickle" | "folder", base directory) of the first layout of ``key`` found in ``src``."""
    bases = [""] + src.dirs("")
    spec = PICKLED.get(key)
    if spec is not None:
        names = [n for ns in spec.files.values() for n in ns]
        candidates = bases + ([join(b, spec.subdir) for b in bases] if spec.subdir else [])
        for base in candidates:
            if any(src.isfile(join(base, n)) for n in names):
                return "pickle", base
    if key in FOLDERS:
        for base in bases:
            if any(src.isdir(join(base, d)) for d in ("train", "test", "val")):
                return "folder", base
    return None


def read(key: str, src, split: str, size: int, layouts: str) -> dict:
    """{"images": uint8 [N, C, size, size], "labels": int64 [N], "num_classes": int}."""
    found = find_layout(key, src)
    if found is None:
        raise DataError(f"{key}: no {key} data in {src.describe()}; accepted layouts: {layouts}")
    kind, base = found
    if kind == "pickle":
        return read_pickled(key, src, base, split, size)
    return read_folder(key, src, base, split, size)


def read_pickled(key: str, src, base: str, split: str, size: int) -> dict:
    spec = PICKLED[key]
    missing = [n for n in spec.files[split] if not src.isfile(join(base, n))]
    if missing:
        raise DataError(f"{key}: {src.describe(base)} is missing {', '.join(missing)}")
    images, labels = [], []
    for name in spec.files[split]:
        what = src.describe(join(base, name))
        x, y = pickles.parse_batch(src.read(join(base, name)), what, spec.label_key, spec.size)
        if spec.one_based:
            if y.size and (y.min() < 1 or y.max() > 1000):
                raise DataError(f"malformed batch file {what}: labels must be 1-based ImageNet classes 1..1000, "
                                f"got {y.min()}..{y.max()}")
            keep = y <= spec.num_classes
            x, y = x[keep], y[keep] - 1
        elif y.size and (y.min() < 0 or y.max() >= spec.num_classes):
            raise DataError(f"malformed batch file {what}: labels {y.min()}..{y.max()} outside 0..{spec.num_classes - 1}")
        images.append(x)
        labels.append(y)
    labels_np = np.concatenate(labels)
    if len(labels_np) == 0:
        raise DataError(f"{key}: no images in the {split} split at {src.describe(base)}")
    images_t = torch.from_numpy(np.concatenate(images))
    return {"images": resize(images_t, size), "labels": torch.from_numpy(labels_np), "num_classes": spec.num_classes}


def read_folder(key: str, src, base: str, split: str, size: int) -> dict:
    names = ["train"] if split == "train" else ["test", "val"]
    split_dir = next((join(base, n) for n in names if src.isdir(join(base, n))), None)
    if split_dir is None:
        raise MissingSplit(f"{key}: no {'/ or '.join(names)}/ folder in {src.describe(base)}")
    class_dir = join(base, "train") if src.isdir(join(base, "train")) else split_dir
    classes = src.dirs(class_dir)
    if not classes:
        raise DataError(f"{key}: no class folders in {src.describe(class_dir)} (expected <class>/<image> below it)")
    expected, decode_size = FOLDERS[key]
    if expected is not None and len(classes) != expected:
        raise DataError(f"{key}: expected {expected} class folders in {src.describe(class_dir)}, found {len(classes)}")
    rels, labels = folder.scan(src, split_dir, classes, allow_empty_classes=split != "train")
    decode_size = decode_size or size
    if src.archive:  # the caller caches the whole result
        images = folder.decode_images(src, rels, decode_size)
    else:
        images = cached(("folder", decode_size, src.stamp(rels)),
                        lambda: {"images": folder.decode_images(src, rels, decode_size)})["images"]
    return {"images": resize(images, size), "labels": torch.tensor(labels, dtype=torch.int64),
            "num_classes": len(classes)}
