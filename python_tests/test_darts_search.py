"""DARTS-space search: supernets, PC-DARTS partial channels and edge weights, GAEA-GDAS,
genotype derivation, and `gaea search --space darts|pcdarts` end to end on tiny data."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from gaea_ext.cli import main
from gaea_ext.search.methods import DARTS, GAEA, GDAS, RandomArch
from gaea_ext.spaces import DartsNetwork, genotypes
from gaea_ext.spaces.darts_ops import PRIMITIVES
from conftest import assert_fused_matches_reference, run_log, run_result

TINY = ["--epochs", "2", "--channels", "4", "--cells", "3", "--batch-size", "32", "--train-images", "256",
        "--seed", "1"]


result, log = run_result, run_log


def net(**kw):
    kw = {"fused": True, **kw}
    return DartsNetwork(4, 3, 10, 3, **kw)


@pytest.mark.parametrize("kw", [{}, {"exclude_none": True}, {"partial": 4, "edge_weights": True},
                                {"stem": "imagenet"}], ids=["darts", "no-none", "pcdarts", "imagenet-stem"])
def test_supernet_shapes_and_spec(kw):
    torch.manual_seed(0)
    model = net(**kw)
    spec = model.arch_spec()
    n_ops = 7 if kw.get("exclude_none") else 8
    assert [p.shape for p in spec[:2]] == [(14, n_ops), (14, n_ops)]
    if kw.get("edge_weights"):
        assert [p.shape for p in spec[2:6]] == [(1, 2), (1, 3), (1, 4), (1, 5)] and len(spec) == 10
    method = GAEA(spec)
    side = 64 if kw.get("stem") == "imagenet" else 16
    out = model(torch.randn(2, 3, side, side), method.weights())
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in method.params())


def test_pcdarts_edge_only_mixes_a_quarter_of_the_channels():
    model = net(partial=4, edge_weights=True)
    edge = model.cells[0].edges[0]
    first_conv = [m for m in edge.mixed.modules() if isinstance(m, torch.nn.Conv2d)][0]
    c = model.cells[0].pre1[1].out_channels
    assert first_conv.in_channels == c // 4


@pytest.mark.parametrize("stride", [1, 2])
def test_pcdarts_channels_last_edge_mixes_in_channels_last(stride):
    """x[:, :C/K] of an NHWC tensor is dense in neither layout: the edge makes it dense once in
    x's layout, so the fused op is not pushed to NCHW (which transposed all K candidates in the
    forward and again in the backward); results equal the NCHW edge's."""
    from gaea_ext.spaces.pcdarts import PartialEdge

    torch.manual_seed(0)
    edge = PartialEdge(16, stride, PRIMITIVES, fused=True, k=4).double()
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    w = torch.softmax(torch.randn(len(PRIMITIVES), dtype=torch.float64), -1)
    ref = edge(x, w)
    edge = edge.to(memory_format=torch.channels_last)
    seen = {}
    edge.mixed.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    xl = x.to(memory_format=torch.channels_last).requires_grad_()
    out = edge(xl, w)
    assert seen["x"].shape[1] == 4 and seen["x"].is_contiguous(memory_format=torch.channels_last)
    assert seen["out"].is_contiguous(memory_format=torch.channels_last), "the mixed op fell back to NCHW"
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert xl.grad is not None and xl.grad.shape == x.shape


@pytest.mark.parametrize("space_kw", [{}, {"partial": 4, "edge_weights": True}], ids=["darts", "pcdarts"])
def test_fused_matches_reference_forward_backward(space_kw):
    torch.manual_seed(0)
    a = net(fused=True, **space_kw).double()
    torch.manual_seed(0)
    b = net(fused=False, **space_kw).double()
    assert_fused_matches_reference(a, b, lambda model: next(model.parameters()))


