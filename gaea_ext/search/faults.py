"""What keeps a long run safe between its steps, shared by `gaea search` and `gaea train`.

- Mid-epoch checkpoints: ``due(step)`` says when the N-th step since the start of the run
  has been taken (``--checkpoint-every N``); the loops save their whole state, the epoch's
  running sums included, so a resume continues inside the epoch.
- Preemption: SIGTERM/SIGINT only set a flag; the loop finishes its step, checkpoints and
  raises ``Preempted`` (exit status 128 + signal: 143 for SIGTERM, 130 for SIGINT). A second
  signal ends the process at once with the same status (the last checkpoint stays valid: files
  are replaced atomically). Under torchrun each step sends its flag without waiting (a CPU
  all-reduce) and the ranks act on the previous step's agreed flags, so they all stop after
  the same step, one step after the signal; at an epoch's end they agree at once.
- Non-finite values: the loops skip a weight step with a non-finite loss or gradient on the
  device (``skip_if_not``: fused SGD's ``found_inf``), and ``record(ok)`` counts the streak
  there too, so a step needs no host read. ``after_step`` reads the streak one step behind
  (so on a GPU the host never waits for the step it just launched; the same on the CPU) and
  raises ``NonFiniteError`` (exit status 3) once ``limit`` steps in a row were skipped, i.e. one
  step after the limit is reached, before any checkpoint of the bad stretch is written.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Callable, Dict, List, Optional

import torch

from gaea_ext.search import dist

NONFINITE_EXIT = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_exit(signum: int) -> int:
    """The documented exit status of a run stopped by ``signum`` (the shell's convention)."""
    return 128 + int(signum)


class Preempted(Exception):
    """The run stopped on a signal after checkpointing; ``code`` is its exit status."""

    def __init__(self, signum: int, where: str):
        self.signum, self.code = signum, signal_exit(signum)
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")


class NonFiniteError(Exception):
    code = NONFINITE_EXIT


def gather_sums(sums: Dict[str, Any], device) -> List[Dict[str, Any]]:
    """Every rank's running sums of the epoch (a collective): a mid-epoch checkpoint holds them
    all, so each rank resumes its own and the epoch's record comes out as uninterrupted."""
    keys = sorted(sums)
    parts = [sums[k].flatten().tolist() if torch.is_tensor(sums[k]) else [float(sums[k])] for k in keys]
    ranks = dist.all_gather_values([x for part in parts for x in part], device)
    result = []
    for values in ranks:
        mine, i = {}, 0
        for k, part in zip(keys, parts):
            v, chunk = sums[k], values[i:i + len(part)]
            i += len(part)
            mine[k] = (torch.tensor(chunk, dtype=v.dtype, device=v.device).reshape(v.shape) if torch.is_tensor(v)
                       else type(v)(chunk[0]))
        result.append(mine)
    return result


def restore_sums(saved, rank: int, device) -> Optional[Dict[str, Any]]:
    """This rank's running sums from a checkpoint (None: it was written at an epoch's end)."""
    if saved is None:
        return None
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in saved[rank].items()}


