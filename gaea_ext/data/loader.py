"""Loader: in-memory, on-device batching with exact, resumable randomness.

The whole ImageSet is uploaded to ``device`` once as uint8. Each batch is gathered by index,
augmented (train only) and converted to normalized float32 there -- no worker processes, no
per-image Python.

Randomness. Epoch ``e``'s order is ``randperm(N)`` from a generator seeded by (seed, e); the
crops/flips of batch ``b`` come from one seeded by (seed, e, rank, b). Both are CPU generators,
so the data is a pure function of (seed, epoch, batch index): identical on CPU and GPU, and
a loader restored from ``state_dict`` continues with exactly the batches an uninterrupted one
would have produced.

Epochs. Iterating yields the *remaining* batches of the current epoch -- or, if all of them
have been yielded already, the whole next epoch -- and moves to the next epoch when it runs
out. So ``for epoch in ...: for x, y in loader:`` walks consecutive epochs without calling
``set_epoch`` (calling it, as with DistributedSampler, is also fine); a loop that stops early
(``break``, or ``zip`` with a shorter loader) leaves the epoch open and the next iteration
continues it; and DARTS-style ``next(iter(valid_loader))`` steps through the epochs batch by
batch. Consecutive iterations thus form one stream of batches that depends only on (seed,
epoch, position): a loader restored with ``load_state_dict`` continues that stream exactly.
A state saved right after an epoch's last batch (position == len) continues with the next
epoch; a training loop resuming from it has no batches left in the saved epoch.

Sharding (world_size > 1). Every rank draws the same permutation and takes every
world_size-th element from position ``rank`` on. With drop_last (the default when training)
the permutation is first cut to a multiple of world_size, so shards are disjoint and at most
world_size - 1 images are skipped per epoch (different ones each epoch). Without drop_last
(the default for evaluation) it is padded by wrapping around, so every image is covered and
up to world_size - 1 images appear twice. All ranks always have the same number of batches.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .augment import crop_flip
from .epochs import EpochLoader
from .imageset import ImageSet
from .seeding import generator

class Loader(EpochLoader):
    """Batches of (x float32 [B, C, H, W] normalized, y int64 [B]) on ``device``.

    train: shuffle each epoch and augment (random crop after padding ``pad`` black pixels per
        side, default H // 8, i.e. 4 for 32x32, like torchvision's RandomCrop(H, padding=pad);
        horizontal flip if ``data.flip``). Otherwise sequential order, no augmentation.
    drop_last: drop the final partial batch (and the sharding remainder); default ``train``.
    rank, world_size: shard for distributed data parallel training (see module docstring).
    """

    def __init__(self, data: ImageSet, batch_size: int, *, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: Union[str, torch.device] = "cpu", drop_last: Optional[bool] = None,
                 pad: Optional[int] = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        height, width = data.images.shape[-2:]
        self.pad = min(height, width) // 8 if pad is None else int(pad)
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.data = data
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.device = torch.device(device)

        n = len(data)
        self.per_rank = n // self.world_size if self.drop_last else math.ceil(n / self.world_size)
        self._len = self.per_rank // self.batch_size if self.drop_last else math.ceil(self.per_rank / self.batch_size)
        if self._len == 0:
            raise ValueError(f"loader would yield no batches: {n} images, batch_size={batch_size}, "
                             f"world_size={world_size}, drop_last={self.drop_last}")

        self._images = data.images.to(self.device)
        self._labels = data.labels.to(self.device)
        std = torch.tensor(data.std, dtype=torch.float32)
        mean = torch.tensor(data.mean, dtype=torch.float32)
        shape = (1, len(data.std), 1, 1)
        self._scale = (1.0 / (255.0 * std)).view(shape).to(self.device)  # x/255/std
        self._shift = (mean / std).view(shape).to(self.device)
        self.epoch = 0
        self.position = 0  # batches of the current epoch already yielded
        self._shard: Optional[tuple[int, torch.Tensor]] = None

    def _settings(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size,
                "num_images": len(self.data), "train": self.train, "drop_last": self.drop_last, "pad": self.pad}

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(self.epoch, self.position)

    def _indices(self, epoch: int) -> torch.Tensor:
        """This rank's image indices for ``epoch``, on the device."""
        if self._shard is None or self._shard[0] != epoch:
            n, w = len(self.data), self.world_size
            order = torch.randperm(n, generator=generator("shuffle", self.seed, epoch)) if self.train else torch.arange(n)
            total = self.per_rank * w
            if total > n:  # wrap around to give every rank the same count
                order = order.repeat(math.ceil(total / n))
            self._shard = (epoch, order[:total][self.rank::w].to(self.device))
        return self._shard[1]

    def _batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._indices(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        images = self._images.index_select(0, idx)
        if self.train:
            gen = generator("augment", self.seed, epoch, self.rank, index)
            images = crop_flip(images, self.pad, self.data.flip, gen)
        x = images.to(torch.float32).mul_(self._scale).sub_(self._shift)
        return x, self._labels.index_select(0, idx)
