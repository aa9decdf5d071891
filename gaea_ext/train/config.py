"""Training settings: defaults, the published evaluation recipes as presets, and resolution.

Precedence, as for `gaea search`: built-in defaults < preset < explicit command-line values.
The defaults are DARTS' CIFAR-10 evaluation recipe; the resolved config (with the genotype
itself, not just its file name) is written to RUN_DIR/config.json, so a run is fully
described by that file and resumes even if the genotype file has changed since.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional


class TrainError(ValueError):
    """A bad setting; the message is one line."""


@dataclass
class TrainConfig:
    genotype: Optional[str] = None  # as given: a built-in name or a JSON file
    genotype_json: Optional[Dict[str, Any]] = None  # the cell itself, filled when resolved
    dataset: str = "cifar10"
    data: Optional[str] = None
    epochs: int = 600
    batch_size: int = 96
    channels: int = 36
    layers: int = 20
    lr: float = 0.025
    lr_min: float = 0.0
    lr_schedule: str = "cosine"  # or "linear"; both per epoch, after the warm-up
    warmup_epochs: int = 0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0  # <= 0: no clipping
    cutout: int = 0  # side of the square zeroed in each training image; 0: off
    auxiliary_weight: float = 0.0  # > 0 adds the auxiliary head
    drop_path: float = 0.0  # final drop-path probability, ramped linearly from 0 over the epochs
    label_smoothing: float = 0.0
    resolution: Optional[int] = None
    train_images: Optional[int] = None
    amp: Optional[str] = None  # None, "bf16" or "fp16"
    channels_last: bool = False
    seed: int = 0
    device: str = "auto"
    workers: int = 8  # decoding processes of the streaming ImageNet loader (0: in the main process)
    stop_after: Optional[int] = None  # end this process after that many epochs (resume later)
    checkpoint_every: int = 200  # also checkpoint every N steps inside an epoch (0: epoch ends only)
    max_nonfinite: int = 20  # stop (exit 3) after this many non-finite steps in a row
    preset: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


PAPER_CIFAR = dict(layers=20, channels=36, epochs=600, batch_size=96, lr=0.025, lr_min=0.0, lr_schedule="cosine",
                   warmup_epochs=0, momentum=0.9, weight_decay=3e-4, grad_clip=5.0, cutout=16,
                   auxiliary_weight=0.4, drop_path=0.3, label_smoothing=0.0)

PRESETS: Dict[str, Dict[str, Any]] = {
    # Liu et al. 2019, sec. A.2 (cnn/train.py): the protocol every DARTS-space paper reports.
    "paper-cifar10": dict(PAPER_CIFAR, dataset="cifar10"),
    "paper-cifar100": dict(PAPER_CIFAR, dataset="cifar100"),
    # The mobile setting as in PC-DARTS/GAEA (train_imagenet.py): 14 cells, C=48, batch 1024,
    # lr 0.5 with a 5-epoch linear warm-up then linear decay; no drop path.
    "paper-imagenet": dict(dataset="imagenet", resolution=224, layers=14, channels=48, epochs=250,
                           batch_size=1024, lr=0.5, lr_min=0.0, lr_schedule="linear", warmup_epochs=5,
                           momentum=0.9, weight_decay=3e-5, grad_clip=5.0, cutout=0, auxiliary_weight=0.4,
                           drop_path=0.0, label_smoothing=0.1),
    # `gaea train --genotype X` with no preset: the paper recipe shrunk to the embedded digits,
    # about a minute on 2 CPU cores (bench numbers in the module tests' docstring).
    "demo": dict(PAPER_CIFAR, dataset="digits", layers=5, channels=8, epochs=8, batch_size=64, lr=0.05,
                 cutout=4, drop_path=0.1),
}

# (classes, input channels) per dataset, for --summary without reading any data.
SHAPES = {"digits": (10, 1), "cifar10": (10, 3), "cifar100": (100, 3), "imagenet16-120": (120, 3),
          "imagenet": (1000, 3)}


def resolve(preset: Optional[str], overrides: Dict[str, Any]) -> TrainConfig:
    values: Dict[str, Any] = {}
    if preset is None and overrides.get("dataset") in (None, "digits"):
        preset = "demo"
    if preset is not None:
        if preset not in PRESETS:
            raise TrainError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = TrainConfig(preset=preset, **values)
    except TypeError as e:
        raise TrainError(str(e)) from None
    return check(cfg)


def check(cfg: TrainConfig) -> TrainConfig:
    """Reject values that would fail later or silently do nothing; TrainError names the flag."""
    def need(ok: bool, flag: str, what: str, value) -> None:
        if not ok:
            raise TrainError(f"--{flag} must be {what}, got {value!r}")

    for flag, value in (("epochs", cfg.epochs), ("batch-size", cfg.batch_size), ("channels", cfg.channels),
                        ("layers", cfg.layers)):
        need(isinstance(value, int) and value >= 1, flag, "an integer >= 1", value)
    need(isinstance(cfg.workers, int) and cfg.workers >= 0, "workers", "an integer >= 0", cfg.workers)
    for flag, value in (("train-images", cfg.train_images), ("resolution", cfg.resolution),
                        ("stop-after", cfg.stop_after)):
        need(value is None or value >= 1, flag, ">= 1", value)
    need(math.isfinite(cfg.lr) and cfg.lr > 0, "lr", "> 0", cfg.lr)
    need(0 <= cfg.lr_min <= cfg.lr, "lr-min", "in [0, lr]", cfg.lr_min)
    need(cfg.lr_schedule in ("cosine", "linear"), "lr-schedule", "cosine or linear", cfg.lr_schedule)
    need(0 <= cfg.warmup_epochs < cfg.epochs, "warmup-epochs", "in [0, epochs)", cfg.warmup_epochs)
    need(cfg.momentum >= 0 and cfg.weight_decay >= 0, "momentum/--weight-decay", ">= 0",
         (cfg.momentum, cfg.weight_decay))
    need(cfg.cutout >= 0, "cutout", ">= 0", cfg.cutout)
    need(cfg.auxiliary_weight >= 0, "auxiliary-weight", ">= 0", cfg.auxiliary_weight)
    need(0 <= cfg.drop_path < 1, "drop-path", "in [0, 1)", cfg.drop_path)
    need(0 <= cfg.label_smoothing < 1, "label-smoothing", "in [0, 1)", cfg.label_smoothing)
    need(cfg.amp in (None, "bf16", "fp16"), "amp", "bf16 or fp16", cfg.amp)
    return cfg


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of 0-based ``epoch``: linear warm-up to ``lr`` over ``warmup_epochs``, then
    cosine (DARTS: CosineAnnealingLR(T_max=epochs)) or linear decay towards ``lr_min``.
    A function of the epoch only, so resuming needs no scheduler state."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / cfg.warmup_epochs
    t = (epoch - cfg.warmup_epochs) / (cfg.epochs - cfg.warmup_epochs)
    shape = (1 + math.cos(math.pi * t)) / 2 if cfg.lr_schedule == "cosine" else 1 - t
    return cfg.lr_min + (cfg.lr - cfg.lr_min) * shape


def drop_path_at(cfg: TrainConfig, epoch: int) -> float:
    """DARTS' ramp: drop_path * epoch / epochs, from 0 in the first epoch."""
    return cfg.drop_path * epoch / cfg.epochs
