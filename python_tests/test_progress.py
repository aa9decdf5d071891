"""The progress bar must not read device values on every step: on a GPU each read
(`float(loss_sum)`) is a host sync that stalls the launch queue. Reads happen only when the bar
redraws. On the CPU, the `aten::_local_scalar_dense` calls a TorchDispatchMode sees stand in for
the syncs."""
from __future__ import annotations

import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gaea_ext.search.loop as loop
import gaea_ext.search.progress as progress
from gaea_ext.search.config import resolve
from gaea_ext.search.loop import Search


class CountReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


class Tty(io.StringIO):
    def isatty(self):
        return True


def _epoch_reads(monkeypatch, enabled: bool, every: float):
    bars = []

    class Bar(progress.Progress):
        def __init__(self, total, desc, enabled_=True):
            super().__init__(total, desc, enabled_ and enabled, every=every)
            bars.append(self)

    monkeypatch.setattr(progress.sys, "stderr", Tty())
    monkeypatch.setattr(loop, "Progress", Bar)
    cfg = resolve(None, dict(epochs=1, channels=4, cells=1, batch_size=16, seed=3, train_images=128))
    s = Search(cfg, None, echo=lambda *a: None)
    with CountReads() as count:
        s.train_epoch()
    (bar,) = bars
    assert bar.enabled is enabled and bar.done == len(s.loader_w)
    return count.reads, bar.redraws, bar.done


def test_progress_bar_reads_device_values_only_when_it_redraws(monkeypatch):
    quiet, _, steps = _epoch_reads(monkeypatch, enabled=False, every=3600.0)
    shown, redraws, _ = _epoch_reads(monkeypatch, enabled=True, every=3600.0)
    assert steps >= 8 and redraws == 1  # only the final redraw: the epoch took well under an hour
    # One read (the running loss) per redraw, none per step: O(redraws), not O(steps).
    assert shown - quiet == redraws, (shown, quiet, redraws, steps)


def test_progress_evaluates_callable_stats_only_on_redraw(monkeypatch):
    monkeypatch.setattr(progress.sys, "stderr", Tty())
    calls = []
    bar = progress.Progress(10, "x", every=3600.0)
    for _ in range(10):
        bar.update(1, loss=lambda: calls.append(1) or 0.5, img_s=3.0)
    assert bar.redraws == 1 and len(calls) == 1
    assert "loss 0.5" in progress.sys.stderr.getvalue()
