"""Class-aware index selection: stratified splits and class-balanced subsets.

Both are deterministic functions of (labels, size, seed) and return sorted indices, so the
images keep their dataset order (loaders shuffle anyway).
"""
from __future__ import annotations

import math

import torch

from .imageset import ImageSet
from .seeding import generator


def _grouped(labels: torch.Tensor, num_classes: int, g: torch.Generator):
    """Indices grouped by class, in random order within each class, with each one's rank in its class."""
    perm = torch.randperm(labels.numel(), generator=g)
    order = perm[torch.argsort(labels[perm], stable=True)]
    counts = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(labels.numel()) - starts[labels[order]]
    return order, rank, counts


def stratified_indices(labels: torch.Tensor, fraction: float, seed: int, num_classes: int | None = None):
    """(a, b): a disjoint, covering split with round(fraction * N) indices in ``a``.

    Every class goes to ``a`` in proportion ``fraction`` up to one image: each class gets
    floor(fraction * n_c), and the leftover images go to the classes with the largest
    remainders (ties to the lower class index).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = labels.to(torch.int64).cpu()
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    order, rank, counts = _grouped(labels, num_classes, generator("split", seed))
    want = fraction * counts.double()
    quota = torch.floor(want).long()
    extra = int(math.floor(fraction * labels.numel() + 0.5)) - int(quota.sum())
    if extra > 0:
        by_remainder = torch.argsort(quota.double() - want, stable=True)  # largest remainder first
        quota[by_remainder[:extra]] += 1
    in_a = rank < quota[labels[order]]
    return order[in_a].sort().values, order[~in_a].sort().values


def split(data: ImageSet, fraction: float, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Class-stratified, deterministic split of ``data`` into (a, b), ``a`` holding ``fraction``.

    For bilevel NAS: ``train, valid = split(load("cifar10", root), 0.5)``.
    """
    a, b = stratified_indices(data.labels, fraction, seed, data.num_classes)
    return data.subset(a), data.subset(b)


def balanced_indices(labels: torch.Tensor, num_classes: int, count: int, seed: int) -> torch.Tensor:
    """``count`` indices with classes as equally represented as their sizes allow.

    Each class gets count // C images (classes smaller than their share give all they have and
    the rest is shared among the others); the count % C leftover images go to classes chosen at
    random by ``seed``. Which images a class gives is random by ``seed`` too.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    labels = labels.to(torch.int64).cpu()
    if count >= labels.numel():
        return torch.arange(labels.numel())
    g = generator("subset", seed)
    order, rank, counts = _grouped(labels, num_classes, g)
    quota = torch.zeros(num_classes, dtype=torch.int64)
    left, remaining = count, sorted(range(num_classes), key=lambda c: (int(counts[c]), c))
    while remaining and int(counts[remaining[0]]) <= left // len(remaining):
        c = remaining.pop(0)  # small class: takes everything it has
        quota[c] = counts[c]
        left -= int(counts[c])
    if remaining:
        share, extra = divmod(left, len(remaining))
        rest = torch.tensor(remaining)
        quota[rest] = share
        quota[rest[torch.randperm(len(remaining), generator=g)[:extra]]] += 1
    return order[rank < quota[labels[order]]].sort().values
