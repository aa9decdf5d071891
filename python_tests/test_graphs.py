"""--cuda-graphs: the captured whole-step path. Capture itself needs a GPU (the *_cuda test);
on the CPU the same static-buffer plumbing runs eagerly and must train exactly like the
ordinary loop, and the option's refusals are checked."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import cuda_only
from gaea_ext.cli import main
from gaea_ext.search.config import resolve, validate
from gaea_ext.search.graphs import GraphedStep
from gaea_ext.search.loop import Search

SMALL = dict(epochs=2, channels=4, cells=1, batch_size=32, seed=5, train_images=256)


def _search(tmp_path, name, device="cpu", **extra):
    cfg = resolve(None, dict(SMALL, device=device, **extra))
    out = str(tmp_path / name)
    os.makedirs(out)
    s = Search(cfg, out, echo=lambda *a: None)
    s.run()
    return s


def _arch(s):
    return torch.cat([p.detach().flatten().cpu() for p in s.method.params()])


DARTS_NB201 = dict(method="darts")  # softmax + Adam, on the NB201 space (quick on a CPU)
PCDARTS_SMALL = dict(method="pcdarts", cells=3)  # softmax + Adam on the partial-channel space (GPU case)


def _recording(monkeypatch):
    """Make loop.GraphedStep record every instance it creates, in order."""
    import gaea_ext.search.loop as loop

    made = []

    def make(step, capture):
        made.append(GraphedStep(step, capture=capture))
        return made[-1]

    monkeypatch.setattr(loop, "GraphedStep", make)
    return made


class Direct:
    """The step called as is: no static buffers, no capture."""

    def __init__(self, step, capture):
        self.step = step

    def __call__(self, *batch):
        return self.step(*batch)

    def release(self):
        pass


# step kinds: (a separate architecture batch, architecture stepped by the weight step's batch)
@pytest.mark.parametrize("extra,kinds", [
    ({}, [(True, False)]),
    ({"bilevel": True}, [(True, False)]),
    ({"arch_batch": "same"}, [(False, True)]),
    ({"arch_warmup": 1}, [(False, False), (True, False)]),
    (DARTS_NB201, [(True, False)]),
], ids=["gaea", "bilevel", "same-batch", "arch-warmup", "darts"])
def test_static_buffer_path_trains_like_the_plain_loop(tmp_path, extra, kinds, monkeypatch):
    made = _recording(monkeypatch)
    graphed = _search(tmp_path, "graphed", cuda_graphs=True, **extra)
    monkeypatch.undo()
    assert isinstance(graphed.w_opt.param_groups[0]["lr"], torch.Tensor)  # the lr lives on the device
    # One GraphedStep per step kind, in the order the kinds came; only the last one is kept:
    # the earlier ones were released when the kind changed (their graphs would never replay).
    assert [k for k, _ in sorted(graphed.graphed.items())] == kinds[-1:]
    assert len(made) == len(kinds) and made[-1] is graphed.graphed[kinds[-1]]
    assert all(g.released and g.static is None and g.out is None for g in made[:-1])
    assert all(g.calls > 0 and g.graph is None for g in made)  # CPU: no capture
    # The same run with the step called directly, no static buffers: bit for bit the same.
    import gaea_ext.search.loop as loop

    monkeypatch.setattr(loop, "GraphedStep", Direct)
    direct = _search(tmp_path, "direct", cuda_graphs=True, **extra)
    assert torch.equal(_arch(graphed), _arch(direct))
    for a, b in zip(graphed.model.parameters(), direct.model.parameters()):
        assert torch.equal(a, b)
    # Against the plain loop, only the learning rate's float32 rounding differs (the chaotic
    # demo EG step amplifies it over epochs): the first epoch's loss agrees closely.
    monkeypatch.undo()
    plain = _search(tmp_path, "plain", **extra)
    logs = {}
    for name in ("graphed", "plain"):
        with open(os.path.join(str(tmp_path / name), "log.jsonl")) as f:
            logs[name] = [json.loads(line) for line in f]
    assert abs(logs["graphed"][0]["train_loss"] - logs["plain"][0]["train_loss"]) < 1e-5
    lrs = [r["lr"] for r in logs["graphed"]]
    assert all(isinstance(lr, float) for lr in lrs) and lrs[0] > lrs[-1]  # the schedule reached the tensor
    assert plain.w_opt.param_groups[0]["lr"] == pytest.approx(lrs[-1])


def test_graphed_step_rejects_a_batch_of_another_shape():
    step = GraphedStep(lambda x: (x.sum(), x.mean()), capture=False)
    step(torch.ones(4, 3))
    with pytest.raises(RuntimeError, match="differs from the captured"):
        step(torch.ones(2, 3))


@pytest.mark.parametrize("extra,match", [
    (dict(method="gaea-gdas"), "does not suit gaea-gdas"),
    (dict(prune_below=0.1), "--prune-below"),
    (dict(amp="fp16"), "--amp fp16"),
    (dict(compile="aot_eager"), "--compile"),
])
def test_validate_refuses_host_side_decisions(extra, match):
    with pytest.raises(ValueError, match=match):
        validate(resolve(None, dict(SMALL, cuda_graphs=True, **extra)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_refuses_cuda_graphs_without_cuda(capsys):
    assert main(["search", "--epochs", "1", "--cuda-graphs"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_adam_is_made_capturable_for_graphs(tmp_path):
    """darts/pcdarts step Adam inside the captured step, which torch refuses unless Adam is
    capturable (a step counter on the device; we put its lr there too). capturable is a CUDA
    feature, so on the CPU's uncaptured path it stays off; a resumed run gets it back after
    loading an optimizer state saved without it."""
    s = _search(tmp_path, "run", cuda_graphs=True, **dict(DARTS_NB201, epochs=1))
    group = s.method.optimizer.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and group["lr"].device == s.device
    assert group["capturable"] is (s.device.type == "cuda")
    plain = _search(tmp_path, "plain", **dict(DARTS_NB201, epochs=1))
    assert not isinstance(plain.method.optimizer.param_groups[0]["lr"], torch.Tensor)
    s.load_state_dict(plain.state_dict())  # an uncaptured run's checkpoint
    group = s.method.optimizer.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and group["capturable"] is (s.device.type == "cuda")


# The CUDA cases below are run by `bash bench/gpu_check.sh tests`. GAEA's EG step size is the
# paper's 0.1 (the demo's 2.0 amplifies float32 rounding ~1e5-fold over two epochs); darts and
# pcdarts keep their Adam defaults.
CUDA_CASES = [({"arch_lr": 0.1}, "gaea"), ({"bilevel": True, "arch_lr": 0.1}, "bilevel"), (DARTS_NB201, "darts"),
              (PCDARTS_SMALL, "pcdarts")]


@cuda_only
@pytest.mark.parametrize("extra", [c for c, _ in CUDA_CASES], ids=[i for _, i in CUDA_CASES])
def test_captured_search_matches_uncaptured_cuda(tmp_path, extra, monkeypatch):
    """On a GPU: the replayed graph computes what the same step computes uncaptured (same fused
    SGD with its device lr, same capturable Adam, cuDNN deterministic), so the two agree to
    float32 rounding. Against the plain loop (foreach SGD, float lr) only the first epoch's
    loss is compared: the runs' arithmetic differs and the difference grows with each step."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    made = _recording(monkeypatch)
    graphed = _search(tmp_path, "graphed", device="cuda", cuda_graphs=True, **extra)
    assert made and all(g.graph is not None for g in made)
    monkeypatch.setattr(loop_module(), "GraphedStep", lambda step, capture: GraphedStep(step, capture=False))
    uncaptured = _search(tmp_path, "uncaptured", device="cuda", cuda_graphs=True, **extra)
    assert all(g.graph is None for g in uncaptured.graphed.values())
    torch.testing.assert_close(_arch(graphed), _arch(uncaptured), rtol=1e-4, atol=1e-6)
    for a, b in zip(graphed.model.parameters(), uncaptured.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    plain = _search(tmp_path, "plain", device="cuda", **extra)
    first = {n: _log(tmp_path, n)[0]["train_loss"] for n in ("graphed", "plain")}
    assert first["graphed"] == pytest.approx(first["plain"], rel=1e-3), first
    del plain


@cuda_only
def test_arch_warmup_releases_the_weights_only_graph_cuda(tmp_path, monkeypatch):
    """--arch-warmup: the weights-only graph is released (graph reset, outputs and static
    inputs dropped) before the full step is captured, so one private pool is held, not two:
    the memory the run keeps reserved is less than with release() disabled."""
    import gc

    def reserved_after(name):
        made = _recording(monkeypatch)
        s = _search(tmp_path, name, device="cuda", cuda_graphs=True, arch_warmup=1, epochs=2)
        assert len(made) == 2 and made[1].graph is not None and list(s.graphed.values()) == [made[1]]
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        held = torch.cuda.memory_reserved()
        released = made[0].released and made[0].graph is None and made[0].static is None
        del s, made
        gc.collect()
        torch.cuda.empty_cache()
        return held, released

    held, released = reserved_after("release")
    assert released
    monkeypatch.setattr(GraphedStep, "release", lambda self: None)
    held_both, released = reserved_after("keep")
    assert not released
    assert held < held_both, (held, held_both)


def loop_module():
    import gaea_ext.search.loop as loop

    return loop


def _log(tmp_path, name):
    with open(os.path.join(str(tmp_path / name), "log.jsonl")) as f:
        return [json.loads(line) for line in f]
