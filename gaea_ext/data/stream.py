"""StreamLoader: ImageNet-scale batches decoded from files per batch, with Loader's protocol.

    index = open_folder("~/data/imagenet", "train")
    w, a = class_subsets(index.labels, (0.1, 0.025), seed=0)          # PC-DARTS search subsets
    json.dump(subset_manifest(index, [w, a], ["weights", "arch"]), open(run_dir / "subsets.json", "w"))
    train = StreamLoader(index.subset(w), 96, train=True, device="cuda", workers=8)

Same iteration protocol, epochs, ``state_dict`` resume and rank sharding as ``Loader`` (see
loader.py), but nothing is held in memory: worker processes (torch DataLoader, persistent)
decode and augment each batch's images with PIL (imagenet_aug.py) to uint8 [B, S, S, 3], and
the main process moves them to ``device`` (pinned for CUDA) and normalizes there, so only a
quarter of the float bytes cross the bus.

Randomness. The epoch order is ``randperm(N)`` from generator("shuffle", seed, epoch), exactly
Loader's; image k of batch b is augmented by a ``random.Random`` seeded with (seed, epoch,
rank, b, k). Batches are therefore a pure function of (seed, epoch, rank, batch index) -- the
same with any number of workers, and after a resume.

Prefetch. One DataLoader iterator runs over an endless stream of batches from the current
(epoch, position) on, across epoch boundaries, so ``zip`` with another loader and DARTS-style
``next(iter(loader))`` keep the workers' prefetched batches. Only a jump (``set_epoch`` or
``load_state_dict`` to anything but the next batch) restarts the stream; the DataLoader then
discards what its workers had prefetched.
"""
from __future__ import annotations

import math
import random
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader

from .epochs import EpochLoader
from .errors import DataError
from .folder_index import FolderIndex
from .imagenet_aug import load_image
from .seeding import derive_seed, generator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PCDARTS_JITTER = (0.4, 0.4, 0.4, 0.2)  # brightness, contrast, saturation, hue
class _Decode:
    """Map-style dataset of single images, keyed (index, epoch, rank, batch, position)."""

    def __init__(self, index: FolderIndex, size: int, train: bool, seed: int, flip: bool, jitter) -> None:
        self.index, self.size, self.train, self.seed, self.flip, self.jitter = index, size, train, seed, flip, jitter

    def __getitem__(self, key):
        i, epoch, rank, batch, pos = key
        rng = random.Random(derive_seed("stream-augment", self.seed, epoch, rank, batch, pos)) if self.train else None
        try:
            rel = self.index.path(i)
            image = load_image(self.index.source.read(rel), self.size, rng, flip=self.flip, jitter=self.jitter,
                               what=self.index.source.describe(rel))
        except DataError as e:  # returned, not raised: a worker would wrap it in a multi-line traceback
            return e, -1
        return image, int(self.index.labels[i])


def _collate(items):
    errors = [image for image, _ in items if isinstance(image, DataError)]
    if errors:
        return errors[0]
    return torch.from_numpy(np.stack([image for image, _ in items])), torch.tensor([y for _, y in items])


def shard_order(n: int, epoch: int, *, seed: int, train: bool, rank: int, world_size: int, per_rank: int):
    """One rank's image indices for ``epoch``, in batch order: Loader's rule (see loader.py)."""
    order = torch.randperm(n, generator=generator("shuffle", seed, epoch)) if train else torch.arange(n)
    total = per_rank * world_size
    if total > n:  # wrap around to give every rank the same count
        order = order.repeat(math.ceil(total / n))
    return order[:total][rank::world_size]


class _Batches:
    """Endless batch sampler: the keys of every batch from ``start`` = (epoch, position) on.
    Holds settings, not the loader, so the loader is not part of a reference cycle and its
    workers stop as soon as it is dropped."""

    def __init__(self, n: int, batch_size: int, num_batches: int, **shard) -> None:
        self.n, self.batch_size, self.num_batches, self.shard = n, batch_size, num_batches, shard
        self.start = (0, 0)

    def __iter__(self):
        epoch, position = self.start
        rank, size = self.shard["rank"], self.batch_size
        while True:
            order = shard_order(self.n, epoch, **self.shard).tolist()
            for b in range(position, self.num_batches):
                yield [(i, epoch, rank, b, k) for k, i in enumerate(order[b * size:(b + 1) * size])]
            epoch, position = epoch + 1, 0


