"""`gaea search` end to end: methods, outputs, resume, multi-process, table lookup, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gaea_ext.cli import main
from conftest import run_log, run_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "..", "shared", "data", "nb201-test-accuracy.csv")
needs_table = pytest.mark.skipif(not os.path.exists(TABLE), reason="../shared/data NB201 table not present")

TINY = ["--epochs", "2", "--channels", "4", "--cells", "1", "--batch-size", "64", "--seed", "3"]


def run(args):
    return main(["search", *args])


result, log = run_result, run_log


@pytest.mark.parametrize("extra", [[], ["--bilevel"], ["--arch-batch", "same"], ["--no-fused"],
                                   ["--method", "darts"], ["--include-none"]],
                         ids=["gaea", "gaea-bilevel", "gaea-same", "gaea-nofused", "darts", "with-none"])
def test_short_search_writes_outputs(tmp_path, extra):
    out = str(tmp_path / "run")
    assert run([*TINY, "--out", out, *extra]) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["epochs"] == 2 and cfg["dataset"] == "digits"
    records = log(out)
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        for key in ("train_loss", "train_acc", "arch_entropy", "genotype", "seconds", "images_per_s", "peak_mem_mb"):
            assert key in r
        assert r["images_per_s"] > 0
    if "--bilevel" in extra or "darts" in extra:
        assert "valid_acc" in records[-1]
    res = result(out)
    assert res["genotype"].count("~") == 6 and res["complete"]
    w = torch.tensor(res["arch_weights"])
    n_ops = 5 if "--include-none" in extra else 4
    assert w.shape == (6, n_ops)
    assert torch.allclose(w.sum(-1), torch.ones(6), atol=1e-5)
    if "darts" not in extra:  # GAEA moved the weights off uniform
        assert not torch.allclose(w, torch.full_like(w, 1 / n_ops))
    assert os.path.exists(os.path.join(out, "checkpoint.pt"))


def test_gaea_weights_get_sparser_than_darts(tmp_path):
    """Exponentiated gradient moves the simplex much faster than softmax+Adam(3e-4)."""
    a, b = str(tmp_path / "gaea"), str(tmp_path / "darts")
    assert run([*TINY, "--epochs", "3", "--out", a]) == 0
    assert run([*TINY, "--epochs", "3", "--method", "darts", "--out", b]) == 0
    assert result(a)["arch_entropy"] < result(b)["arch_entropy"]


def test_fused_and_reference_paths_agree():
    """Same seed, same steps: fused kernels and --no-fused end at the same weights.

    In float64, so the comparison is about the kernels, not float32 rounding amplified by SGD.
    """
    from gaea_ext.search.methods import GAEA
    from gaea_ext.spaces import NB201Network

    torch.manual_seed(0)
    x = torch.randn(6, 16, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (6, 16))
    finals = []
    for fused in (True, False):
        torch.manual_seed(1)
        model = NB201Network(4, 1, 10, 3, exclude_none=True, fused=fused).double()
        method = GAEA(model.arch_spec(), lr=0.5, fused=fused).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for step in range(6):
            loss = torch.nn.functional.cross_entropy(model(x[step], method.weights()), y[step])
            opt.zero_grad()
            method.zero_grad()
            loss.backward()
            opt.step()
            method.optimizer.step()
        finals.append(method.arch["cell"].detach().clone())
    assert not torch.allclose(finals[0], torch.full_like(finals[0], 0.25))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-10, atol=1e-12)


def test_resume_matches_uninterrupted(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = [*TINY, "--epochs", "3"]
    assert run([*args, "--out", full]) == 0
    assert run([*args, "--out", part, "--stop-after", "1"]) == 0
    assert not result(part)["complete"] and len(log(part)) == 1
    assert main(["search", "--resume", part]) == 0
    assert result(part)["complete"]
    assert [r["epoch"] for r in log(part)] == [1, 2, 3]
    assert torch.equal(torch.tensor(result(full)["arch_weights"]), torch.tensor(result(part)["arch_weights"]))
    assert result(full)["genotype"] == result(part)["genotype"]


def test_seed_reproducible(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run([*TINY, "--out", a]) == 0
    assert run([*TINY, "--out", b]) == 0
    assert result(a)["arch_weights"] == result(b)["arch_weights"]


def test_random_method(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert run(["--method", "random", "--seed", "5", "--out", out]) == 0
    w = torch.tensor(result(out)["arch_weights"])
    assert torch.allclose(w.sum(-1), torch.ones(6)) and bool((w.max(-1).values >= 0.5).all())


@needs_table
def test_search_logs_benchmark_accuracy(tmp_path):
    out = str(tmp_path / "t")
    assert run([*TINY, "--epochs", "1", "--nb201", TABLE, "--out", out]) == 0
    rec = log(out)[0]
    assert set(rec["nb201"]) >= {"cifar10", "cifar100", "imagenet16-120", "index", "arch"}
    assert 10 < rec["nb201"]["cifar10"] < 95
    assert result(out)["nb201"]["arch"] == result(out)["genotype"]


@needs_table
def test_query_known_entries(capsys):
    best = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|"
    assert main(["query", best, "--nb201", TABLE]) == 0
    got = json.loads(capsys.readouterr().out)
    skip = "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"
    assert main(["query", skip, "--nb201", TABLE]) == 0
    got_skip = json.loads(capsys.readouterr().out)
    assert got_skip["cifar10"] == pytest.approx(54.2967, abs=1e-4)
    assert got["index"] == 6111 and got["cifar10"] == pytest.approx(94.3733, abs=1e-4)


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "p")
    assert run([*TINY, "--out", out]) == 0
    assert main(["plot", out]) == 0
    for name in ("entropy.png", "arch_weights.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# --- bad input: one line on stderr, exit status 2, no traceback ---------------------------

def _cli(args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gaea_ext", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("args,match", [
    (["search", "--dataset", "mnist"], "invalid choice"),
    (["search", "--method", "enas"], "invalid choice"),
    (["search", "--preset", "paper-cifar11"], "invalid choice"),
    (["search", "--space", "nb301"], "invalid choice"),
    (["search", "--dataset", "cifar10", "--data", "/nonexistent/dir"], "nonexistent"),
    (["search", "--epochs", "0"], "epochs"),
    (["search", "--resume", "/nonexistent/run"], "nonexistent"),
    (["query", "|bad|", "--nb201", "/nonexistent.csv"], "nonexistent"),
])
def test_bad_input_exits_2(args, match):
    res = _cli(args)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert match in lines[0]


def test_malformed_table_exits_2(tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("arch,cifar10\nnot-an-arch,12\n")
    res = _cli(["search", "--epochs", "1", "--nb201", str(bad)])
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_corrupt_checkpoint_exits_2_and_is_kept(tmp_path):
    out = str(tmp_path / "c")
    assert run([*TINY, "--epochs", "1", "--out", out]) == 0
    ckpt = os.path.join(out, "checkpoint.pt")
    with open(ckpt, "r+b") as f:
        f.seek(100)
        f.write(b"garbage!" * 8)
    before = open(ckpt, "rb").read()
    res = _cli(["search", "--resume", out])
    assert res.returncode == 2 and "corrupt checkpoint" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert open(ckpt, "rb").read() == before


def test_existing_run_dir_is_not_overwritten(tmp_path):
    out = str(tmp_path / "e")
    assert run([*TINY, "--epochs", "1", "--out", out]) == 0
    before = open(os.path.join(out, "checkpoint.pt"), "rb").read()
    res = _cli(["search", "--epochs", "1", "--out", out])
    assert res.returncode == 2 and "already holds a run" in res.stderr
    assert open(os.path.join(out, "checkpoint.pt"), "rb").read() == before


# --- data parallel ---------------------------------------------------------------------

DDP_SCRIPT = r"""
import json, os, sys, torch, torch.distributed as dist
from gaea_ext.search.config import resolve
from gaea_ext.search.loop import Search
space = sys.argv[2]
cells = 1 if space == "nb201" else 3
cfg = resolve(None, dict(epochs=2, channels=4, cells=cells, batch_size=32, seed=1, device="cpu", space=space,
                         train_images=256))
