"""The training loop: SGD on a fixed cell, per-epoch test evaluation, log, checkpoint, resume.

Per step, as in DARTS' cnn/train.py: cutout on the (normalized) batch, forward with drop path
on the cells' non-identity edges, cross-entropy (label-smoothed if asked) plus the weighted
auxiliary loss, gradients averaged across ranks with one flattened all-reduce, clipped, SGD.
The learning rate and drop-path probability are functions of the epoch (config.lr_at,
config.drop_path_at), so a checkpoint needs no scheduler state. Every random draw is either
from the global torch RNG (init, drop path; saved in checkpoints) or from a generator seeded
by (seed, epoch, rank, batch) (data order, crops, cutout), so resuming is exact on CPU.
Checkpoints, preemption and non-finite steps work as in the search (gaea_ext.search.faults):
a checkpoint every cfg.checkpoint_every steps holds the epoch's running sums too.
"""
from __future__ import annotations

import os
import random
import time
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from gaea_ext import data as gdata
from gaea_ext.data.seeding import generator
from gaea_ext.precision import Precision
from gaea_ext.search import dist, faults, rundir
from gaea_ext.search.loop import (add_step, epoch_sums, peak_mem_mb, pick_device, rng_state, running_loss,
                                  set_rng_state)
from gaea_ext.search.progress import Progress
from gaea_ext.spaces import genotypes
from gaea_ext.train.config import TrainConfig, TrainError, check, drop_path_at, lr_at
from gaea_ext.train.network import NetworkCIFAR, NetworkImageNet, param_count_m


def build_network(cfg: TrainConfig, genotype, num_classes: int, in_channels: int) -> torch.nn.Module:
    cls = NetworkImageNet if cfg.dataset == "imagenet" else NetworkCIFAR
    return cls(cfg.channels, num_classes, cfg.layers, cfg.auxiliary_weight > 0, genotype, in_channels)


def genotype_of(cfg: TrainConfig):
    """The config's cell: the stored JSON when present (resume), else loaded from the spec."""
    if cfg.genotype_json is not None:
        return genotypes.from_json(cfg.genotype_json)
    if not cfg.genotype:
        raise TrainError("--genotype is required (a built-in name such as DARTS_V2, or a JSON file)")
    return genotypes.load(cfg.genotype)


def make_loaders(cfg: TrainConfig, rank: int, world: int, device: torch.device):
    """(train loader, test loader, classes, input channels). In-memory Loaders, except for
    ImageNet, which is streamed from disk (gaea_ext.data.stream, imported only when needed)."""
    if cfg.dataset == "imagenet":
        try:
            from gaea_ext.data.folder_index import open_folder
            from gaea_ext.data.sampling import balanced_indices
            from gaea_ext.data.stream import PCDARTS_JITTER, StreamLoader
        except ImportError:
            raise TrainError("dataset imagenet needs gaea_ext.data.stream, which this build lacks") from None
        if cfg.data is None:
            raise TrainError("dataset imagenet needs --data DIR holding train/ and val/ (ImageFolder trees)")
        train_index = open_folder(cfg.data, "train")
        test_index = open_folder(train_index.source, "val")  # reuses an opened archive
        if cfg.train_images is not None:
            train_index = train_index.subset(balanced_indices(train_index.labels, train_index.num_classes,
                                                              cfg.train_images, cfg.seed))
        common = dict(resolution=cfg.resolution or 224, seed=cfg.seed, rank=rank, world_size=world,
                      device=device, workers=cfg.workers)
        # DARTS/PC-DARTS ImageNet augmentation: random resized crop, flip, colour jitter.
        train = StreamLoader(train_index, cfg.batch_size, train=True, jitter=PCDARTS_JITTER, **common)
        test = StreamLoader(test_index, cfg.batch_size, train=False, **common)
        return train, test, train_index.num_classes, 3
    train_set = gdata.load(cfg.dataset, cfg.data, "train", resolution=cfg.resolution,
                           max_images=cfg.train_images, seed=cfg.seed)
    test_set = gdata.load(cfg.dataset, cfg.data, "test", resolution=cfg.resolution)
    where = dict(rank=rank, world_size=world, device=device)
    train = gdata.Loader(train_set, cfg.batch_size, train=True, seed=cfg.seed, **where)
    test = gdata.Loader(test_set, max(cfg.batch_size, 256), train=False, **where)
    return train, test, train_set.num_classes, train_set.images.shape[1]


