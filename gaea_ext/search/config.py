"""Search settings: defaults, the published recipes as presets, and their resolution.

Precedence: built-in defaults < preset < explicit command-line values. The resolved config is
written to RUN_DIR/config.json, so a run is fully described by that file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional


@dataclass
class SearchConfig:
    space: str = "nb201"
    method: str = "gaea"
    dataset: str = "digits"
    data: Optional[str] = None
    nb201: Optional[str] = None
    epochs: int = 10
    batch_size: int = 64
    channels: int = 8
    cells: int = 1
    resolution: Optional[int] = None
    train_images: Optional[int] = None
    exclude_none: bool = True
    lr: float = 0.025
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_lr: Optional[float] = None  # None: the method's own default (GAEA 0.1, DARTS 3e-4)
    arch_eps: float = 1e-5
    arch_warmup: int = 0  # epochs of weight-only training before architecture steps begin
    bilevel: bool = False
    arch_batch: str = "independent"  # or "same": one forward/backward gives both gradients
    seed: int = 0
    fused: bool = True
    device: str = "auto"
    stop_after: Optional[int] = None  # end this process after that many epochs (resume later)
    preset: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


PAPER = dict(epochs=25, batch_size=64, channels=16, cells=5, lr=0.025, lr_min=0.001,
             weight_decay=3e-4, arch_lr=0.1, exclude_none=True)

PRESETS: Dict[str, Dict[str, Any]] = {
    # `gaea search` with no preset on the embedded digits: a one-minute CPU demo. Its horizon is
    # short, so, like cpu-proxy, it takes a larger mirror-descent step than the paper's 0.1.
    "demo": dict(dataset="digits", epochs=10, channels=8, cells=1, batch_size=64, arch_lr=2.0),
    "paper-cifar10": dict(PAPER, dataset="cifar10"),
    "paper-cifar100": dict(PAPER, dataset="cifar100"),
    "paper-imagenet16": dict(PAPER, dataset="imagenet16-120"),
    # A short CIFAR-10 search that fits 10 minutes on 2 CPU cores (about 4). A short horizon
    # needs a larger mirror-descent step for the weights to leave uniform; 1.5 over 10 epochs
    # beat 2.0 over 8 (bench/RESULTS.md has the calibration).
    "cpu-proxy": dict(dataset="cifar10", channels=8, cells=1, resolution=16, train_images=10000,
                      epochs=10, batch_size=64, arch_lr=1.5, exclude_none=True),
}

METHOD_ARCH_LR = {"gaea": 0.1, "darts": 3e-4, "random": 0.0}


def resolve(preset: Optional[str], overrides: Dict[str, Any]) -> SearchConfig:
    values: Dict[str, Any] = {}
    if preset is None and overrides.get("dataset") in (None, "digits"):
        preset = "demo"
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = SearchConfig(preset=preset, **values)
    explicit = {k for k, v in overrides.items() if v is not None}
    # A preset's EG step size is GAEA's; other methods keep their own unless asked otherwise.
    if cfg.arch_lr is None or (cfg.method != "gaea" and "arch_lr" not in explicit):
        cfg.arch_lr = METHOD_ARCH_LR.get(cfg.method, 0.1)
    if cfg.method == "darts":
        cfg.bilevel = True  # DARTS is defined bilevel
    return cfg