class StreamLoader(EpochLoader):
    """Batches of (x float32 [B, 3, S, S] normalized, y int64 [B]) on ``device``, streamed from
    ``index`` (a FolderIndex, e.g. ``open_folder(root, "train").subset(w)``).

    train: shuffle each epoch; RandomResizedCrop(S) + horizontal flip (if ``flip``) + ColorJitter
        (if ``jitter`` = (brightness, contrast, saturation, hue), e.g. PCDARTS_JITTER). Otherwise
        sequential order, short side resized to round(S * 256 / 224), center crop S.
    resolution: S. workers: decoding processes (0: in this process). prefetch: batches queued
        per worker. mean, std: normalization (ImageNet's by default).
    drop_last, rank, world_size, seed: as for Loader.
    """

    def __init__(self, index: FolderIndex, batch_size: int, *, train: bool, resolution: int = 224, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: Union[str, torch.device] = "cpu",
                 drop_last: Optional[bool] = None, workers: int = 0, prefetch: int = 2, flip: bool = True,
                 jitter: Optional[Sequence[float]] = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        if batch_size < 1 or resolution < 1 or workers < 0 or prefetch < 1:
            raise ValueError(f"need batch_size, resolution, prefetch >= 1 and workers >= 0, got {batch_size}, "
                             f"{resolution}, {prefetch}, {workers}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if jitter is not None and (len(jitter) != 4 or any(j < 0 for j in jitter)):
            raise ValueError(f"jitter must be 4 strengths >= 0 (brightness, contrast, saturation, hue), got {jitter}")
        self.index, self.batch_size, self.train = index, int(batch_size), bool(train)
        self.resolution, self.seed, self.flip = int(resolution), int(seed), bool(flip)
        self.jitter = None if jitter is None else tuple(float(j) for j in jitter)
        self.rank, self.world_size = int(rank), int(world_size)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.device = torch.device(device)
        n = len(index)
        self.per_rank = n // self.world_size if self.drop_last else math.ceil(n / self.world_size)
        self._len = self.per_rank // self.batch_size if self.drop_last else math.ceil(self.per_rank / self.batch_size)
        if self._len == 0:
            raise ValueError(f"loader would yield no batches: {n} images, batch_size={batch_size}, "
                             f"world_size={world_size}, drop_last={self.drop_last}")
        std_t, mean_t = torch.tensor(std, dtype=torch.float32), torch.tensor(mean, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1).to(self.device)  # x/255/std
        self._shift = (mean_t / std_t).view(1, 3, 1, 1).to(self.device)
        self._sampler = _Batches(n, self.batch_size, self._len, seed=self.seed, train=self.train, rank=self.rank,
                                 world_size=self.world_size, per_rank=self.per_rank)
        self._loader = DataLoader(_Decode(index, self.resolution, self.train, self.seed, self.flip, self.jitter),
                                  batch_sampler=self._sampler, num_workers=int(workers), collate_fn=_collate,
                                  pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                                  prefetch_factor=prefetch if workers > 0 else None)
        self._stream: Optional[Iterator] = None
        self._stream_at = (0, 0)  # (epoch, position) of the batch self._stream yields next
        self.restarts = 0  # times the stream (re)started, discarding prefetched batches
        self.epoch = 0
        self.position = 0  # batches of the current epoch already yielded

    @property
    def num_classes(self) -> int:
        return self.index.num_classes

    def _settings(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size,
                "num_images": len(self.index), "train": self.train, "drop_last": self.drop_last,
                "resolution": self.resolution, "flip": self.flip,
                "jitter": None if self.jitter is None else list(self.jitter)}

    def shard(self, epoch: int) -> torch.Tensor:
        """This rank's image indices (into ``index``) for ``epoch``, in batch order."""
        return shard_order(len(self.index), epoch, **self._sampler.shard)

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage collected)."""
        self._stream = None
        it, self._loader._iterator = self._loader._iterator, None  # persistent workers live in it
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        here = (self.epoch, self.position)
        if self._stream is None or self._stream_at != here:
            self._sampler.start = here
            self._stream = iter(self._loader)
            self.restarts += 1
        batch = next(self._stream)
        e, p = here
        self._stream_at = (e, p + 1) if p + 1 < self._len else (e + 1, 0)
        if isinstance(batch, DataError):
            self._stream = None  # the workers may have moved on; restart cleanly if called again
            raise batch
        images, labels = batch
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        x = x.to(torch.float32, memory_format=torch.contiguous_format).mul_(self._scale).sub_(self._shift)
        return x, labels.to(self.device, non_blocking=True)
