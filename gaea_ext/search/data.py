"""The search's data: loaders for the weight step, the architecture step and validation.

Single-level (GAEA's default) draws both steps' minibatches from the whole training set, with
independent orders. Bilevel holds out ``valid_fraction`` of it (class-stratified) for the
architecture step and for validation. With ``subsets`` (PC-DARTS on ImageNet) the two steps
use disjoint per-class random subsets of the training images, streamed from disk, and the
chosen files are recorded in the run's manifest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from gaea_ext import data as gdata
from gaea_ext.search.config import SearchConfig


@dataclass
class SearchData:
    weights: Any
    arch: Any
    valid: Optional[Any]
    num_classes: int
    in_channels: int
    manifest: Optional[dict] = None  # which images each subset holds, for RUN_DIR/subsets.json


def build(cfg: SearchConfig, rank: int, world: int, device) -> SearchData:
    if cfg.dataset == "imagenet":
        return _streamed(cfg, rank, world, device)
    train = gdata.load(cfg.dataset, cfg.data, "train", resolution=cfg.resolution,
                       max_images=cfg.train_images, seed=cfg.seed)
    manifest = None
    if cfg.subsets is not None:
        subsets = gdata.class_subsets(train.labels, cfg.subsets, cfg.seed)
        w_set, a_set = (train.subset(i) for i in subsets)
        manifest = {"dataset": cfg.dataset, "split": "train", "num_images": len(train),
                    "subsets": {"weights": subsets[0].tolist(), "arch": subsets[1].tolist()}}  # image indices
    elif cfg.bilevel:
        w_set, a_set = gdata.split(train, 1.0 - cfg.valid_fraction, cfg.seed)
    else:
        w_set, a_set = train, train
    held_out = cfg.bilevel or cfg.subsets is not None
    common = dict(rank=rank, world_size=world, device=device)
    # Built once: a Loader uploads its images to the device when it is created. A different
    # seed gives the architecture step its own, independent minibatches.
    return SearchData(
        weights=gdata.Loader(w_set, cfg.batch_size, train=True, seed=cfg.seed, **common),
        arch=gdata.Loader(a_set, cfg.batch_size, train=True, seed=cfg.seed + 7919, **common),
        valid=gdata.Loader(a_set, 256, train=False, **common) if held_out else None,
        num_classes=train.num_classes, in_channels=train.images.shape[1], manifest=manifest)


def _streamed(cfg: SearchConfig, rank: int, world: int, device) -> SearchData:
    """ImageNet: decoded from disk per batch; too large to hold in memory."""
    if cfg.data is None:
        raise gdata.DataError("imagenet needs --data DIR holding train/<class>/<image> (an ImageFolder tree)")
    index = gdata.open_folder(cfg.data, "train")
    if cfg.subsets is not None:
        w_idx, a_idx = gdata.class_subsets(index.labels, cfg.subsets, cfg.seed)
        manifest = gdata.subset_manifest(index, [w_idx, a_idx], ["weights", "arch"])
    elif cfg.bilevel:
        w_idx, a_idx = gdata.class_subsets(index.labels, [1.0 - cfg.valid_fraction, cfg.valid_fraction], cfg.seed)
        manifest = gdata.subset_manifest(index, [w_idx, a_idx], ["weights", "arch"])
    else:
        w_idx = a_idx = None
        manifest = None
    w_set = index if w_idx is None else index.subset(w_idx)
    a_set = index if a_idx is None else index.subset(a_idx)
    size = cfg.resolution or 224
    common = dict(resolution=size, rank=rank, world_size=world, device=device, workers=cfg.workers)
    return SearchData(
        weights=gdata.StreamLoader(w_set, cfg.batch_size, train=True, seed=cfg.seed, **common),
        arch=gdata.StreamLoader(a_set, cfg.batch_size, train=True, seed=cfg.seed + 7919, **common),
        valid=gdata.StreamLoader(a_set, cfg.batch_size, train=False, **common) if a_idx is not None else None,
        num_classes=index.num_classes, in_channels=3, manifest=manifest)