class Guard:
    def __init__(self, every: int, limit: int, device: torch.device):
        if every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0 (0: epoch ends only), got {every}")
        if limit < 1:
            raise ValueError(f"--max-nonfinite must be >= 1, got {limit}")
        self.every, self.limit, self.device = every, limit, device
        self.signum: Optional[int] = None  # the first stop signal received
        self._pending = None  # under torchrun: (work, flags) of the last step, still on the wire
        # Skipped (non-finite) weight steps in a row, counted on the device by record(), which
        # also copies it to one of two host slots (pinned, asynchronous on CUDA): the host reads
        # the slot of the step before, so it never waits for the step it just launched.
        self.streak = torch.zeros((), dtype=torch.long, device=device)
        cuda = device.type == "cuda"
        self._host = torch.zeros(2, dtype=torch.long)
        self._host = self._host.pin_memory() if cuda else self._host
        self._events = [torch.cuda.Event(), torch.cuda.Event()] if cuda else None
        self._slot, self._filled = 0, [False, False]
        self._old = {}

    # -- signals --------------------------------------------------------------------------
    def install(self) -> "Guard":
        """Catch SIGTERM/SIGINT (main thread only; elsewhere signals keep their handlers)."""
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._on_signal)
        return self

    def uninstall(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: no more waiting
            sys.stderr.write(f"gaea: second {signal.Signals(signum).name}, exiting now\n")
            sys.stderr.flush()
            os._exit(signal_exit(signum))
        self.signum = signum

    def stop_signal(self) -> Optional[int]:
        """The signal to stop on now, agreed by all ranks (max over ranks; waits for them)."""
        if not dist.active():
            return self.signum
        before = self._drain()
        work, flags = dist.max_async(self.signum or 0)
        work.wait()
        return self._agreed(max(before, int(flags[0])))

    def _stop_signal_lagged(self) -> Optional[int]:
        """Between steps under torchrun: this step's flag goes out without waiting for it, and
        the answer is the previous step's agreed flags, which every rank reads at this same
        step (long arrived by then: no rank waits on the device or, in effect, on the others)."""
        if not dist.active():
            return self.signum
        before = self._drain()
        self._pending = dist.max_async(self.signum or 0)
        return self._agreed(before)

    def _drain(self) -> int:
        if self._pending is None:
            return 0
        (work, flags), self._pending = self._pending, None
        work.wait()
        return int(flags[0])

    def _agreed(self, got: int) -> Optional[int]:
        if got and self.signum is None:  # a peer's signal: a signal here now ends at once
            self.signum = got
        return got or None

    # -- mid-epoch checkpoints --------------------------------------------------------------
    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def after_step(self, epoch: int, position: int, steps: int, save: Callable[[], None]) -> None:
        """Between two steps of epoch ``epoch`` (0-based; ``position`` of ``steps`` done): save
        when due or signalled, then stop if signalled. After an epoch's last step nothing
        happens here: the epoch's end checkpoints, then ``after_epoch`` stops."""
        if position >= steps:
            self._check_streak(self._streak_now())  # an epoch's end reads the host anyway
            return
        self._check_streak(self._streak_lagged())
        signum = self._stop_signal_lagged()
        if signum is not None:
            self._drain()  # nothing left on the wire
            save()
            raise Preempted(signum, f"in epoch {epoch + 1} after step {position}/{steps}")
        # No save inside a non-finite streak: the last good checkpoint stays the latest.
        if self.due(epoch * steps + position) and self._streak_now() == 0:
            save()

    def after_epoch(self, epochs_done: int) -> None:
        signum = self.stop_signal()
        if signum is not None:
            raise Preempted(signum, f"after epoch {epochs_done}")

    # -- non-finite steps -----------------------------------------------------------------
    def weight_step(self, opt: torch.optim.Optimizer, prec, norm: torch.Tensor, loss: torch.Tensor,
                    world: int) -> torch.Tensor:
        """Step ``opt`` (a ``weight_optimizer``) unless the loss or the clipped gradient's
        ``norm`` is non-finite, and count the verdict; all on the device. Returns ``ok``."""
        ok = step_ok(norm, loss, world)
        self.record(ok)
        skip_if_not(ok, opt, prec)
        return ok

    def record(self, ok: torch.Tensor) -> None:
        """Count a weight step's verdict (0-d bool tensor: applied or skipped) on the device."""
        self.streak.add_(1).mul_(ok.logical_not())
        slot = self._slot
        self._host[slot].copy_(self.streak, non_blocking=self._events is not None)
        if self._events is not None:
            self._events[slot].record()
        self._filled[slot], self._slot = True, 1 - slot

    def _streak_now(self) -> int:
        """The streak after the latest step (a host read: on CUDA it waits for that step)."""
        return int(self.streak)

    def _streak_lagged(self) -> int:
        """The streak as of the step before the latest one (0 before two steps were taken)."""
        prev = self._slot  # record() flipped _slot: the slot it did not just write
        if not self._filled[prev]:
            return 0
        if self._events is not None:
            self._events[prev].synchronize()
        return int(self._host.numpy()[prev])  # host memory: no device read

    def _check_streak(self, streak: int) -> None:
        if streak >= self.limit:
            raise NonFiniteError(f"{streak} weight steps in a row had a non-finite loss or gradient; "
                                 "stopping (the last checkpoint is intact; try a lower --lr)")


class Buffers:
    """Undo a skipped step's writes to a network's floating-point buffers (BatchNorm running
    statistics): a NaN batch would otherwise leave NaN running statistics for good (training,
    in batch-statistics mode, would not notice; evaluation would). ``take()`` before the step
    copies them into one flat tensor per device and dtype (one op), ``keep_if(ok)`` after it
    writes back either the step's values or the saved ones (cat, where, split, foreach copy),
    decided on the device. The buffers stay separate tensors (views of one flat tensor
    would share one autograd version counter, which BN's saved statistics trip over). The
    list is taken once: build this after the network's last ``.to()``."""

    def __init__(self, module: torch.nn.Module):
        groups: Dict[tuple, List[torch.Tensor]] = {}
        for b in module.buffers():
            if b.is_floating_point():
                groups.setdefault((b.device, b.dtype), []).append(b)
        # 1-d views made once (a view per buffer per step would cost a dispatch each)
        self.views = [[b.detach().view(-1) for b in g] for g in groups.values()]
        self.sizes = [[v.numel() for v in g] for g in self.views]
        self.saved: List[torch.Tensor] = []

    def take(self) -> None:
        self.saved = [torch.cat(g) for g in self.views]

    def keep_if(self, ok: torch.Tensor) -> None:
        """Keep the step's buffer values when ``ok``, else put back what ``take()`` saw."""
        with torch.no_grad():
            for views, sizes, saved in zip(self.views, self.sizes, self.saved):
                torch._foreach_copy_(views, torch.where(ok, torch.cat(views), saved).split(sizes))
        self.saved = []


def step_ok(norm: torch.Tensor, loss: torch.Tensor, world: int) -> torch.Tensor:
    """Whether a weight step may be applied, as a 0-d bool tensor on the device (no host read):
    its (rank-averaged) gradient norm is finite, and in one process its loss too (across ranks
    a non-finite loss shows in the averaged gradient; the loss alone would let ranks disagree)."""
    ok = torch.isfinite(norm)
    if world == 1:
        ok = ok & torch.isfinite(loss.detach())
    return ok


def weight_optimizer(params, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD that ``skip_if_not`` can skip on the device: the fused kernel reads ``found_inf``
    there. Momentum buffers start at zero (the first step's buf = 0.9 * 0 + g is g exactly):
    fused SGD creates them uninitialized, so a skipped first step would leave garbage in them."""
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)
    if momentum:
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return opt


def step_unless(opt: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """``opt.step()`` unless ``bad`` (0-d bool, on the device): a fused torch optimizer (SGD,
    Adam) reads it as ``found_inf`` and leaves parameters and state as they were."""
    opt.found_inf = bad.float()
    try:
        opt.step()
    finally:
        del opt.found_inf


def skip_if_not(ok: torch.Tensor, opt: torch.optim.Optimizer, prec) -> None:
    """Step ``opt`` (a ``weight_optimizer``) through ``prec``, leaving parameters and momentum
    untouched when ``ok`` is False; decided on the device. Under fp16 the GradScaler already
    hands the fused step its own found_inf (non-finite gradients), which is what fails ``ok``."""
    if prec.scaler:
        prec.step(opt)
    else:
        step_unless(opt, ok.logical_not())
