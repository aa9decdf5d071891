"""``load``: every supported dataset by name, as an in-memory ImageSet.

Normalization statistics: CIFAR-10, CIFAR-100 and ImageNet16-120 use the constants of
NAS-Bench-201 (pixel mean/std of the original training sets); digits and imagefolder use the
per-channel mean/std of their *training* split at the requested resolution (the test split is
normalized with training statistics; a tree without train/ falls back to its own).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import digits, formats
from .cache import cache_dir, cached
from .errors import DataError, MissingSplit
from .imageset import ImageSet
from .pixels import channel_stats, resize
from .sampling import balanced_indices
from .sources import DirSource, open_root

DATASETS = ("digits", "cifar10", "cifar100", "imagenet16-120", "imagefolder")
SPLITS = ("train", "test")


def _per255(*values: float) -> tuple[float, ...]:
    return tuple(v / 255 for v in values)


@dataclass(frozen=True)
class _Info:
    resolution: int  # default resolution
    stats: Optional[tuple]  # (mean, std) constants, or None: computed from the train split
    flip: bool  # horizontal flip preserves the label
    layouts: str  # accepted layouts, for error messages


_CIFAR_LAYOUTS = ("{}/ (torchvision pickles), train/<class>/*.png|jpg and test/<class>/* (ImageFolder), "
                  "or a .tar.gz of either")
_INFO = {
    "digits": _Info(16, None, False, "(bundled with scikit-learn)"),
    "cifar10": _Info(32, (_per255(125.3, 123.0, 113.9), _per255(63.0, 62.1, 66.7)), True,
                     _CIFAR_LAYOUTS.format("cifar-10-batches-py")),
    "cifar100": _Info(32, (_per255(129.3, 124.1, 112.4), _per255(68.2, 65.4, 70.4)), True,
                      _CIFAR_LAYOUTS.format("cifar-100-python")),
    "imagenet16-120": _Info(16, (_per255(122.68, 116.66, 104.01), _per255(63.22, 61.26, 65.09)), True,
                            "train_data_batch_1..10 and val_data (NAS-Bench-201 ImageNet16 pickles), "
                            "or a .tar.gz of them"),
    "imagefolder": _Info(32, None, True,
                         "train/<class>/<image> and test/ or val/<class>/<image>, or a .tar.gz of such a tree"),
}
_DOWNLOADABLE = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}  # torchvision.datasets classes


def load(name: str, root: Optional[str], split: str = "train", *, resolution: Optional[int] = None,
         max_images: Optional[int] = None, seed: int = 0, download: bool = True) -> ImageSet:
    """Load one split of a dataset into memory.

    name: one of DATASETS (case-insensitive).
    root: directory or tar archive holding the data (see the layouts below); ignored for digits;
        for cifar10/cifar100 None means ``<cache>/datasets`` (torchvision's download target).
    split: "train" or "test" (ImageNet16's val_data, an ImageFolder's test/ or val/).
    resolution: side of the square images; default 16 for digits (8x8 upsampled bilinearly)
        and imagenet16-120, 32 otherwise. Pickled/CIFAR data is resized with antialiased
        bilinear interpolation, ImageFolder images with PIL's bilinear filter.
    max_images: keep a class-balanced random subset of this many images, chosen by ``seed``
        (mean/std still come from the full training split).
    download: for cifar10/cifar100 without local data, download with torchvision if installed.

    Layouts: cifar10/100 -- torchvision's pickles, an ImageFolder tree, or a tar archive of
    either; imagenet16-120 -- NAS-Bench-201's pickled batches (labels 1..120 kept, as 0..119);
    imagefolder -- root/train/<class>/*, root/test (or val)/<class>/*, class index = position
    of the folder name in sorted order. Archives and decoded ImageFolder images are cached
    (see gaea_ext.data.cache). Raises DataError, with a one-line message, for unknown names
    and missing or malformed data.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _INFO:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use 'train' or 'test' "
                        "(carve a validation set out of train with gaea_ext.data.split)")
    info = _INFO[key]
    size = info.resolution if resolution is None else int(resolution)
    if size < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")

    raw = _read(key, root, split, size, download)
    mean, std = info.stats or _train_stats(key, root, split, size, raw)
    data = ImageSet(raw["images"], raw["labels"], raw["num_classes"], mean, std, info.flip, key)
    if max_images is not None and max_images < len(data):
        data = data.subset(balanced_indices(data.labels, data.num_classes, max_images, seed))
    return data


def _train_stats(key: str, root, split: str, size: int, raw: dict):
    if split != "train":
        try:
            raw = _read(key, root, "train", size, download=False)
        except MissingSplit:
            pass  # a tree with only test/: its own statistics are the best available
    return channel_stats(raw["images"])


def _read(key: str, root, split: str, size: int, download: bool) -> dict:
    if key == "digits":
        images, labels = digits.read(split)
        return {"images": resize(images, size), "labels": labels, "num_classes": digits.NUM_CLASSES}
    layouts = _INFO[key].layouts
    if root is None:
        if key not in _DOWNLOADABLE:
            raise DataError(f"{key} needs root=<directory or archive> holding {layouts}")
        root = cache_dir() / "datasets"
    path = Path(root).expanduser()
    if key in _DOWNLOADABLE and (path.is_dir() or not path.exists()) and \
            formats.find_layout(key, DirSource(path)) is None:
        _download_or_explain(key, path, split, download)
    src = open_root(path, formats.keep_in_archive, what=key)
    if src.archive:  # reading the archive is the slow part: cache the final tensors
        return cached(("archive", key, split, size, *src.identity),
                      lambda: formats.read(key, src, split, size, layouts))
    return formats.read(key, src, split, size, layouts)


def _torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def _download_or_explain(key: str, path: Path, split: str, download: bool) -> None:
    problem = f"{key}: root {path} does not exist" if not path.exists() else f"{key}: no {key} data in {path}"
    accepted = f"accepted layouts: {_INFO[key].layouts}"
    if not download:
        raise DataError(f"{problem}; {accepted}; not downloading (download=False)")
    if not _torchvision_available():
        raise DataError(f"{problem}; {accepted}; cannot download: torchvision is not installed "
                        "(or put the data there by hand)")
    import torchvision

    try:
        getattr(torchvision.datasets, _DOWNLOADABLE[key])(str(path), train=split == "train", download=True)
    except Exception as e:
        raise DataError(f"{problem}; downloading it with torchvision failed (no network?): {e}") from e