def test_derivation_on_hand_made_weights():
    names = list(PRIMITIVES)
    w = torch.full((14, 8), 0.01)
    # node 0 (edges 0,1): edge 1 strong sep_conv_3x3; edge 0 weaker skip_connect; none dominates edge 0
    w[0, names.index("none")] = 0.9
    w[0, names.index("skip_connect")] = 0.3
    w[1, names.index("sep_conv_3x3")] = 0.8
    # node 1 (edges 2,3,4): inputs 2 and 0 win
    w[2, names.index("max_pool_3x3")] = 0.5
    w[4, names.index("dil_conv_5x5")] = 0.7
    w[3, names.index("avg_pool_3x3")] = 0.2
    # node 2 (edges 5..8) and node 3 (edges 9..13)
    w[8, names.index("sep_conv_5x5")] = 0.6
    w[6, names.index("dil_conv_3x3")] = 0.4
    w[13, names.index("skip_connect")] = 0.9
    w[9, names.index("sep_conv_3x3")] = 0.5
    gene = genotypes.parse_cell(w, names)
    assert gene == [("sep_conv_3x3", 1), ("skip_connect", 0),
                    ("dil_conv_5x5", 2), ("max_pool_3x3", 0),
                    ("sep_conv_5x5", 3), ("dil_conv_3x3", 1),
                    ("skip_connect", 4), ("sep_conv_3x3", 0)]


def test_pcdarts_derivation_scores_ops_by_weight_times_beta():
    model = net(partial=4, edge_weights=True)
    method = GAEA(model.arch_spec())
    names = model.op_names
    with torch.no_grad():
        normal = method.arch["normal"]
        normal.fill_(0.01)
        normal[0, names.index("sep_conv_3x3")] = 0.5  # node 0, input 0: higher op weight ...
        normal[1, names.index("dil_conv_3x3")] = 0.4  # ... input 1: lower
        normal[2, names.index("avg_pool_3x3")] = 0.3  # node 1, input 0
        # but beta prefers inputs 1 and 2 at node 1
        method.arch["normal_edges1"].copy_(torch.tensor([[0.1, 0.45, 0.45]]))
        normal[3, names.index("max_pool_3x3")] = 0.3
        normal[4, names.index("sep_conv_5x5")] = 0.3
    g = model.genotype(method.weights())
    assert g.normal[:2] == [("sep_conv_3x3", 0), ("dil_conv_3x3", 1)]
    assert sorted(g.normal[2:4], key=lambda p: p[1]) == [("max_pool_3x3", 1), ("sep_conv_5x5", 2)]


def test_gdas_computes_only_the_sampled_op_and_grads_reach_every_weight():
    torch.manual_seed(0)
    model = net(exclude_none=True)
    method = GDAS(model.arch_spec())
    calls = []
    for cell in model.cells:
        for edge in cell.edges:
            for op in edge.mixed.ops:
                op.register_forward_hook(lambda m, i, o: calls.append(1))
    method.train()
    w = method.weights()
    assert set(w.hard) == {"normal", "reduce"} and len(w.hard["normal"]) == 14
    for name in ("normal", "reduce"):
        onehot = torch.zeros_like(w[name]).scatter_(-1, torch.tensor(w.hard[name])[:, None], 1.0)
        torch.testing.assert_close(w[name].detach(), onehot, atol=1e-6, rtol=0)
    F.cross_entropy(model(torch.randn(2, 3, 16, 16), w), torch.tensor([1, 2])).backward()
    assert len(calls) == 14 * len(model.cells)  # one candidate per edge, not 7
    assert all(bool((p.grad != 0).all()) for p in method.params())
    method.eval()
    assert method.weights().hard is None


def test_gdas_temperature_anneals_to_tau_min_at_last_epoch():
    m = GDAS(net().arch_spec())
    m.set_epoch(0, 5)
    assert m.tau == 10.0
    m.set_epoch(4, 5)
    assert m.tau == pytest.approx(0.1)
    assert float(m.regularizer().detach()) == pytest.approx(0.0, abs=1e-7)  # uniform: KL 0