os.makedirs(sys.argv[1], exist_ok=True)
s = Search(cfg, sys.argv[1], echo=lambda *a: None)
s.run()
w = torch.cat([p.detach().flatten() for p in s.method.params()])
init = torch.cat([torch.full(p.shape, 1.0 / p.shape[-1]).flatten() for p in s.method.params()])  # uniform start
gathered = [torch.empty_like(w) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, w)
if dist.get_rank() == 0:
    print(json.dumps({"equal": all(torch.equal(gathered[0], g) for g in gathered),
                      "moved": not torch.allclose(w, init),
                      "world": dist.get_world_size()}))
from gaea_ext.search import dist as gdist
gdist.shutdown()
"""


@pytest.mark.parametrize("space", ["nb201", "pcdarts"])
def test_two_process_ddp_identical_arch_weights(tmp_path, space):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(script), str(tmp_path / "run"), space],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report == {"equal": True, "moved": True, "world": 2}
    assert len(log(str(tmp_path / "run"))) == 2  # one writer (rank 0), one line per epoch


def test_config_precedence():
    from gaea_ext.search.config import resolve

    assert resolve(None, {}).preset == "demo" and resolve(None, {}).dataset == "digits"
    assert resolve(None, {"dataset": "cifar10"}).arch_lr == 0.1  # the paper's EG step
    paper = resolve("paper-cifar10", {"epochs": 3})
    assert (paper.cells, paper.channels, paper.epochs, paper.arch_lr) == (5, 16, 3, 0.1)
    darts = resolve("cpu-proxy", {"method": "darts"})
    assert darts.arch_lr == 3e-4 and darts.bilevel  # a preset's EG lr is not Adam's lr
    assert resolve("cpu-proxy", {"method": "darts", "arch_lr": 1e-3}).arch_lr == 1e-3
    with pytest.raises(ValueError, match="unknown preset"):
        resolve("nope", {})


def test_compiled_forward_matches_eager(tmp_path):
    """--compile (aot_eager here: it traces the same graph as inductor without a C++ compile)
    ends at the same architecture weights as the eager run."""
    a, b = str(tmp_path / "eager"), str(tmp_path / "compiled")
    args = [*TINY, "--epochs", "1", "--train-images", "256"]
    assert run([*args, "--out", a]) == 0
    assert run([*args, "--compile", "aot_eager", "--out", b]) == 0
    torch.testing.assert_close(torch.tensor(result(a)["arch_weights"]), torch.tensor(result(b)["arch_weights"]),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("space", ["nb201", "pcdarts"])
def test_cli_fused_and_no_fused_end_at_the_same_weights(tmp_path, space):
    """The whole `gaea search` (same seed, CPU, float32) with the fused kernels -- mixed_op_pf on
    NB201 edges -- and with --no-fused ends at the same architecture weights up to float32 noise."""
    a, b = str(tmp_path / "fused"), str(tmp_path / "ref")
    args = [*TINY, "--epochs", "1", "--train-images", "256", "--space", space]
    if space != "nb201":
        args += ["--cells", "3"]
    assert run([*args, "--out", a]) == 0
    assert run([*args, "--no-fused", "--out", b]) == 0
    wa, wb = result(a)["arch_weights"], result(b)["arch_weights"]
    flat = lambda w: torch.tensor(w).flatten() if isinstance(w, list) else torch.cat(  # noqa: E731
        [torch.tensor(w[k]).flatten() for k in sorted(w)])
    assert not torch.allclose(flat(wa), flat(wa).mean().expand_as(flat(wa)))  # moved off uniform
    torch.testing.assert_close(flat(wa), flat(wb), rtol=1e-4, atol=1e-5)
