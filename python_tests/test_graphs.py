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


# step kinds: (a separate architecture batch, architecture stepped by the weight step's batch)
@pytest.mark.parametrize("extra,kinds", [
    ({}, {(True, False)}),
    ({"bilevel": True}, {(True, False)}),
    ({"arch_batch": "same"}, {(False, True)}),
    ({"arch_warmup": 1}, {(False, False), (True, False)}),
], ids=["gaea", "bilevel", "same-batch", "arch-warmup"])
def test_static_buffer_path_trains_like_the_plain_loop(tmp_path, extra, kinds, monkeypatch):
    graphed = _search(tmp_path, "graphed", cuda_graphs=True, **extra)
    assert isinstance(graphed.w_opt.param_groups[0]["lr"], torch.Tensor)  # the lr lives on the device
    assert set(graphed.graphed) == kinds
    assert all(g.calls > 0 and g.graph is None for g in graphed.graphed.values())  # CPU: no capture
    # The same run with the step called directly, no static buffers: bit for bit the same.
    import gaea_ext.search.loop as loop

    monkeypatch.setattr(loop, "GraphedStep", lambda step, capture: step)
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


@cuda_only
@pytest.mark.parametrize("extra", [{}, {"bilevel": True}], ids=["gaea", "bilevel"])
def test_captured_search_matches_eager_cuda(tmp_path, extra):
    """On a GPU: the replayed graph trains like the eager loop (float32 tolerance: cuDNN may
    pick other algorithms inside a capture)."""
    plain = _search(tmp_path, "plain", device="cuda", **extra)
    graphed = _search(tmp_path, "graphed", device="cuda", cuda_graphs=True, **extra)
    assert all(g.graph is not None for g in graphed.graphed.values())
    torch.testing.assert_close(_arch(graphed), _arch(plain), rtol=1e-3, atol=1e-4)
