"""The search loop: alternate architecture and weight steps, log, checkpoint, resume.

Checkpoints are written at each epoch's end and every cfg.checkpoint_every steps inside an
epoch, with the epoch's running sums, so a run killed anywhere resumes bit for bit on the CPU
(gaea_ext.search.faults: preemption signals, non-finite steps).

Per step (GAEA's single-level ERM by default): the architecture gradient is taken on an
independent training minibatch (a held-out split with --bilevel) and applied by the method's
optimizer, then the shared weights take an SGD step on their own minibatch with the
architecture fixed. `arch_batch="same"` takes both gradients from one forward/backward.
"""
from __future__ import annotations

import math
import os
import random
import resource
import time
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from gaea_ext.benchmarks.nb101 import NB101Table
from gaea_ext.benchmarks.nb201 import NB201Table
from gaea_ext.precision import Precision
from gaea_ext.search import data as search_data
from gaea_ext.search import dist, faults, rundir
from gaea_ext.search.config import SearchConfig
from gaea_ext.search.graphs import GraphedStep
from gaea_ext.search.methods import make_method
from gaea_ext.search.prune import prune
from gaea_ext.search.progress import Progress
from gaea_ext.spaces import build_network, genotypes
from gaea_ext.spaces.arch import ArchWeights


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    return torch.device(name)


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rng_state() -> Dict[str, Any]:
    """Every global RNG's state as tensors and plain tuples (what a weights_only load accepts)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Search:
    def __init__(self, cfg: SearchConfig, out: Optional[str] = None, echo=print):
        self.cfg, self.out, self.echo = cfg, out, echo
        self.device = pick_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.rank, self.world = dist.init(self.device)
        self.main = self.rank == 0
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        # Before the data: a missing or corrupt table file fails the run at once.
        self.nb101 = NB101Table.load(cfg.nb101, echo=echo if self.main else None) if cfg.nb101 else None

        data = search_data.build(cfg, self.rank, self.world, self.device)
        self.num_classes = data.num_classes
        self.loader_w, self.loader_a, self.loader_valid = data.weights, data.arch, data.valid
        self.manifest = data.manifest
        self.arch_iter = iter(self.loader_a)

        self.model = build_network(cfg.space, channels=cfg.channels, cells=cfg.cells, num_classes=data.num_classes,
                                   in_channels=data.in_channels, exclude_none=cfg.exclude_none, fused=cfg.fused,
                                   partial=cfg.partial, stem=cfg.stem).to(self.device)
        self.method = make_method(cfg.method, self.model.arch_spec(), arch_lr=cfg.arch_lr, arch_eps=cfg.arch_eps,
                                  fused=cfg.fused, seed=cfg.seed, edge_lr=cfg.edge_lr, gdas_kl=cfg.gdas_kl,
                                  tau=(cfg.tau_max, cfg.tau_min)).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        dist.broadcast_state(self.model)
        dist.broadcast_state(self.method)
        # BN statistics in one flat tensor, restored after a skipped step (not under graphs)
        self.buffers = None if cfg.cuda_graphs else faults.Buffers(self.model)
        # The supernet's forward through torch.compile (the module itself stays uncompiled, so
        # checkpoints and the --no-fused A/B are unchanged).
        self.forward = torch.compile(self.model, backend=cfg.compile) if cfg.compile else self.model
        # --cuda-graphs: the lr lives on the device (the scheduler fills it between epochs) and
        # fused SGD reads it there, so the captured step never syncs with the host.
        graphs = cfg.cuda_graphs
        if graphs and self.world > 1:
            raise ValueError("--cuda-graphs runs in a single process")
        # Fused SGD either way: it reads the lr (under graphs) and the skip flag on the device.
        self.w_opt = faults.weight_optimizer(self.model.parameters(), self._lr(cfg.lr), cfg.momentum,
                                             cfg.weight_decay)
        self.graphed: Dict[tuple, GraphedStep] = {}  # step kind -> its captured step (one at a time)
        self._arch_opt_for_graphs()
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.w_opt, lr_factor(cfg))
        self.prec = Precision(cfg.amp, self.device, cfg.channels_last, autocast_cache=not graphs)
        self.table = NB201Table.load(cfg.nb201) if cfg.nb201 and cfg.space == "nb201" else None
        self.best: Optional[Dict[str, Any]] = None  # best validation epoch, for select="best-valid"
        self.epoch = 0
        self.guard = faults.Guard(cfg.checkpoint_every, cfg.max_nonfinite, self.device)
        # The current epoch's running sums (None between epochs); part of a mid-epoch checkpoint.
        self.saved_sums = None  # every rank's sums, for a mid-epoch checkpoint
        self.sums: Optional[Dict[str, Any]] = None
        self.ok: Optional[torch.Tensor] = None  # the last weight step's verdict (device; None: unchecked)

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "epoch": self.epoch,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "arch_opt": self.method.optimizer.state_dict() if self.method.learns else None,
            "w_opt": self.w_opt.state_dict(),
            "sched": self.sched.state_dict(),
            "loader_w": self.loader_w.state_dict(),
            "loader_a": self.loader_a.state_dict(),
            "rng": rng_state(),
            "best": self.best,
            "scaler": self.prec.state_dict(),
            "sums": self.saved_sums,
        }

    def load_state_dict(self, s: Dict[str, Any]) -> None:
        self.epoch = s["epoch"]
        self.model.load_state_dict(s["model"])
        self.method.load_state_dict(s["method"])
        if self.method.learns:
            self.method.optimizer.load_state_dict(s["arch_opt"])
        self.w_opt.load_state_dict(s["w_opt"])
        for group in self.w_opt.param_groups:  # a loaded tensor lr may sit on another device
            group["lr"] = self._lr(float(group["lr"]))
        self.sched.load_state_dict(s["sched"])
        self.loader_w.load_state_dict(s["loader_w"])
        self.loader_a.load_state_dict(s["loader_a"])
        self.arch_iter = iter(self.loader_a)
        self.best = s.get("best")
        self.prec.load_state_dict(s.get("scaler"))
        self.sums = faults.restore_sums(s.get("sums"), self.rank, self.device)
        set_rng_state(s["rng"])
        self._arch_opt_for_graphs()  # a loaded optimizer state brings its own flags and lr

    def _lr(self, lr: float):
        return torch.tensor(lr, device=self.device) if self.cfg.cuda_graphs else lr

    def _arch_opt_for_graphs(self) -> None:
        """--cuda-graphs with darts/pcdarts: Adam steps inside the captured step, which torch
        only allows with capturable=True (its step counter on the device) and then wants the lr
        on the device too. On the CPU (the uncaptured static-buffer path) capturable stays off,
        as torch does not support it there."""
        opt = getattr(self.method, "optimizer", None)
        if not self.cfg.cuda_graphs or not isinstance(opt, torch.optim.Adam):
            return
        on_cuda = self.device.type == "cuda"
        for group in opt.param_groups:
            group["capturable"] = on_cuda
            group["fused"] = False  # the captured step keeps capturable Adam, unchecked
            group["lr"] = self._lr(float(group["lr"]))
            for p in group["params"]:
                state = opt.state.get(p, {})
                if on_cuda and "step" in state:  # from a checkpoint of an uncaptured run
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)

    # -- steps ------------------------------------------------------------------------
    def next_arch_batch(self):
        try:
            return next(self.arch_iter)
        except StopIteration:
            self.arch_iter = iter(self.loader_a)
            return next(self.arch_iter)

    def weights(self) -> ArchWeights:
        """The mixing weights every forward uses, pruned when --prune-below is set."""
        return prune(self.method.weights(), self.method.spec, self.cfg.prune_below)

    def arch_step(self, x, y) -> torch.Tensor:
        """One architecture step on (x, y); returns its loss (detached, without regularizer)."""
        params = self.method.params()
        with self.prec.autocast():
            loss = F.cross_entropy(self.forward(self.prec.layout(x), self.weights()), y)
        arch_loss = loss.detach()
        reg = self.method.regularizer()
        if reg is not None:
            loss = loss + reg
        grads = self.prec.grad(loss, params)  # (fp16 overflow: non-finite, skipped in arch_update)
        for p, g in zip(params, grads):
            p.grad = g
        dist.average_grads(params)
        if self.cfg.arch_grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.arch_grad_clip)
        self.arch_update(params)
        return arch_loss

    def arch_update(self, params, ok: Optional[torch.Tensor] = None) -> None:
        """The architecture optimizer's step, skipping non-finite gradients: EG leaves such rows
        unchanged and counts them; fused Adam skips the step whole (found_inf). Both decide on
        the device. ``ok`` False (a skipped weight step on the same batch) skips it too. The
        count goes to the epoch's log record (not under --cuda-graphs: no host reads there)."""
        opt = self.method.optimizer
        counting = self.sums is not None and not self.cfg.cuda_graphs
        if hasattr(opt, "nonfinite_rows"):  # EG: a NaN gradient leaves every row as it is
            if ok is not None:
                for p in params:
                    if p.grad is not None:
                        p.grad = torch.where(ok, p.grad, float("nan"))
            opt.step()
            if counting and opt.nonfinite_rows is not None:  # (None: no gradient at all)
                self.sums["arch_nonfinite"] += opt.nonfinite_rows.to(torch.long)
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not self.cfg.cuda_graphs and all(g.get("fused") for g in opt.param_groups):
            bad = torch.stack([torch.isfinite(g).all() for g in grads]).logical_not().any()
            faults.step_unless(opt, bad if ok is None else bad | ok.logical_not())
            if counting:
                self.sums["arch_nonfinite"] += bad
            return
        # Unfused (the captured step under --cuda-graphs; an optimizer of another kind): host checks.
        if ok is not None and not bool(ok):
            return
        if counting and not all(bool(torch.isfinite(g).all()) for g in grads):
            self.sums["arch_nonfinite"] += 1
            return
        opt.step()

    def weight_step(self, x, y, arch_too: bool = False):
        # The weight optimizer's own list: model.parameters() walks every module each step.
        params = [p for group in self.w_opt.param_groups for p in group["params"]]
        arch_params = self.method.params() if arch_too else []
        self.w_opt.zero_grad(set_to_none=True)
        weights = self.weights()
        if arch_too:
            for p in arch_params:
                p.grad = None
        else:
            weights = weights.detach()
        with self.prec.autocast():
            logits = self.forward(self.prec.layout(x), weights)
            loss = F.cross_entropy(logits, y)
        self.prec.backward(loss)
        dist.average_grads(params + arch_params)
        self.prec.unscale(self.w_opt)
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        right = (logits.argmax(1) == y).sum()
        if self.cfg.cuda_graphs:  # unchecked: the captured step stays as it was
            self.prec.step(self.w_opt)
            if arch_too:
                self.arch_update(arch_params)
            return loss.detach().float(), right
        # A non-finite loss or gradient skips the step, decided on the device (the gradients
        # were averaged, so every rank sees a non-finite one and skips alike); the guard counts
        # the streak there and stops a long one between steps.
        self.ok = self.guard.weight_step(self.w_opt, self.prec, norm, loss, self.world)
        if arch_too:
            self.arch_update(arch_params, self.ok)
        return loss.detach().float(), right

    def step(self, same: bool, x, y, xa=None, ya=None):
        """One search step: the architecture step on (xa, ya) if given, then the weight step
        (which also steps the architecture when `same`); replayed from a CUDA graph with
        --cuda-graphs."""
        if not self.cfg.cuda_graphs:
            self.buffers.take()
            arch_loss = self.arch_step(xa, ya) if xa is not None else None
            out = self.weight_step(x, y, arch_too=same)
            # A skipped step leaves the BN statistics as they were, whichever forward broke them.
            self.buffers.keep_if(self.ok if arch_loss is None else self.ok & torch.isfinite(arch_loss))
            return out
        key = (xa is not None, same)
        if key not in self.graphed:
            # A new step kind (after --arch-warmup): the old graph never runs again, so free its
            # private memory pool before the new capture takes a second one.
            for old in self.graphed.values():
                old.release()
            self.graphed.clear()
            def whole(x, y, xa=None, ya=None):
                if xa is not None:
                    self.arch_step(xa, ya)
                return self.weight_step(x, y, arch_too=same)
            self.graphed[key] = GraphedStep(whole, capture=self.device.type == "cuda")
        return self.graphed[key](*(t for t in (x, y, xa, ya) if t is not None))

    def train_epoch(self) -> Dict[str, float]:
        self.model.train()
        self.method.train()
        self.method.set_epoch(self.epoch, self.cfg.epochs)
        if self.sums is None:  # a fresh epoch (else: resumed inside it from a checkpoint)
            self.sums = epoch_sums(self.device, counts=("arch_nonfinite",))
        sums, n = self.sums, len(self.loader_w)
        bar = Progress(n, f"epoch {self.epoch + 1}/{self.cfg.epochs}", self.main)
        start = time.perf_counter() - sums["seconds"]
        images = int(sums["seen"])  # this rank's images this epoch, for the bar's rate (one read)
        arch = self.method.learns and self.epoch >= self.cfg.arch_warmup
        same = arch and self.cfg.arch_batch == "same"

        def save():
            if not self.out:  # (the same on every rank)
                return
            sums["seconds"] = time.perf_counter() - start
            self.saved_sums = faults.gather_sums(sums, self.device)  # every rank's, for rank 0 to write
            self.save_checkpoint()

        for x, y in self.loader_w:
            batch = (x, y, *self.next_arch_batch()) if arch and not same else (x, y)
            loss, right = self.step(same, *batch)
            add_step(sums, self.ok, loss * len(y), right, len(y))
            images += len(y)
            # The loss is read from the device only when the bar redraws (a few times a second).
            bar.update(1, loss=lambda: running_loss(sums),
                       img_s=self.world * images / (time.perf_counter() - start))
            self.guard.after_step(self.epoch, self.loader_w.position, n, save)
        bar.close()
        secs = time.perf_counter() - start
        self.sums = self.saved_sums = None
        total_loss, total_correct, total_seen = dist.all_reduce_sum(
            [float(sums["loss_sum"]), float(sums["correct"]), float(sums["seen"])], self.device)
        total_seen = max(1.0, total_seen)
        return {"train_loss": total_loss / total_seen, "train_acc": 100.0 * total_correct / total_seen,
                "seconds": secs, "images_per_s": total_seen / secs, "nonfinite_steps": int(sums["nonfinite"]),
                "arch_nonfinite": int(sums["arch_nonfinite"])}

    def save_checkpoint(self) -> None:
        """RUN_DIR/checkpoint.pt now; rank 0 writes it (every rank calls this at the same step)."""
        if self.main and self.out:
            rundir.save_checkpoint(os.path.join(self.out, "checkpoint.pt"), self.state_dict())

    @torch.no_grad()
    def evaluate(self, loader) -> float:
        self.model.eval()
        self.method.eval()
        right = torch.zeros((), device=self.device, dtype=torch.long)  # no host sync per batch
        seen = 0
        weights = self.weights()
        for x, y in loader:
            with self.prec.autocast():
                right += (self.forward(self.prec.layout(x), weights).argmax(1) == y).sum()
            seen += len(y)
        right, seen = dist.all_reduce_sum([float(right), seen], self.device)
        return 100.0 * right / max(1, seen)

    # -- the run ----------------------------------------------------------------------
    def genotype(self):
        """The derived cell: NB201's architecture string, a DARTS Genotype as JSON, or a
        NAS-Bench-101 cell (matrix, ops, hash) for nb1shot1-*."""
        self.method.eval()
        g = self.model.genotype(self.method.weights())
        return g if isinstance(g, (str, dict)) else genotypes.to_json(g)

    def lookup(self, genotype) -> Optional[Dict[str, Any]]:
        if self.nb101 is not None:
            return nb101_scores(self.nb101, genotype["hash"], self.model.space.best_test_error)
        return self.table.query(genotype) if self.table is not None else None

    @property
    def bench_key(self) -> str:
        return "nb101" if self.nb101 is not None else "nb201"

    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        if self.method.learns:
            stop = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, self.epoch + cfg.stop_after)
            while self.epoch < stop:
                record = self.train_epoch()
                self.sched.step()
                self.epoch += 1
                if self.loader_valid is not None:
                    record["valid_acc"] = self.evaluate(self.loader_valid)
                self.end_epoch(record)
                self.guard.after_epoch(self.epoch)
        return self.finish()

    def end_epoch(self, record: Dict[str, Any]) -> None:
        genotype = self.genotype()
        record.update(epoch=self.epoch, genotype=genotype, arch_entropy=self.method.entropy(),
                      arch_weights=self.method.to_json(), lr=float(self.w_opt.param_groups[0]["lr"]),
                      peak_mem_mb=peak_mem_mb(self.device))
        if "valid_acc" in record and (self.best is None or record["valid_acc"] > self.best["valid_acc"]):
            self.best = {"epoch": self.epoch, "valid_acc": record["valid_acc"], "genotype": genotype}
        found = self.lookup(genotype)
        if found is not None:
            record[self.bench_key] = found
        if self.main:
            bench = "".join(f" {k} {v:.2f}" for k, v in (found or {}).items() if isinstance(v, float))
            valid = f" valid {record['valid_acc']:.1f}" if "valid_acc" in record else ""
            self.echo(f"epoch {self.epoch}/{self.cfg.epochs} loss {record['train_loss']:.3f} "
                      f"acc {record['train_acc']:.1f}{valid} entropy {record['arch_entropy']:.3f} "
                      f"{record['images_per_s']:.0f} img/s {genotype_str(genotype)}{bench}")
            if self.out:
                rundir.record_epoch(self.out, record, self.state_dict())

    def close(self) -> None:
        """Stop streamed loaders' decode processes (in-memory loaders have none)."""
        for loader in (self.loader_w, self.loader_a, self.loader_valid):
            getattr(loader, "close", lambda: None)()

    def finish(self) -> Dict[str, Any]:
        final = self.genotype()
        chosen = final
        if self.cfg.select == "best-valid" and self.best is not None:
            chosen = self.best["genotype"]
        result = {
            "space": self.cfg.space, "method": self.cfg.method, "dataset": self.cfg.dataset,
            "seed": self.cfg.seed, "epochs_done": self.epoch, "complete": self.epoch >= self.cfg.epochs
            or not self.method.learns, "genotype": chosen, "final_genotype": final, "select": self.cfg.select,
            "best_valid": self.best, "arch_entropy": self.method.entropy(),
            "arch_weights": self.method.to_json(), "op_names": self.model.op_names,
        }
        found = self.lookup(chosen)
        if found is not None:
            result[self.bench_key] = found
        if self.main and self.out:
            rundir.write_json(os.path.join(self.out, "result.json"), result)
        return result


