"""--prune-below: which candidates a pruned search still computes, that the fused and plain
paths compute the same pruned mixture, and the option end to end."""
from __future__ import annotations

import json
import os

import pytest
import torch

from gaea_ext.cli import main
from gaea_ext.search.prune import prune
from gaea_ext.spaces.arch import ArchParam, ArchWeights

SPEC = [ArchParam("normal", (3, 4)), ArchParam("normal_edges_2", (1, 2), kind="edges")]


def test_prune_keeps_rows_above_threshold_and_the_argmax():
    w = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.7, 0.2, 0.09, 0.01], [0.04, 0.03, 0.02, 0.91]])
    edges = torch.tensor([[0.99, 0.01]])
    got = prune(ArchWeights({"normal": w, "normal_edges_2": edges}), SPEC, 0.05)
    assert got.hard == {"normal": [None, (0, 1, 2), (3,)]}  # edge rows are never pruned
    assert got["normal"] is w
    assert prune(ArchWeights({"normal": w, "normal_edges_2": edges}), SPEC, 0.0).hard is None
    assert prune(ArchWeights({"normal": w, "normal_edges_2": edges}), SPEC, 0.01).hard is None
    # A row whose every weight is below T keeps its argmax.
    assert prune(ArchWeights({"normal": w, "normal_edges_2": edges}), SPEC, 0.95).hard == {"normal": [(0,), (0,), (3,)]}
    gdas = ArchWeights({"normal": w}, {"normal": [1, 2, 3]})
    assert prune(gdas, SPEC, 0.5) is gdas


def _edge(names, fused):
    from gaea_ext.spaces.mixed import MixedOp
    from gaea_ext.spaces.nb201 import candidate_builders

    return MixedOp(names, candidate_builders(4), fused=fused).double()


@pytest.mark.parametrize("keep", [(0, 2), (1, 3), (4,), (0,), (1, 2, 3, 4)])
def test_pruned_edge_is_the_weighted_sum_of_the_kept_ops(keep):
    names = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
    torch.manual_seed(0)
    fused, plain = _edge(names, True), _edge(names, False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    w = torch.softmax(torch.randn(5, dtype=torch.float64), 0)
    # The expected value, from the modules themselves (train-mode BN on this batch).
    ref = _edge(names, False)
    ref.load_state_dict(fused.state_dict())
    expected = sum((w[k] * ref.ops[ref.slot[k]](x) for k in keep if k in ref.slot), torch.zeros_like(x))
    results = []
    for m in (fused, plain):
        wi, xi = w.clone().requires_grad_(), x.clone().requires_grad_()
        out = m(xi, wi, keep)
        if out.requires_grad:
            out.sum().backward()
        else:  # only `none` kept: a constant zero
            assert keep == (0,)
        results.append((out, xi.grad if xi.grad is not None else torch.zeros_like(x),
                        wi.grad if wi.grad is not None else torch.zeros_like(w), m.state_dict()))
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    (oa, xa, wa, sa), (ob, xb, wb, sb) = results
    torch.testing.assert_close(xa, xb, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(wa, wb, rtol=1e-10, atol=1e-12)
    dropped = [k for k in range(5) if k not in keep]
    assert bool((wa[dropped] == 0).all())  # dropped ops get no gradient
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k])


TINY = ["--epochs", "2", "--channels", "4", "--cells", "1", "--batch-size", "64", "--seed", "3",
        "--train-images", "256"]


def test_cli_prune_below_runs_and_prunes(tmp_path):
    """The run records the option and ends with rows on the simplex."""
    out = str(tmp_path / "run")
    assert main(["search", *TINY, "--prune-below", "0.05", "--arch-lr", "3", "--out", out]) == 0
    with open(os.path.join(out, "result.json")) as f:
        res = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["prune_below"] == 0.05
    assert res["complete"]
    w = torch.tensor(res["arch_weights"])
    assert torch.allclose(w.sum(-1), torch.ones(6), atol=1e-5)


def test_pruned_search_differs_from_full_search(tmp_path):
    """A large EG lr takes rows below T within the first epoch, so the runs part ways."""
    a, b = str(tmp_path / "full"), str(tmp_path / "pruned")
    assert main(["search", *TINY, "--arch-lr", "3", "--out", a]) == 0
    assert main(["search", *TINY, "--arch-lr", "3", "--prune-below", "0.2", "--out", b]) == 0
    wa = torch.tensor(json.load(open(os.path.join(a, "result.json")))["arch_weights"])
    wb = torch.tensor(json.load(open(os.path.join(b, "result.json")))["arch_weights"])
    assert not torch.allclose(wa, wb)


@pytest.mark.parametrize("args,match", [(["--prune-below", "1.5"], "prune-below must lie in"),
                                        (["--prune-below", "0.1", "--method", "gaea-gdas"], "does not apply")])
def test_bad_prune_values(args, match, capsys):
    assert main(["search", *TINY, *args]) == 2
    assert match in capsys.readouterr().err
