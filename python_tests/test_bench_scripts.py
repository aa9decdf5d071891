"""The benchmark scripts keep working as the code they drive changes (they call the real search
and train steps): each runs end to end at toy sizes. Timings are not checked here."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_search_speed_smoke_runs_every_case(tmp_path):
    out = tmp_path / "speed.md"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "search_speed.py"), "--smoke", "--device", "cpu",
                          "--markdown-out", str(out)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    table = out.read_text()
    for case in ("nb201", "darts", "pcdarts", "gdas", "train"):
        assert f"| {case} |" in table, case


def _bench(name):
    """A bench/ script imported as a module (it imports its bench/ neighbours by plain name)."""
    import importlib

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _host_cost():
    return _bench("host_cost")


def test_host_cost_counting_rule():
    import torch

    hc = _host_cost()
    x = torch.randn(4, 4)
    with hc.OpCounter() as c:
        y = torch.empty(3)               # allocation: not counted
        z = x.view(-1)                   # view: not counted
        (z + 1).mul_(2)                   # two kernels
        y.zero_()                         # a fill is a kernel
    assert c.total() == 3, c.ops
    assert sum(c.views.values()) == 1 and sum(c.allocs.values()) == 1
    assert {name for _, name in c.ops} == {"aten.add.Tensor", "aten.mul_.Tensor", "aten.zero_.default"}


def test_host_cost_sees_the_fused_path():
    """Counting works on the real search step, and a change of path shows in the counts."""
    from dataclasses import replace
    from types import SimpleNamespace

    hc = _host_cost()
    case = replace(hc.DEFAULTS["nb201"], cells=1, channels=4, batch=2, resolution=8)
    args = SimpleNamespace(amp=None, channels_last=False)
    fused, eager = hc.count(case, True, args), hc.count(case, False, args)
    f, e = fused.by_name(), eager.by_name()
    assert sum(f[n] for n in f if n.startswith("gaea.mixed_op")) > 0
    assert not any(n.startswith("gaea.") for n in e)
    assert f["gaea.eg_update_.default"] == 1  # the fused EG step, one op for every architecture tensor
    assert fused.total() != eager.total() and fused.total("fwd") > 0 and eager.total("bwd") > 0
    # Same network, same step: the convolutions are the same on both paths.
    assert f["aten.convolution.default"] == e["aten.convolution.default"] > 0
    # Today's gaea::mixed_op_bn has a Python kernel: its body's aten ops are what count.
    if fused.descended:
        assert f["aten.native_batch_norm.default"] > 0


def test_host_cost_smoke(tmp_path):
    out = tmp_path / "host.md"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "host_cost.py"), "--smoke", "--cases", "nb201",
                          "--markdown-out", str(out)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    table = out.read_text()
    for row in ("ops dispatched per step", "host-bound step ms", "paper-size CPU step images/s", "Top ops, nb201"):
        assert row in table, row


def test_search_quality_summary_and_fair_baselines():
    """The quality table's statistics, and the baselines' equal-steps rule (bilevel epochs doubled)."""
    from types import SimpleNamespace

    sq = _bench("search_quality")
    base = {"n": 4096, "mean": 90.0, "median": 91.38, "p90": 93.26, "max": 94.37}
    rows = [dict(label="gaea", seed=s, cifar10=a, entropy=e, wall_s=w, args=[], genotype="g", threads=None, jobs=1)
            for s, a, e, w in ((0, 94.0, 0.8, 100), (1, 93.0, 0.9, 120), (2, 93.5, 1.0, 300))]
    rows.append(dict(label="darts", seed=0, cifar10=92.0, entropy=1.386, wall_s=90, args=[], genotype="h",
                     threads=1, jobs=2))
    gaea, darts = sq.summarize(rows, base)
    assert gaea["n"] == 3 and abs(gaea["mean"] - 93.5) < 1e-12 and abs(gaea["sd"] - 0.5) < 1e-12
    assert (gaea["min"], gaea["max"], gaea["wall_median"]) == (93.0, 94.0, 120)
    assert abs(gaea["beats_p90"] - 2 / 3) < 1e-12 and abs(gaea["entropy"] - 0.9) < 1e-12
    assert darts["n"] == 1 and darts["sd"] == 0.0 and darts["beats_p90"] == 0.0
    table = sq.markdown(rows, base, "t", "cmd")
    assert "| **gaea** | 3 | **93.50** ± 0.50 | 93.00 | 94.00 | 67 % | 0.900 | 120 |" in table
    assert "| darts | 0 | 92.00 | 1.386 | 90 | 1 x 2 |" in table

    args = SimpleNamespace(bilevel_epochs=12, bilevel_warmup=0, darts_lr=3e-3)
    assert sq.run_args("gaea", args) == ["--method", "gaea"]
    assert sq.run_args("gaea-bilevel", args)[-3:] == ["--bilevel", "--epochs", "12"]
    assert sq.run_args("darts", args) == ["--method", "darts", "--arch-lr", "0.003", "--epochs", "12"]
    args.bilevel_warmup = 4
    assert sq.run_args("darts", args)[-4:] == ["--epochs", "12", "--arch-warmup", "4"]
    assert sq.run_args("x=--method darts --arch-lr 1e-2", args) == ["--method", "darts", "--arch-lr", "1e-2"]