def nb101_scores(table: NB101Table, module_hash: str, best_test_error: float) -> Dict[str, Any]:
    """A cell's NAS-Bench-101 scores, in percent: mean validation and test accuracy over the
    3 repeats, and test regret, the mean test error minus the space's best (1Shot1's
    test_min_error). A hash the table lacks (not a NAS-Bench-101 cell) scores None."""
    found = table.query(module_hash)
    if found is None:
        return {"hash": module_hash, "valid_acc": None, "test_acc": None, "test_regret": None}
    return {"hash": module_hash, "valid_acc": 100.0 * found["valid_acc"], "test_acc": 100.0 * found["test_acc"],
            "test_regret": 100.0 * ((1.0 - found["test_acc"]) - best_test_error), "repeats": found["repeats"]}


def epoch_sums(device, correct_shape=(), counts=()) -> Dict[str, Any]:
    """An epoch's running sums on the device, which ``add_step`` adds to: the loss, images
    seen, correct predictions (``correct_shape``: top-1 alone, or top-1 and top-5), skipped
    steps, and further ``counts``; ``seconds`` is the host's."""
    count = dict(device=device, dtype=torch.long)
    sums = {"loss_sum": torch.zeros((), device=device), "seen": torch.zeros((), **count), "seconds": 0.0,
            "correct": torch.zeros(correct_shape, **count), "nonfinite": torch.zeros((), **count)}
    sums.update({k: torch.zeros((), **count) for k in counts})
    return sums


