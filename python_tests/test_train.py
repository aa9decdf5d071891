"""`gaea train`: the evaluation networks, the training loop's outputs, resume, bad input."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from gaea_ext.spaces.genotypes import NAMED, GenotypeError
from gaea_ext.train.cli import add_train_parser, cmd_train, main
from gaea_ext.train.config import PRESETS, TrainError, lr_at, resolve
from gaea_ext.train.loop import cutout
from gaea_ext.train.network import NetworkCIFAR, NetworkImageNet, drop_path, param_count_m

# 3 cells (one normal, two reductions), C=4, 128 digits: a couple of seconds per epoch.
TINY = ["--genotype", "DARTS_V2", "--layers", "3", "--channels", "4", "--train-images", "128",
        "--batch-size", "32", "--seed", "3", "--device", "cpu"]


def run(args):
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="cmd"))
    return cmd_train(parser.parse_args(["train", *args]))


def read(out, name):
    with open(os.path.join(out, name)) as f:
        return [json.loads(line) for line in f] if name.endswith(".jsonl") else json.load(f)


# --- networks ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected,printed", [("DARTS_V2", 3.3, "params 3.35M"), ("PC_DARTS", 3.6, "params 3.63M")])
def test_paper_parameter_counts(capsys, name, expected, printed):
    """The papers' CIFAR-10 sizes (20 cells, C=36, auxiliary head excluded)."""
    model = NetworkCIFAR(36, 10, 20, True, NAMED[name])
    assert round(param_count_m(model), 1) == expected
    assert param_count_m(model) < sum(p.numel() for p in model.parameters()) / 1e6  # head excluded
    assert run(["--genotype", name, "--preset", "paper-cifar10", "--summary"]) == 0
    assert capsys.readouterr().out.strip().startswith(printed + " (cifar10: C=36, 20 cells, 10 classes")


def test_imagenet_mobile_parameter_count():
    """DARTS reports 4.7M for its cell in the mobile setting (14 cells, C=48, 1000 classes)."""
    assert round(param_count_m(NetworkImageNet(48, 1000, 14, True, NAMED["DARTS_V2"])), 1) == 4.7


def test_forward_shapes_auxiliary_and_drop_path():
    torch.manual_seed(0)
    for net, size in ((NetworkCIFAR(4, 7, 5, True, NAMED["PC_DARTS"]), 32),  # fixed 5x5/3 aux pool
                      (NetworkCIFAR(4, 7, 3, True, NAMED["DARTS_V2"], in_channels=1), 16),  # adaptive
                      (NetworkImageNet(8, 7, 3, True, NAMED["DARTS_V2"]), 64)):
        c = net.stem[0].in_channels if hasattr(net, "stem") else 3
        x = torch.randn(3, c, size, size)
        net.drop_path_prob = 0.5
        logits, aux = net.train()(x)
        assert logits.shape == (3, 7) and aux.shape == (3, 7)
        logits, aux = net.eval()(x)
        assert logits.shape == (3, 7) and aux is None
    no_aux = NetworkCIFAR(4, 7, 3, False, NAMED["DARTS_V2"])
    assert no_aux.train()(torch.randn(2, 3, 16, 16))[1] is None and no_aux.auxiliary_head is None

    # Drop path zeroes whole samples and rescales the survivors by 1/keep.
    h = torch.ones(2000, 2, 3, 3)
    d = drop_path(h, 0.25)
    per_sample = d.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert (per_sample == per_sample[:, :1]).all()
    assert abs(d.mean().item() - 1.0) < 0.06


def test_drop_path_skips_identity_edges():
    """With drop probability near 1, a normal cell still passes its skip_connect edges."""
    cell = NetworkCIFAR(4, 10, 3, False, NAMED["DARTS_V2"]).cells[0].train()
    s = torch.randn(2, 12, 8, 8)
    torch.manual_seed(0)
    out = cell(s, s, drop_prob=0.999999)
    assert out.abs().sum() > 0  # the Identity edges (skip_connect) survive


def test_cutout_is_seeded_and_clipped():
    x = torch.ones(4, 3, 16, 16)
    a = cutout(x, 8, torch.Generator().manual_seed(1))
    b = cutout(x, 8, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    zeros = (a[:, 0] == 0).sum(dim=(1, 2))
    assert (zeros <= 64).all() and (zeros > 0).all()
    assert torch.equal(a[:, 0] == 0, a[:, 2] == 0)  # same square in every channel


def test_schedules_and_presets():
    cifar = resolve("paper-cifar10", {})
    assert (cifar.layers, cifar.channels, cifar.epochs, cifar.batch_size, cifar.cutout) == (20, 36, 600, 96, 16)
    assert lr_at(cifar, 0) == 0.025 and lr_at(cifar, 300) == pytest.approx(0.0125) and lr_at(cifar, 599) < 1e-6
    imnet = resolve("paper-imagenet", {"epochs": 10})  # explicit flag beats the preset
    assert imnet.epochs == 10 and imnet.label_smoothing == 0.1 and imnet.resolution == 224
    assert [lr_at(imnet, e) for e in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.5])
    assert lr_at(imnet, 9) == pytest.approx(0.1)
    assert resolve(None, {}).preset == "demo" and resolve(None, {"dataset": "cifar10"}).preset is None
    assert set(PRESETS) >= {"demo", "paper-cifar10", "paper-imagenet"}


