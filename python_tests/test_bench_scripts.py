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


def _host_cost():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import host_cost
    finally:
        sys.path.pop(0)
    return host_cost


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