def test_random_arch_rows_on_simplex_and_random_edges():
    spec = net().arch_spec()
    gens = {str(net().genotype(RandomArch(spec, seed=s).weights())) for s in range(4)}
    assert len(gens) == 4
    w = RandomArch(spec, seed=0).weights()["normal"]
    torch.testing.assert_close(w.sum(-1), torch.ones(14))


def test_darts_baseline_is_softmax_of_logits():
    m = DARTS(net().arch_spec())
    torch.testing.assert_close(m.weights()["normal"], torch.softmax(m.arch["normal"], -1))


@pytest.mark.parametrize("extra", [
    ["--space", "darts"],
    ["--space", "pcdarts", "--bilevel", "--select", "best-valid"],
    ["--space", "darts", "--method", "gaea-gdas"],
    ["--space", "darts", "--method", "darts"],
    ["--method", "pcdarts"],
    ["--space", "darts", "--method", "random"],
    ["--space", "pcdarts", "--subsets", "0.5", "0.25", "--no-fused"],
    ["--space", "pcdarts", "--amp", "bf16", "--channels-last", "--train-images", "128"],
], ids=["gaea-darts", "gaea-pcdarts-bilevel", "gaea-gdas", "darts", "pcdarts", "random", "subsets-nofused",
                               "bf16-nhwc"])
def test_search_runs_and_writes_genotype(tmp_path, extra):
    out = str(tmp_path / "run")
    assert main(["search", *TINY, *extra, "--out", out]) == 0
    res = result(out)
    g = genotypes.from_json(res["genotype"])  # loadable by `gaea train`
    assert len(g.normal) == 8 and len(g.reduce) == 8
    assert genotypes.load(os.path.join(out, "result.json")) == g
    if "random" in extra:  # nothing to train: no epochs, the cell is drawn by seed
        assert res["complete"] and res["epochs_done"] == 0
        return
    records = log(out)
    assert [r["epoch"] for r in records] == [1, 2]
    if "best-valid" in extra:
        best = max(records, key=lambda r: r["valid_acc"])
        assert res["genotype"] == best["genotype"] and res["best_valid"]["epoch"] == best["epoch"]
    assert isinstance(res["arch_weights"], dict) and len(res["arch_weights"]["normal"]) == 14


