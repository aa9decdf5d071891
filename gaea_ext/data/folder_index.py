"""FolderIndex: the file list of one ImageFolder split, for streaming (nothing is decoded here).

``open_folder(root, "train")`` scans ``train/<class>/<image>`` (or ``val/``, ``test/``) in a
directory or tar archive, at the root or one folder below it (archives often wrap the tree).
Class index = position of the folder name among the sorted *train* class folders, so every
split of one root uses the same labels.

Paths are kept as one UTF-8 byte buffer plus offsets rather than a list of 1.28M Python
strings: DataLoader workers are forked, and touching Python objects in a child (refcounts)
copies their memory pages, so a list of strings would slowly be duplicated in every worker.

``class_subsets`` draws disjoint per-class random subsets (PC-DARTS' ImageNet search: 10 % of
each class for the weights, another 2.5 % for the architecture); ``subset_manifest`` records
them as relative paths (JSON) and ``subsets_from_manifest`` re-creates them from that record.
"""
from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from . import folder, formats
from .errors import DataError, MissingSplit
from .sampling import _grouped
from .seeding import generator
from .sources import join, open_root

SPLIT_DIRS = {"train": ("train",), "val": ("val", "test"), "test": ("test", "val")}


def keep_image(name: str) -> bool:
    """Archive members to keep in memory: images only (module level, so sources pickle)."""
    return folder.is_image(posixpath.basename(name))


@dataclass(eq=False, repr=False)
class FolderIndex:
    """Relative image paths, int64 labels and class names of one split of ``source``."""

    source: object  # DirSource or ArchiveSource (sources.py)
    split: str
    classes: tuple[str, ...]
    labels: torch.Tensor  # int64 [N]
    _blob: np.ndarray  # uint8: all paths, UTF-8, concatenated
    _offsets: np.ndarray  # int64 [N + 1]: path i is _blob[_offsets[i]:_offsets[i + 1]]

    @classmethod
    def build(cls, source, split: str, classes: Sequence[str], paths: Sequence[str], labels) -> "FolderIndex":
        encoded = [p.encode() for p in paths]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        return cls(source, split, tuple(classes), torch.as_tensor(labels, dtype=torch.int64), blob, offsets)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __repr__(self) -> str:
        return (f"FolderIndex({self.source.describe()!r}, {self.split!r}, {len(self)} images, "
                f"{len(self.classes)} classes)")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def path(self, i: int) -> str:
        return self._blob[self._offsets[i]:self._offsets[i + 1]].tobytes().decode()

    @property
    def paths(self) -> list[str]:
        return [self.path(i) for i in range(len(self))]

    def read(self, i: int) -> bytes:
        return self.source.read(self.path(i))

    def subset(self, indices) -> "FolderIndex":
        idx = torch.as_tensor(indices, dtype=torch.int64).tolist()
        return FolderIndex.build(self.source, self.split, self.classes, [self.path(i) for i in idx], self.labels[idx])


def open_folder(root: Union[str, Path, object], split: str = "train") -> FolderIndex:
    """Index one split ("train", "val" or "test"; val and test accept either folder) of the
    ImageFolder tree at ``root``: a directory, a tar archive, or an already opened source
    (``index.source``, so a second split does not read an archive again). DataError if the
    split is missing or has no images."""
    if split not in SPLIT_DIRS:
        raise DataError(f"unknown split {split!r}; use 'train', 'val' or 'test'")
    src = root if hasattr(root, "read") else open_root(Path(root).expanduser(), keep_image, what="imagefolder")
    found = formats.find_layout("imagefolder", src)
    if found is None:
        raise DataError(f"imagefolder: no train/, val/ or test/ folder in {src.describe()}")
    base = found[1]
    split_dir = next((join(base, d) for d in SPLIT_DIRS[split] if src.isdir(join(base, d))), None)
    if split_dir is None:
        raise MissingSplit(f"imagefolder: no {'/ or '.join(SPLIT_DIRS[split])}/ folder in {src.describe(base)}")
    class_dir = join(base, "train") if src.isdir(join(base, "train")) else split_dir
    classes = src.dirs(class_dir)
    if not classes:
        raise DataError(f"imagefolder: no class folders in {src.describe(class_dir)} "
                        "(expected <class>/<image> below it)")
    paths, labels = folder.scan(src, split_dir, classes, allow_empty_classes=split != "train")
    return FolderIndex.build(src, split, classes, paths, labels)