def running_loss(sums: Dict[str, Any]) -> float:
    """The epoch's mean loss so far: one host read."""
    return float(sums["loss_sum"] / torch.as_tensor(sums["seen"]).clamp(min=1))


def add_step(sums: Dict[str, Any], ok: Optional[torch.Tensor], loss_sum, correct, n: int) -> None:
    """Add a weight step to the epoch's running sums on the device: a skipped step (``ok``
    False) adds only to the count of non-finite steps."""
    if ok is None:
        sums["loss_sum"] += loss_sum
        sums["correct"] += correct
        sums["seen"] += n
        return
    sums["loss_sum"] += torch.where(ok, loss_sum, 0.0)
    sums["correct"] += torch.where(ok, correct, 0)
    sums["seen"] += ok * n
    sums["nonfinite"] += ok.logical_not()


def genotype_str(g) -> str:
    """One line: NB201's string as is; a NAS-Bench-101 cell as its hash and pruned ops and
    edges; a DARTS genotype as normal/reduce op@input lists."""
    if isinstance(g, str):
        return g
    if "hash" in g:
        m, ops = g["pruned_matrix"], g["pruned_ops"]
        edges = " ".join(f"{i}>{j}" for i in range(len(m)) for j in range(len(m)) if m[i][j])
        return f"nb101 {g['hash']} [{' '.join(ops[1:-1])}] [{edges}]"
    cell = lambda pairs: " ".join(f"{op}@{j}" for op, j in pairs)  # noqa: E731
    return f"normal[{cell(g['normal'])}] reduce[{cell(g['reduce'])}]"


def lr_factor(cfg: SearchConfig):
    """Linear warm-up over cfg.lr_warmup epochs, then cosine from lr to lr_min (per epoch)."""
    floor = cfg.lr_min / cfg.lr if cfg.lr > 0 else 0.0
    span = max(1, cfg.epochs - cfg.lr_warmup)

    def factor(epoch: int) -> float:
        if epoch < cfg.lr_warmup:
            return (epoch + 1) / cfg.lr_warmup
        t = min(epoch - cfg.lr_warmup, span) / span
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return factor
