"""NAS-Bench-1Shot1 spaces: the one-shot model, its architecture parameters, discretization to
NAS-Bench-101 cells (hand-derived per space), the presets, and `gaea search --space nb1shot1-*`
on the embedded digits, with the table path on a synthetic tfrecord."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_fused_matches_reference, run_log, run_result
from gaea_ext.benchmarks import tfrecord
from gaea_ext.benchmarks.nb101 import spec_hash
from gaea_ext.cli import main
from gaea_ext.search.config import resolve
from gaea_ext.search.methods import GAEA
from gaea_ext.spaces import NB1Shot1Network
from gaea_ext.spaces.nb1shot1 import SPACES, discretize

MP, C3, C1 = "maxpool3x3", "conv3x3-bn-relu", "conv1x1-bn-relu"
TINY = ["--epochs", "2", "--channels", "8", "--cells", "3", "--batch-size", "32", "--train-images", "192",
        "--seed", "1"]


def net(space, **kw):
    return NB1Shot1Network(space, 8, 3, 10, 3, **{"fused": True, **kw})


@pytest.mark.parametrize("space, weighted, steps", [(1, [3, 4], 4), (2, [2, 3, 4], 4), (3, [2, 3, 4, 5], 5)])
def test_arch_params_are_ops_output_and_parent_rows(space, weighted, steps):
    model = net(space)
    spec = {p.name: (p.shape, p.kind) for p in model.arch_spec()}
    expect = {"ops": ((steps, 3), "ops"), "output": ((1, steps + 1), "edges")}
    expect.update({f"inputs{n}": ((1, n), "edges") for n in weighted})
    assert spec == expect
    method = GAEA(model.arch_spec())
    out = model(torch.randn(2, 3, 16, 16), method.weights())
    assert out.shape == (2, 10)
    out.square().sum().backward()
    for p in method.params():
        assert p.grad is not None and p.grad.abs().sum() > 0, "every simplex row must reach the loss"


def test_partial_channels_and_fused_matches_reference():
    torch.manual_seed(0)
    a = net(3).double()
    torch.manual_seed(0)
    b = net(3, fused=False).double()
    conv = [m for m in a.cells[0].blocks[0].mixed.modules() if isinstance(m, torch.nn.Conv2d)][0]
    assert conv.in_channels == 8 // 4  # 1/K of the block's channels through the mixed op
    assert a.cells[0].blocks[0].mixed.pf_slots, "the bare 3x3 max-pool should run inside the fused op"
    assert_fused_matches_reference(a, b, lambda model: model.stem[0].weight)


def rows(*values):
    return torch.tensor([values], dtype=torch.float64)


def onehot(*indices):
    t = torch.full((len(indices), 3), 0.1, dtype=torch.float64)
    for r, i in enumerate(indices):
        t[r, i] = 0.8
    return t


# Hand-derived from 1Shot1's rules: argmax op per block (order maxpool, conv3x3, conv1x1),
# top-k parents (ties to the lower node), edges only where the output reaches them backwards,
# spaces 1 and 2 with the unused vertex 5 (conv1x1) before the output.
CASES = {
    1: dict(ops=onehot(1, 0, 2, 1), out=rows(.1, .1, .3, .1, .4),
            inputs={3: rows(.1, .5, .4), 4: rows(.4, .1, .1, .4)},
            matrix=[[0, 1, 1, 0, 1, 0, 0], [0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0, 1], [0, 0, 0, 0, 1, 0, 0],
                    [0, 0, 0, 0, 0, 0, 1], [0] * 7, [0] * 7],
            labels=["input", C3, MP, C1, C3, C1, "output"], kept=["input", C3, MP, C1, C3, "output"]),
    2: dict(ops=onehot(0, 2, 1, 1), out=rows(.5, 0., .2, .1, .2),
            inputs={2: rows(.7, .3), 3: rows(.2, .2, .6), 4: rows(.1, .2, .3, .4)},
            matrix=[[0, 0, 1, 1, 0, 0, 1], [0] * 7, [0, 0, 0, 1, 1, 0, 1], [0, 0, 0, 0, 1, 0, 0],
                    [0, 0, 0, 0, 0, 0, 1], [0] * 7, [0] * 7],
            labels=["input", MP, C1, C3, C3, C1, "output"], kept=["input", C1, C3, C3, "output"]),
    3: dict(ops=onehot(2, 2, 0, 1, 0), out=rows(.1, .1, .1, .1, .2, .4),
            inputs={2: rows(.3, .7), 3: rows(.5, .25, .25), 4: rows(.1, .4, .1, .4), 5: rows(.3, .1, .1, .2, .3)},
            matrix=[[0, 1, 0, 1, 0, 1, 0], [0, 0, 0, 0, 1, 0, 0], [0] * 7, [0, 0, 0, 0, 1, 0, 0],
                    [0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 1], [0] * 7],
            labels=["input", C1, C1, MP, C3, MP, "output"], kept=["input", C1, MP, C3, MP, "output"]),
}


@pytest.mark.parametrize("space", [1, 2, 3])
def test_discretization_on_hand_made_weights(space):
    case = CASES[space]
    g = discretize(SPACES[space], case["ops"], case["out"], case["inputs"])
    assert g["matrix"] == case["matrix"]
    assert g["ops"] == case["labels"]
    assert g["pruned_ops"] == case["kept"]
    assert sum(map(sum, g["matrix"])) <= 9  # NAS-Bench-101's edge limit
    assert g["hash"] == spec_hash(case["matrix"], case["labels"])
    # The same cell through the network's own weights.
    model = net(space)
    method = GAEA(model.arch_spec()).double()
    method.arch["ops"].data = case["ops"]
    method.arch["output"].data = case["out"]
    for n, r in case["inputs"].items():
        method.arch[f"inputs{n}"].data = r
    assert model.genotype(method.weights())["hash"] == g["hash"]


def test_presets_and_methods_resolve():
    cfg = resolve("paper-nb1shot1", {"space": "nb1shot1-2", "method": "gaea"})
    assert (cfg.dataset, cfg.bilevel, cfg.valid_fraction, cfg.epochs, cfg.batch_size) == ("cifar10", True, 0.5, 50, 96)
    assert (cfg.channels, cfg.cells, cfg.partial, cfg.lr, cfg.lr_min, cfg.momentum) == (16, 9, 4, 0.025, 0.001, 0.9)
    assert (cfg.weight_decay, cfg.grad_clip, cfg.arch_lr, cfg.edge_lr, cfg.arch_warmup) == (3e-4, 5.0, 0.1, 0.1, 10)
    pc = resolve("paper-nb1shot1", {"space": "nb1shot1-3", "method": "pcdarts"})
    assert (pc.space, pc.arch_lr, pc.arch_warmup, pc.partial) == ("nb1shot1-3", 3e-4, 0, 4)
    demo = resolve(None, {"space": "nb1shot1-1"})
    assert (demo.cells, demo.channels, demo.partial) == (3, 8, 4)
    with pytest.raises(ValueError, match="nb1shot1"):
        resolve("paper-nb1shot1", {"space": "darts"})
    assert resolve(None, {"method": "pcdarts"}).space == "pcdarts"  # unchanged elsewhere


@pytest.mark.parametrize("space, method", [("nb1shot1-1", "gaea"), ("nb1shot1-2", "gaea"), ("nb1shot1-3", "pcdarts")])
def test_search_logs_a_nasbench101_cell_each_epoch(tmp_path, space, method):
    out = str(tmp_path / "run")
    assert main(["search", "--space", space, "--method", method, "--out", out, *TINY]) == 0
    log = run_log(out)
    assert [r["epoch"] for r in log] == [1, 2]
    for r in log:
        g = r["genotype"]
        assert len(g["matrix"]) == 7 and g["hash"] == spec_hash(g["matrix"], g["ops"])
    res = run_result(out)
    assert res["space"] == space and res["genotype"]["hash"] == log[-1]["genotype"]["hash"]
    w = res["arch_weights"]
    assert set(w) >= {"ops", "output"} and all(abs(sum(r) - 1) < 1e-4 for r in w["output"])
    if method == "gaea":  # EG moved the simplex rows off uniform
        assert any(abs(x - 1 / 3) > 1e-4 for row in w["ops"] for x in row)


def test_search_scores_each_epoch_on_a_table(tmp_path):
    """The issue's command on digits: one run finds the cells, a table holding them is written as
    a tfrecord, and the same seeded run then logs each epoch's accuracy and regret."""
    from test_nb101 import row

    first = str(tmp_path / "first")
    args = ["search", "--space", "nb1shot1-2", *TINY]
    assert main(args + ["--out", first]) == 0
    hashes = [r["genotype"]["hash"] for r in run_log(first)]
    accs = {h: 0.90 + 0.01 * i for i, h in enumerate(dict.fromkeys(hashes))}
    path = tmp_path / "nasbench_only108.tfrecord"
    tfrecord.write_records(str(path), [row(h, 108, a - 0.005, a + d) for h, a in accs.items() for d in (-.01, 0, .01)])
    second = str(tmp_path / "second")
    assert main(args + ["--out", second, "--nb101", str(path)]) == 0
    best = SPACES[2].best_test_error
    for r, h in zip(run_log(second), hashes):
        assert r["genotype"]["hash"] == h  # same seed, same cells
        got = r["nb101"]
        assert got["hash"] == h and got["repeats"] == 3
        assert got["test_acc"] == pytest.approx(100 * accs[h])
        assert got["valid_acc"] == pytest.approx(100 * (accs[h] - 0.005))
        assert got["test_regret"] == pytest.approx(100 * ((1 - accs[h]) - best))
    assert run_result(second)["nb101"]["hash"] == hashes[-1]
    with open(tmp_path / "second" / "config.json") as f:
        assert json.load(f)["nb101"] == str(path)


def test_step_timing_script_runs(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, os.path.join(root, "bench", "nb1shot1_step.py"), "--space", "nb1shot1-3",
                          "--channels", "4", "--cells", "3", "--batch", "4", "--resolution", "8", "--steps", "1",
                          "--warmup", "0"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root), cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "nb1shot1-3 fused" in res.stdout and "median" in res.stdout