def _quotas(n: int, fractions: Sequence[float]) -> list[int]:
    """Images per subset for a class of ``n``: floor(f * n), plus one for the largest remainders
    up to floor(sum(f) * n) in all (so fractions summing to 1 partition the class); then at
    least one per subset while the class has images, taken from the largest quota if need be."""
    want = [f * n for f in fractions]
    q = [math.floor(w + 1e-9) for w in want]  # 1e-9: 0.29 * 100 is 28.999...
    extra = math.floor(sum(want) + 1e-9) - sum(q)
    for k in sorted(range(len(q)), key=lambda k: q[k] - want[k])[:max(extra, 0)]:
        q[k] += 1
    for k in sorted(range(len(q)), key=lambda k: -fractions[k]):
        if q[k] == 0:
            if sum(q) < n:
                q[k] = 1
            elif max(q) > 1:
                q[q.index(max(q))] -= 1
                q[k] = 1
    return q


def class_subsets(labels, fractions: Sequence[float], seed: int = 0) -> list[torch.Tensor]:
    """Disjoint subsets (sorted int64 index tensors), subset k holding about fractions[k] of
    every class, chosen at random by ``seed`` alone. Each fraction must lie in (0, 1] and they
    must sum to at most 1; every class with at least len(fractions) images gives each subset one."""
    fractions = [float(f) for f in fractions]
    if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
        raise DataError(f"subset fractions must each lie in (0, 1], got {fractions}")
    if sum(fractions) > 1.0 + 1e-9:
        raise DataError(f"subset fractions must sum to at most 1, got {fractions} (sum {sum(fractions):g})")
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    if labels.numel() == 0:
        return [torch.zeros(0, dtype=torch.int64) for _ in fractions]
    num_classes = int(labels.max()) + 1
    order, rank, counts = _grouped(labels, num_classes, generator("class-subsets", seed))
    quota = torch.tensor([_quotas(int(n), fractions) for n in counts.tolist()], dtype=torch.int64)  # [C, K]
    end = quota.cumsum(1)[labels[order]]  # [N, K]: subset k takes ranks in [end[k-1], end[k])
    start = end - quota[labels[order]]
    return [order[(rank >= start[:, k]) & (rank < end[:, k])].sort().values for k in range(len(fractions))]


def subset_manifest(index: FolderIndex, subsets: Sequence[torch.Tensor],
                    names: Optional[Sequence[str]] = None) -> dict:
    """JSON-serializable record of ``subsets`` of ``index``: root, split, classes and, per
    subset name (default "subset0", "subset1", ...), its relative image paths."""
    names = [f"subset{k}" for k in range(len(subsets))] if names is None else list(names)
    if len(names) != len(subsets):
        raise ValueError(f"{len(names)} names for {len(subsets)} subsets")
    return {"root": index.source.describe(), "split": index.split, "num_images": len(index),
            "classes": list(index.classes),
            "subsets": {name: [index.path(i) for i in torch.as_tensor(s).tolist()] for name, s in zip(names, subsets)}}


def subsets_from_manifest(index: FolderIndex, manifest: dict) -> list[torch.Tensor]:
    """The index tensors recorded by ``subset_manifest``, looked up by path in ``index``;
    DataError if the classes differ or a recorded image is not in ``index``."""
    if list(manifest["classes"]) != list(index.classes):
        raise DataError(f"subset manifest classes differ from those of {index.source.describe()}")
    position = {p: i for i, p in enumerate(index.paths)}
    out = []
    for name, paths in manifest["subsets"].items():
        missing = [p for p in paths if p not in position]
        if missing:
            raise DataError(f"subset {name!r}: {len(missing)} recorded image(s), e.g. {missing[0]}, "
                            f"are not in {index.source.describe()}")
        out.append(torch.tensor(sorted(position[p] for p in paths), dtype=torch.int64))
    return out
