"""What keeps a long run safe between its steps, shared by `gaea search` and `gaea train`.

- Mid-epoch checkpoints: ``due(step)`` says when the N-th step since the start of the run
  has been taken (``--checkpoint-every N``); the loops save their whole state, the epoch's
  running sums included, so a resume continues inside the epoch.
- Preemption: SIGTERM/SIGINT only set a flag; the loop finishes its step, checkpoints and
  raises ``Preempted`` (exit status 128 + signal: 143 for SIGTERM, 130 for SIGINT). A second
  signal ends the process at once with the same status (the last checkpoint stays valid: files
  are replaced atomically). Under torchrun the ranks agree on the flag each step, so they all
  stop after the same step.
- Non-finite values: ``admit(finite)`` counts skipped weight steps and raises
  ``NonFiniteError`` (exit status 3) after ``limit`` in a row, before any checkpoint of the
  bad stretch is written.
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
        self.streak = 0  # non-finite weight steps in a row
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
        """The signal to stop on after this step, agreed by all ranks (max over ranks)."""
        if not dist.active():
            return self.signum
        got = int(dist.all_reduce_max([self.signum or 0], self.device)[0])
        if got and self.signum is None:
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
            return
        signum = self.stop_signal()
        if signum is not None:
            save()
            raise Preempted(signum, f"in epoch {epoch + 1} after step {position}/{steps}")
        # No save inside a non-finite streak: the last good checkpoint stays the latest.
        if self.due(epoch * steps + position) and self.streak == 0:
            save()

    def after_epoch(self, epochs_done: int) -> None:
        signum = self.stop_signal()
        if signum is not None:
            raise Preempted(signum, f"after epoch {epochs_done}")

    # -- non-finite steps -----------------------------------------------------------------
    def admit(self, finite: bool) -> bool:
        """True when the step may be applied; counts a streak of skipped ones and raises
        NonFiniteError when it reaches the limit."""
        if finite:
            self.streak = 0
            return True
        self.streak += 1
        if self.streak >= self.limit:
            raise NonFiniteError(f"{self.streak} weight steps in a row had a non-finite loss or gradient; "
                                 "stopping (the last checkpoint is intact; try a lower --lr)")
        return False