# --- training runs -----------------------------------------------------------------------

def test_short_training_writes_outputs(tmp_path):
    out = str(tmp_path / "run")
    assert run([*TINY, "--epochs", "2", "--out", out]) == 0
    cfg = read(out, "config.json")
    assert cfg["dataset"] == "digits" and cfg["preset"] == "demo" and cfg["layers"] == 3
    assert cfg["genotype_json"]["normal"][0] == ["sep_conv_3x3", 0]
    log = read(out, "log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2]
    for r in log:
        for key in ("train_loss", "train_top1", "train_top5", "test_loss", "test_top1", "test_top5", "lr",
                    "seconds", "images_per_s", "peak_mem_mb", "drop_path"):
            assert key in r, key
        assert r["images_per_s"] > 0 and 0 <= r["test_top1"] <= r["test_top5"] <= 100
    assert log[0]["drop_path"] == 0 and log[1]["drop_path"] > 0 and log[1]["lr"] < log[0]["lr"]
    res = read(out, "result.json")
    assert res["complete"] and res["epochs_done"] == 2 and res["final_test_top1"] == log[-1]["test_top1"]
    assert res["best_test_top1"] == max(r["test_top1"] for r in log)
    assert 0 < res["params_m"] < 0.1 and res["genotype"]["reduce"][0] == ["max_pool_3x3", 0]
    assert os.path.exists(os.path.join(out, "checkpoint.pt"))


def test_resume_matches_uninterrupted(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = [*TINY, "--epochs", "2", "--cutout", "4", "--drop-path", "0.3"]
    assert run([*args, "--out", full]) == 0
    assert run([*args, "--out", part, "--stop-after", "1"]) == 0
    assert not read(part, "result.json")["complete"] and len(read(part, "log.jsonl")) == 1
    assert run(["--resume", part]) == 0
    assert read(part, "result.json")["complete"]
    timing = {"seconds", "images_per_s", "peak_mem_mb"}
    strip = lambda log: [{k: v for k, v in r.items() if k not in timing} for r in log]
    assert strip(read(full, "log.jsonl")) == strip(read(part, "log.jsonl"))
    a = torch.load(os.path.join(full, "checkpoint.pt"), weights_only=False)
    b = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=False)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


@pytest.mark.parametrize("extra", [["--amp", "bf16"], ["--amp", "fp16"], ["--channels-last"]],
                         ids=["bf16", "fp16", "channels-last"])
def test_precision_and_layout_options_train(tmp_path, extra):
    out = str(tmp_path / "o")
    try:
        assert run([*TINY, "--epochs", "1", "--layers", "2", "--train-images", "64", "--out", out, *extra]) == 0
    except TrainError as e:  # fp16 autocast on CPU is torch-version dependent
        assert "fp16" in str(e) and "fp16" in extra
        return
    r = read(out, "log.jsonl")[0]
    assert torch.isfinite(torch.tensor(r["train_loss"])) and r["test_top1"] >= 0


# --- bad input ---------------------------------------------------------------------------

def test_bad_input_raises_value_errors(tmp_path):
    malformed = tmp_path / "bad.json"
    malformed.write_text("{not json")
    unknown = tmp_path / "unknown.json"
    g = json.loads(json.dumps(read_named("DARTS_V2")))
    g["normal"][0][0] = "conv_9x9"
    unknown.write_text(json.dumps(g))
    with pytest.raises(GenotypeError, match="cannot read genotype"):
        run(["--genotype", str(malformed), "--summary"])
    with pytest.raises(GenotypeError, match="conv_9x9"):
        run(["--genotype", str(unknown), "--summary"])
    with pytest.raises(GenotypeError, match="neither a built-in"):
        run(["--genotype", "NOT_A_CELL", "--summary"])
    for args, match in ((["--train-images", "0"], "train-images"), (["--epochs", "0"], "epochs"),
                        (["--drop-path", "1.0"], "drop-path"), (["--lr", "-1"], "lr"),
                        (["--label-smoothing", "1"], "label-smoothing"), (["--cutout", "-2"], "cutout")):
        with pytest.raises(TrainError, match=match):
            run(["--genotype", "DARTS_V2", *args])
    with pytest.raises(TrainError, match="--genotype is required"):
        run(["--epochs", "1"])


def read_named(name):
    from gaea_ext.spaces.genotypes import to_json
    return to_json(NAMED[name])


def test_standalone_main_prints_one_line(capsys, tmp_path):
    assert main(["train", "--genotype", "DARTS_V2", "--layers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--layers" in err[0]
    assert main(["train", "--resume", str(tmp_path / "nonexistent")]) == 2


# --- data parallel and ImageNet ----------------------------------------------------------

DDP_SCRIPT = r"""
import json, os, sys, torch, torch.distributed as dist
from gaea_ext.train.config import resolve
from gaea_ext.train.loop import Trainer
from gaea_ext.search import dist as gdist
cfg = resolve(None, dict(genotype="DARTS_V2", epochs=1, layers=2, channels=4, batch_size=16,
                         train_images=96, device="cpu"))
t = Trainer(cfg, None, echo=lambda *a: None)
t.run()
w = torch.cat([p.detach().flatten() for p in t.model.parameters()])
got = [torch.empty_like(w) for _ in range(dist.get_world_size())]
dist.all_gather(got, w)
rank, world = dist.get_rank(), dist.get_world_size()
gdist.shutdown()
# shutdown() must end the group for real: gloo threads left running at interpreter exit can
# abort the process (see gaea_ext/search/dist.py:init).
tasks = "/proc/self/task"
threads = [open(f"{tasks}/{n}/comm").read().strip() for n in os.listdir(tasks)] if os.path.isdir(tasks) else []
if rank == 0:
    print(json.dumps({"equal": all(torch.equal(got[0], g) for g in got), "world": world,
                      "gloo_threads_after_shutdown": sum("gloo" in t for t in threads)}))
"""


def test_two_process_data_parallel_keeps_ranks_identical(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"equal": True, "world": 2, "gloo_threads_after_shutdown": 0}


def test_imagenet_tree_trains(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in range(2):
            d = tmp_path / "imnet" / split / f"n0{c}"
            d.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40 + 8 * i, 36), (60 * c + 10 * i, 90, 120)).save(d / f"{i}.JPEG")
    out = str(tmp_path / "run")
    assert run(["--genotype", "DARTS_V2", "--preset", "paper-imagenet", "--data", str(tmp_path / "imnet"),
                "--resolution", "32", "--layers", "2", "--channels", "4", "--epochs", "1", "--batch-size", "4",
                "--warmup-epochs", "0", "--workers", "1", "--device", "cpu", "--out", out]) == 0
    assert read(out, "result.json")["complete"]
    cfg = read(out, "config.json")
    assert (cfg["label_smoothing"], cfg["lr_schedule"], cfg["weight_decay"]) == (0.1, "linear", 3e-5)


def test_paper_cifar_preset_family_trains_a_searched_cell(tmp_path):
    """search -> result.json -> train with the paper recipe's settings, shrunk to tiny sizes."""
    from gaea_ext.cli import main as gaea

    search = str(tmp_path / "search")
    assert gaea(["search", "--space", "pcdarts", "--epochs", "1", "--channels", "4", "--cells", "3",
                 "--train-images", "128", "--batch-size", "32", "--out", search]) == 0
    out = str(tmp_path / "train")
    assert gaea(["train", "--genotype", os.path.join(search, "result.json"), "--preset", "paper-cifar10",
                 "--dataset", "digits", "--epochs", "1", "--layers", "3", "--channels", "4",
                 "--train-images", "128", "--batch-size", "32", "--out", out]) == 0
    cfg = read(out, "config.json")
    assert (cfg["cutout"], cfg["auxiliary_weight"], cfg["drop_path"], cfg["grad_clip"]) == (16, 0.4, 0.3, 5.0)
    assert read(out, "result.json")["genotype"] == read(search, "result.json")["genotype"]


@pytest.mark.parametrize("content,match", [("{not json", "cannot read genotype"),
                                           ('{"normal": [["conv_9x9", 0], ["skip_connect", 1]], "normal_concat": [2], '
                                            '"reduce": [["skip_connect", 0], ["skip_connect", 1]], "reduce_concat": [2]}', "conv_9x9")])
def test_gaea_cli_bad_genotype_file_exits_2(tmp_path, content, match):
    bad = tmp_path / "g.json"
    bad.write_text(content)
    res = subprocess.run([sys.executable, "-m", "gaea_ext", "train", "--genotype", str(bad)],
                         capture_output=True, text=True)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and match in lines[0], res.stderr
