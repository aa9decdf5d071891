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
from conftest import cuda_only


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


def _epoch_reads(monkeypatch, enabled: bool, every: float, images: int = 128, **over):
    bars = []

    class Bar(progress.Progress):
        def __init__(self, total, desc, enabled_=True):
            super().__init__(total, desc, enabled_ and enabled, every=every)
            bars.append(self)

    monkeypatch.setattr(progress.sys, "stderr", Tty())
    monkeypatch.setattr(loop, "Progress", Bar)
    cfg = resolve(None, dict(epochs=1, channels=4, cells=1, batch_size=16, seed=3, train_images=images, **over))
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


@pytest.mark.parametrize("method,amp", [("gaea", None), ("darts", None), ("gaea", "fp16"), ("darts", "fp16")])
def test_search_steps_read_nothing_from_the_device(monkeypatch, method, amp):
    """The non-finite checks decide and count on the device (fused SGD's and fused Adam's
    found_inf, EG's row skip) and the guard reads its streak from host memory: an epoch's
    reads do not grow with its steps."""
    short, _, n_short = _epoch_reads(monkeypatch, enabled=False, every=3600.0, images=128, method=method, amp=amp)
    long, _, n_long = _epoch_reads(monkeypatch, enabled=False, every=3600.0, images=256, method=method, amp=amp)
    assert n_long == 2 * n_short and long == short, (short, long)


@pytest.mark.parametrize("amp", [None, "fp16"])
def test_train_steps_read_nothing_from_the_device(monkeypatch, amp):
    from gaea_ext.train.config import resolve as train_resolve
    from gaea_ext.train.loop import Trainer

    def reads(images):
        cfg = train_resolve(None, dict(genotype="DARTS_V2", epochs=1, layers=2, channels=4, batch_size=16,
                                       train_images=images, device="cpu", amp=amp))
        t = Trainer(cfg, None, echo=lambda *a: None)
        with CountReads() as count:
            t.train_epoch()
        return count.reads, len(t.train_loader)

    (short, n_short), (long, n_long) = reads(64), reads(128)
    assert n_long == 2 * n_short and long == short, (short, long)


@cuda_only
def test_cuda_search_and_train_steps_do_not_sync():
    """On a GPU a step launches and returns: no device-to-host read anywhere in it (the
    non-finite skip, its streak and the epoch sums stay on the device). A step's first run
    (lazy initialisation) is left out."""
    from gaea_ext.train.config import resolve as train_resolve
    from gaea_ext.train.loop import Trainer
    from gaea_ext.search.loop import add_step, epoch_sums

    s = Search(resolve(None, dict(epochs=1, channels=4, cells=1, batch_size=16, seed=3, train_images=128,
                                  device="cuda")), None, echo=lambda *a: None)
    s.model.train()
    s.method.train()
    s.sums = epoch_sums(torch.device("cuda"), counts=("arch_nonfinite",))
    batches = [[t.cuda() for t in (*b, *s.next_arch_batch())] for b, _ in zip(s.loader_w, range(3))]
    t = Trainer(train_resolve(None, dict(genotype="DARTS_V2", epochs=1, layers=2, channels=4, batch_size=16,
                                         train_images=64, device="cuda")), None, echo=lambda *a: None)
    t.model.train()
    tb = [[u.cuda() for u in b] for b, _ in zip(t.train_loader, range(3))]
    tsums = epoch_sums(torch.device("cuda"), correct_shape=(2,))
    for i, (x, y, xa, ya) in enumerate(batches):
        x2, y2 = tb[i]
        if i == 1:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss, right = s.step(False, x, y, xa, ya)
            add_step(s.sums, s.ok, loss * len(y), right, len(y))
            ok, tloss, correct = t.step(x2, y2, i)
            add_step(tsums, ok, tloss * len(y2), correct, len(y2))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert int(s.sums["seen"]) == 3 * 16 and int(s.guard.streak) == 0