def cutout(x: torch.Tensor, length: int, gen: torch.Generator) -> torch.Tensor:
    """Zero a length x length square (clipped at the border) centred uniformly in each image,
    after normalization, as DARTS' Cutout. Centres are drawn on the CPU from ``gen``."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1), generator=gen).to(x.device)
    cx = torch.randint(0, w, (b, 1), generator=gen).to(x.device)
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_y = (rows >= cy - length // 2) & (rows < cy + length // 2)  # [B, H]
    in_x = (cols >= cx - length // 2) & (cols < cx + length // 2)  # [B, W]
    keep = ~(in_y[:, :, None] & in_x[:, None, :])
    return x * keep[:, None].to(x.dtype)


def topk_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[top-1, top-5] correct counts (top-5 is top-C when there are fewer than 5 classes)."""
    pred = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = pred == y[:, None]
    return torch.stack([hit[:, :1].sum(), hit.sum()])


class Trainer:
    def __init__(self, cfg: TrainConfig, out: Optional[str] = None, echo=print):
        self.cfg, self.out, self.echo = check(cfg), out, echo
        self.genotype = genotype_of(cfg)
        self.device = pick_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.prec = Precision(cfg.amp, self.device, cfg.channels_last)
        self.rank, self.world = dist.init(self.device)
        self.main = self.rank == 0
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.train_loader, self.test_loader, self.num_classes, in_ch = make_loaders(cfg, self.rank, self.world,
                                                                                    self.device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = build_network(cfg, self.genotype, self.num_classes, in_ch).to(
            self.device, memory_format=self.memory_format)
        dist.broadcast_state(self.model)
        self.buffers = faults.Buffers(self.model)  # BN statistics, restored after a skipped step
        self.params = list(self.model.parameters())
        self.opt = faults.weight_optimizer(self.params, cfg.lr, cfg.momentum, cfg.weight_decay)
        self.epoch = 0
        self.best = {"test_top1": -1.0, "test_top5": -1.0, "epoch": 0}
        self.last: Dict[str, float] = {}  # the latest epoch's test accuracy
        self.guard = faults.Guard(cfg.checkpoint_every, cfg.max_nonfinite, self.device)
        self.saved_sums = None  # every rank's sums, for a mid-epoch checkpoint
        self.sums: Optional[Dict[str, Any]] = None  # the current epoch's running sums (mid-epoch checkpoints)

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "config": self.cfg.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(), "scaler": self.prec.state_dict(),
                "train_loader": self.train_loader.state_dict(), "best": dict(self.best), "last": dict(self.last), "rng": rng_state(),
                "sums": self.saved_sums}

    def load_state_dict(self, s: Dict[str, Any]) -> None:
        self.epoch = s["epoch"]
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
        self.prec.load_state_dict(s.get("scaler"))
        self.train_loader.load_state_dict(s["train_loader"])
        self.best, self.last = dict(s["best"]), dict(s["last"])
        self.sums = faults.restore_sums(s.get("sums"), self.rank, self.device)
        set_rng_state(s["rng"])

    # -- steps ------------------------------------------------------------------------
    def step(self, x, y, batch: int):
        cfg = self.cfg
        if cfg.cutout:
            x = cutout(x, cfg.cutout, generator("cutout", cfg.seed, self.epoch, self.rank, batch))
        x = self.prec.layout(x)
        self.opt.zero_grad(set_to_none=True)
        self.buffers.take()
        with self.prec.autocast():
            logits, logits_aux = self.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        if logits_aux is not None:
            loss = loss + cfg.auxiliary_weight * F.cross_entropy(logits_aux.float(), y,
                                                                 label_smoothing=cfg.label_smoothing)
        self.prec.backward(loss)
        # Reduce the still-scaled gradients: an inf on any rank then reaches every rank, so
        # all ranks agree to skip the step.
        dist.average_grads(self.params)
        self.prec.unscale(self.opt)
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in self.params
                                                         if p.grad is not None]))
        # A non-finite loss or gradient skips the step on the device (faults.Guard.weight_step).
        ok = self.guard.weight_step(self.opt, self.prec, norm, loss, self.world)
        self.buffers.keep_if(ok)
        return ok, loss.detach(), topk_correct(logits.detach(), y)

    def train_epoch(self) -> Dict[str, float]:
        self.model.train()
        self.model.drop_path_prob = drop_path_at(self.cfg, self.epoch)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.cfg, self.epoch)
        if self.sums is None:  # a fresh epoch (else: resumed inside it from a checkpoint)
            self.sums = epoch_sums(self.device, correct_shape=(2,))  # top-1, top-5
        sums, steps = self.sums, len(self.train_loader)
        bar = Progress(steps, f"epoch {self.epoch + 1}/{self.cfg.epochs}", self.main)
        start = time.perf_counter() - sums["seconds"]

        def save():
            if not self.out:  # (the same on every rank)
                return
            sums["seconds"] = time.perf_counter() - start
            self.saved_sums = faults.gather_sums(sums, self.device)  # every rank's, for rank 0 to write
            if self.main and self.out:
                rundir.save_checkpoint(os.path.join(self.out, "checkpoint.pt"), self.state_dict())

        for x, y in self.train_loader:
            # The batch's index in its epoch (seeds its cutout), also when resumed mid-epoch.
            ok, loss, correct = self.step(x, y, self.train_loader.position - 1)
            add_step(sums, ok, loss * len(y), correct, len(y))
            # read only when the bar redraws
            bar.update(1, loss=lambda: running_loss(sums))
            self.guard.after_step(self.epoch, self.train_loader.position, steps, save)
        bar.close()
        secs = time.perf_counter() - start
        self.sums = self.saved_sums = None
        loss_t, top1, top5, n = dist.all_reduce_sum([float(sums["loss_sum"]), *map(float, sums["correct"]),
                                                     float(sums["seen"])], self.device)
        n = max(1.0, n)
        return {"train_loss": loss_t / n, "train_top1": 100 * top1 / n, "train_top5": 100 * top5 / n,
                "seconds": secs, "images_per_s": n / secs, "nonfinite_steps": int(sums["nonfinite"])}

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros(2, device=self.device, dtype=torch.long)
        seen = 0
        for x, y in self.test_loader:
            with self.prec.autocast():
                logits, _ = self.model(self.prec.layout(x))
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            correct += topk_correct(logits, y)
            seen += len(y)
        loss_t, top1, top5, n = dist.all_reduce_sum([float(loss_sum), *map(float, correct), float(seen)], self.device)
        return {"test_loss": loss_t / n, "test_top1": 100 * top1 / n, "test_top5": 100 * top5 / n}

    # -- the run ----------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        stop = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, self.epoch + cfg.stop_after)
        while self.epoch < stop:
            record = {"lr": lr_at(cfg, self.epoch), "drop_path": drop_path_at(cfg, self.epoch)}
            record.update(self.train_epoch())
            # Ranks' BN running statistics drift apart (each sees its own batches): use rank 0's.
            dist.broadcast_state(self.model)
            record.update(self.evaluate())
            self.epoch += 1
            self.last = {k: record[k] for k in ("test_top1", "test_top5")}
            if record["test_top1"] > self.best["test_top1"]:
                self.best = {"test_top1": record["test_top1"], "test_top5": record["test_top5"], "epoch": self.epoch}
            self.end_epoch(record)
            self.guard.after_epoch(self.epoch)
        return self.finish()

    def close(self) -> None:
        """Stop the streaming loaders' worker processes (in-memory loaders have none)."""
        for loader in (self.train_loader, self.test_loader):
            getattr(loader, "close", lambda: None)()

    def end_epoch(self, record: Dict[str, Any]) -> None:
        record.update(epoch=self.epoch, peak_mem_mb=peak_mem_mb(self.device))
        if not self.main:
            return
        self.echo(f"epoch {self.epoch}/{self.cfg.epochs} lr {record['lr']:.4g} loss {record['train_loss']:.3f} "
                  f"train {record['train_top1']:.1f} test {record['test_top1']:.2f} (top-5 {record['test_top5']:.2f}) "
                  f"{record['images_per_s']:.0f} img/s")
        if self.out:
            rundir.record_epoch(self.out, record, self.state_dict())

    def finish(self) -> Dict[str, Any]:
        result = {"dataset": self.cfg.dataset, "seed": self.cfg.seed, "epochs_done": self.epoch,
                  "complete": self.epoch >= self.cfg.epochs, "params_m": param_count_m(self.model),
                  "genotype": genotypes.to_json(self.genotype),
                  "final_test_top1": self.last.get("test_top1"), "final_test_top5": self.last.get("test_top5"),
                  "best_test_top1": self.best["test_top1"], "best_test_top5": self.best["test_top5"],
                  "best_epoch": self.best["epoch"]}
        if self.main and self.out:
            rundir.write_json(os.path.join(self.out, "result.json"), result)
        return result
