"""Search settings: defaults, the published recipes as presets, and their resolution.

Precedence: built-in defaults < preset < explicit command-line values. The resolved config is
written to RUN_DIR/config.json, so a run is fully described by that file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from gaea_ext.search.methods import METHOD_ARCH_LR


@dataclass
class SearchConfig:
    space: str = "nb201"
    method: str = "gaea"
    dataset: str = "digits"
    data: Optional[str] = None
    nb201: Optional[str] = None
    nb101: Optional[str] = None  # nb1shot1-*: NAS-Bench-101 tfrecord (or its cached .npz table) to score cells
    epochs: int = 10
    batch_size: int = 64
    channels: int = 8
    cells: int = 1  # nb201: cells per stage; darts/pcdarts/nb1shot1-*: cells in all
    resolution: Optional[int] = None
    train_images: Optional[int] = None
    exclude_none: Optional[bool] = None  # None: the space's default (nb201 drops `none`, darts keeps it)
    partial: Optional[int] = None  # pcdarts, nb1shot1-*: 1/K of the channels through the mixed op (None: 4, ImageNet 2)
    stem: Optional[str] = None  # "cifar" or "imagenet" (3 stride-2 convs); None: by dataset
    lr: float = 0.025
    lr_min: float = 0.001
    lr_warmup: int = 0  # epochs of linear learning-rate warm-up before the cosine schedule
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_lr: Optional[float] = None  # None: the method's own default (GAEA 0.1, DARTS 3e-4)
    arch_eps: float = 1e-5
    edge_lr: float = 0.1  # GAEA's EG step on PC-DARTS edge weights (no clamp)
    arch_grad_clip: Optional[float] = None  # clip the architecture gradient's norm
    gdas_kl: float = 0.01  # gaea-gdas: weight of KL(theta || uniform)
    tau_max: float = 10.0  # gaea-gdas: Gumbel-softmax temperature, annealed linearly ...
    tau_min: float = 0.1  # ... reaching tau_min at the last epoch
    arch_warmup: int = 0  # epochs of weight-only training before architecture steps begin
    bilevel: bool = False
    arch_batch: str = "independent"  # or "same": one forward/backward gives both gradients
    valid_fraction: float = 0.5  # bilevel: share of the training set held out for the architecture
    subsets: Optional[List[float]] = None  # per-class fractions (weights, architecture), e.g. ImageNet
    select: str = "last"  # or "best-valid": return the genotype of the best validation epoch
    amp: Optional[str] = None  # "bf16" or "fp16" autocast
    channels_last: bool = False
    prune_below: float = 0.0  # skip candidates whose mixing weight is below this (0: never)
    cuda_graphs: bool = False  # record the whole search step as a CUDA graph and replay it
    compile: Optional[str] = None  # torch.compile backend for the supernet's forward ("inductor", "aot_eager")
    workers: int = 4  # decode processes for streamed (ImageNet) data
    seed: int = 0
    fused: bool = True
    device: str = "auto"
    stop_after: Optional[int] = None  # end this process after that many epochs (resume later)
    checkpoint_every: int = 200  # also checkpoint every N steps inside an epoch (0: epoch ends only)
    max_nonfinite: int = 20  # stop (exit 3) after this many non-finite weight steps in a row
    preset: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


PAPER = dict(epochs=25, batch_size=64, channels=16, cells=5, lr=0.025, lr_min=0.001,
             weight_decay=3e-4, arch_lr=0.1, exclude_none=True)

# GAEA PC-DARTS (Li et al. 2021, following Xu et al. 2020's PC-DARTS recipes).
PCDARTS_CIFAR = dict(space="pcdarts", dataset="cifar10", bilevel=True, valid_fraction=0.5, epochs=50,
                     batch_size=256, channels=16, cells=8, partial=4, lr=0.1, lr_min=0.0, momentum=0.9,
                     weight_decay=3e-4, grad_clip=5.0, arch_lr=0.1, edge_lr=0.1, select="best-valid")

# NAS-Bench-1Shot1 with GAEA PC-DARTS, the protocol of the GAEA authors' fork of
# automl/nasbench-1shot1 (liamcli/nasbench-1shot1, optimizers/epc_edarts/train_search.py):
# bilevel on a 50/50 split of CIFAR-10's training set, batch 96, SGD 0.025 cosine to 0.001,
# momentum 0.9, wd 3e-4, clip 5, 9 cells at C=16, partial channels K=4, and architecture steps
# only after 10 epochs of weight training (its --warm_start_epochs default). 50 epochs as in
# 1Shot1's README command. EG step sizes: that fork takes them as arguments of its run script
# (cluster_scripts/run-experiment.sh: ARCH_LR, EDGE_LR), and its train_search.py defaults
# (3e-4, DARTS's Adam rate carried over) are not EG step sizes. 0.1 for the op rows and 0.1 for
# the parent rows (adapt_lr off) is the authors' GAEA PC-DARTS setting in their release repo
# (liamcli/gaea_release, configs/cnn/search_method/edarts/method_edarts_space_pcdarts.yaml:
# arch_learning_rate 0.1, edge_learning_rate 0.1); no file of theirs states the values of the
# 1Shot1 runs themselves.
NB1SHOT1 = dict(dataset="cifar10", bilevel=True, valid_fraction=0.5, epochs=50, batch_size=96, channels=16, cells=9,
                partial=4, lr=0.025, lr_min=0.001, momentum=0.9, weight_decay=3e-4, grad_clip=5.0, arch_lr=0.1,
                edge_lr=0.1, arch_warmup=10, select="last")

PRESETS: Dict[str, Dict[str, Any]] = {
    # `gaea search` with no preset on the embedded digits: a one-minute CPU demo. Its horizon is
    # short, so, like cpu-proxy, it takes a larger mirror-descent step than the paper's 0.1.
    "demo": dict(dataset="digits", epochs=10, channels=8, cells=1, batch_size=64, arch_lr=2.0),
    "paper-cifar10": dict(PAPER, dataset="cifar10"),
    "paper-cifar100": dict(PAPER, dataset="cifar100"),
    "paper-imagenet16": dict(PAPER, dataset="imagenet16-120"),
    # A CIFAR-10 search sized for 2 CPU cores (a few minutes): 32 px like the NAS-Bench-201 table,
    # 10,000 class-balanced images, 6 epochs. A short horizon needs a larger step than the
    # paper's for the weights (SGD 0.1, not 0.025: at 0.025 the supernet kept preferring
    # avg_pool on the input->output edge) and for the architecture (EG 1.5, not 0.1, or the
    # weights never leave uniform). bench/RESULTS.md (issue 16) has how it was chosen and what it
    # scores over seeds 0-9 against tuned DARTS and GAEA bilevel.
    "cpu-proxy": dict(dataset="cifar10", channels=8, cells=1, resolution=32, train_images=10000,
                      epochs=6, batch_size=64, lr=0.1, arch_lr=1.5, exclude_none=True),
    "paper-pcdarts-cifar10": PCDARTS_CIFAR,
    # ImageNet: 10 % / 2.5 % per-class subsets for weights / architecture, 224 px, 3-conv stem.
    "paper-pcdarts-imagenet": dict(PCDARTS_CIFAR, dataset="imagenet", resolution=224, stem="imagenet", partial=2,
                                   subsets=[0.1, 0.025], batch_size=1024, lr=0.5, lr_warmup=5, weight_decay=3e-4,
                                   arch_grad_clip=5.0, arch_warmup=35, select="last"),
    "paper-nb1shot1": NB1SHOT1,
}



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
    nb1shot1 = cfg.space.startswith("nb1shot1-")
    if cfg.method == "pcdarts" and not nb1shot1:  # on nb1shot1-*: 1Shot1's own PC-DARTS
        if "space" in explicit and cfg.space != "pcdarts":
            raise ValueError(f"method pcdarts searches the pcdarts space or nb1shot1-1|2|3, not {cfg.space}")
        cfg.space = "pcdarts"
    if nb1shot1 and cfg.method in ("darts", "pcdarts"):
        # 1Shot1's (PC-)DARTS baselines: Adam 3e-4 (optimizers/pc_darts/train_search.py), no warm start.
        cfg.arch_lr = cfg.arch_lr if "arch_lr" in explicit else 3e-4
        cfg.arch_warmup = cfg.arch_warmup if "arch_warmup" in explicit else 0
    if cfg.preset == "paper-nb1shot1" and not nb1shot1:
        raise ValueError("--preset paper-nb1shot1 needs --space nb1shot1-1, nb1shot1-2 or nb1shot1-3")
    if cfg.method in ("darts", "pcdarts", "gaea-gdas"):
        cfg.bilevel = True  # defined bilevel
    if cfg.exclude_none is None:
        cfg.exclude_none = cfg.space == "nb201"
    if cfg.stem is None:
        cfg.stem = "imagenet" if cfg.dataset == "imagenet" else "cifar"
    if cfg.partial is None:
        cfg.partial = (2 if cfg.dataset == "imagenet" else 4) if cfg.space == "pcdarts" or nb1shot1 else 1
    if cfg.space != "nb201" and cfg.preset in (None, "demo"):
        # NB201's stage sizes mean nothing here: the DARTS supernet (16 channels, 8 cells), or a
        # small one (8, 5) for the embedded demo data.
        demo = cfg.preset == "demo"
        if nb1shot1:  # 1Shot1's 9 cells at C=16; the demo 3 cells at C=8
            cfg.cells = cfg.cells if "cells" in explicit else (3 if demo else 9)
        cfg.cells = cfg.cells if "cells" in explicit or nb1shot1 else (5 if demo else 8)
        cfg.channels = cfg.channels if "channels" in explicit else (8 if demo else 16)
    validate(cfg)
    return cfg


def validate(cfg: SearchConfig) -> None:
    """Values no run can use: ValueError, which the CLI prints as one line."""
    for name in ("epochs", "batch_size", "channels", "cells", "partial"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 < cfg.valid_fraction < 1.0:
        raise ValueError(f"--valid-fraction must lie in (0, 1), got {cfg.valid_fraction}")
    if cfg.subsets is not None:
        if len(cfg.subsets) != 2 or not all(0.0 < f <= 1.0 for f in cfg.subsets) or sum(cfg.subsets) > 1.0:
            raise ValueError(f"--subsets takes two per-class fractions in (0, 1] summing to <= 1, got {cfg.subsets}")
    if cfg.amp not in (None, "bf16", "fp16"):
        raise ValueError(f"--amp must be bf16 or fp16, got {cfg.amp!r}")
    if cfg.compile and cfg.method == "gaea-gdas":
        raise ValueError("--compile does not suit gaea-gdas: the sampled op changes the graph every step")
    if not 0.0 <= cfg.prune_below < 1.0:
        raise ValueError(f"--prune-below must lie in [0, 1), got {cfg.prune_below}")
    if cfg.prune_below > 0 and cfg.method in ("gaea-gdas", "random"):
        raise ValueError(f"--prune-below does not apply to {cfg.method}: it computes one op per edge already")
    if cfg.cuda_graphs:
        if cfg.method in ("gaea-gdas", "random"):
            raise ValueError(f"--cuda-graphs does not suit {cfg.method}: its step picks ops on the host")
        for flag, bad in (("--prune-below", cfg.prune_below > 0), ("--amp fp16", cfg.amp == "fp16"),
                          ("--compile", bool(cfg.compile))):
            if bad:
                raise ValueError(f"--cuda-graphs does not combine with {flag} (host-side decisions in the step)")
    if cfg.nb101 and not cfg.space.startswith("nb1shot1-"):
        raise ValueError(f"--nb101 scores nb1shot1-1|2|3 cells, not the {cfg.space} space")
    if cfg.select not in ("last", "best-valid"):
        raise ValueError(f"--select must be last or best-valid, got {cfg.select!r}")
    if cfg.select == "best-valid" and not cfg.bilevel and cfg.subsets is None:
        raise ValueError("--select best-valid needs a validation split (--bilevel)")