def test_pcdarts_resume_matches_uninterrupted(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = ["search", *TINY, "--space", "pcdarts", "--bilevel"]
    assert main([*args, "--out", full]) == 0
    assert main([*args, "--out", part, "--stop-after", "1"]) == 0
    assert main(["search", "--resume", part]) == 0
    assert result(full)["arch_weights"] == result(part)["arch_weights"]
    assert result(full)["genotype"] == result(part)["genotype"]


def test_paper_presets_resolve_to_the_published_recipes():
    from gaea_ext.search.config import resolve

    c = resolve("paper-pcdarts-cifar10", {})
    assert (c.space, c.method, c.bilevel, c.epochs, c.batch_size, c.lr, c.lr_min, c.arch_lr, c.edge_lr) == \
        ("pcdarts", "gaea", True, 50, 256, 0.1, 0.0, 0.1, 0.1)
    assert (c.partial, c.channels, c.cells, c.select, c.exclude_none) == (4, 16, 8, "best-valid", False)
    i = resolve("paper-pcdarts-imagenet", {})
    assert (i.dataset, i.resolution, i.stem, i.partial, i.subsets, i.batch_size, i.lr, i.lr_warmup) == \
        ("imagenet", 224, "imagenet", 2, [0.1, 0.025], 1024, 0.5, 5)
    assert (i.arch_grad_clip, i.arch_warmup, i.epochs, i.arch_lr) == (5.0, 35, 50, 0.1)
    g = resolve(None, {"method": "gaea-gdas", "space": "darts", "dataset": "cifar10"})
    assert (g.arch_lr, g.gdas_kl, g.tau_max, g.tau_min, g.cells, g.channels) == (0.01, 0.01, 10.0, 0.1, 8, 16)


@pytest.mark.parametrize("args,match", [
    (["--subsets", "0", "0.5"], "subsets"),
    (["--subsets", "0.8", "0.5"], "subsets"),
    (["--method", "pcdarts", "--space", "nb201"], "pcdarts"),
    (["--space", "pcdarts", "--partial", "3", "--channels", "4"], "partial"),
])
def test_bad_search_input_exits_2(args, match, capsys):
    assert main(["search", *TINY, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


def _jpeg_tree(root, classes=3, per_class=12, size=40):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class if split == "train" else 2):
                pixels = (torch.rand(size, size + 8, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(d / f"{i}.jpg")
    return root


def test_imagenet_preset_streams_subsets_and_records_them(tmp_path):
    tree = _jpeg_tree(tmp_path / "imagenet")
    out = str(tmp_path / "run")
    args = ["search", "--preset", "paper-pcdarts-imagenet", "--data", str(tree), "--epochs", "2", "--batch-size", "4",
            "--resolution", "32", "--channels", "4", "--cells", "3", "--subsets", "0.5", "0.25", "--arch-warmup", "1",
            "--lr-warmup", "1", "--workers", "0", "--out", out]
    assert main(args) == 0
    manifest = json.load(open(os.path.join(out, "subsets.json")))
    w, a = manifest["subsets"]["weights"], manifest["subsets"]["arch"]
    assert len(w) == 3 * 6 and len(a) == 3 * 3 and not set(w) & set(a)
    records = log(out)
    assert records[0]["arch_entropy"] == pytest.approx(2.0794, abs=1e-3)  # arch steps start after warm-up
    assert records[1]["arch_entropy"] < records[0]["arch_entropy"]
    assert records[0]["lr"] == pytest.approx(0.5)  # warm-up epoch 1 of 1 ends at the base lr
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["stem"], cfg["partial"], cfg["arch_grad_clip"]) == ("imagenet", 2, 5.0)


def test_plot_darts_run(tmp_path):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "p")
    assert main(["search", *TINY, "--space", "pcdarts", "--epochs", "1", "--out", out]) == 0
    assert main(["plot", out]) == 0
    for name in ("entropy.png", "arch_weights_normal.png", "arch_weights_reduce.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_pcdarts_cifar_preset_family_on_small_data(tmp_path):
    out = str(tmp_path / "run")
    args = ["search", "--preset", "paper-pcdarts-cifar10", "--dataset", "digits", *TINY, "--out", out]
    assert main(args) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["space"], cfg["bilevel"], cfg["select"], cfg["lr"], cfg["partial"]) == ("pcdarts", True, "best-valid",
                                                                                        0.1, 4)
    assert result(out)["best_valid"] is not None


SHARED_JPEG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                           "cifar10-jpeg.tar.gz")


@pytest.mark.skipif(not os.path.exists(SHARED_JPEG), reason="../shared/data/cifar10-jpeg.tar.gz not present")
def test_imagenet_layout_search_at_224_on_the_shared_jpeg_tree(tmp_path):
    out = str(tmp_path / "run")
    args = ["search", "--preset", "paper-pcdarts-imagenet", "--data", SHARED_JPEG, "--epochs", "1",
            "--batch-size", "8", "--channels", "4", "--cells", "3", "--subsets", "0.002", "0.001",
            "--arch-warmup", "0", "--lr-warmup", "0", "--workers", "2", "--out", out]
    assert main(args) == 0
    manifest = json.load(open(os.path.join(out, "subsets.json")))
    assert len(manifest["subsets"]["weights"]) == 100 and len(manifest["subsets"]["arch"]) == 50
    assert json.load(open(os.path.join(out, "config.json")))["resolution"] == 224
    assert log(out)[0]["arch_entropy"] < math.log(8) - 1e-6  # the architecture moved off uniform


def test_empty_image_folder_exits_2(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / "tree" / split / "a").mkdir(parents=True)
    assert main(["search", "--dataset", "imagenet", "--data", str(tmp_path / "tree"), "--space", "pcdarts"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tree" in err[0], err
