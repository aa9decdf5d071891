"""Tests for the streaming ImageFolder path: open_folder / FolderIndex, class_subsets and their
manifest, the per-image ImageNet augmentation, and StreamLoader (shapes, normalization,
determinism across worker counts, exact resume, sharding, errors).

Everything runs on tiny JPEG/PNG trees written to tmp_path at small resolutions, except
test_real_cifar10_jpeg_stream, which opens <repo>/../shared/data/cifar10-jpeg.tar.gz (skipped
when absent) and streams one 224 px batch from 1 % class subsets.
"""
from __future__ import annotations

import json
import math
import pickle
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gaea_ext.data import (DataError, StreamLoader, class_subsets, open_folder, subset_manifest,
                           subsets_from_manifest)
from gaea_ext.data.imagenet_aug import RATIO, SCALE, center_crop_box, load_image, resized_crop_box
from gaea_ext.data.stream import IMAGENET_MEAN, IMAGENET_STD, PCDARTS_JITTER

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CLASSES = ["cat", "dog", "emu"]


def write_tree(root: Path, per_class: dict, classes=CLASSES, seed: int = 0) -> Path:
    """root/<split>/<class>/<i>.jpg with random pixels and varied sizes (some grayscale PNGs)."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
                if i % 5 == 4:
                    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").save(d / f"{i:03d}.png")
                else:
                    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i:03d}.jpg")
    return root


@pytest.fixture
def tree(tmp_path):
    return write_tree(tmp_path / "tree", {"train": 6, "val": 2})


def batches(loader, epochs: int = 1):
    return [(x.clone(), y.clone()) for _ in range(epochs) for x, y in loader]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


# --------------------------------------------------------------------------------------
# open_folder / FolderIndex
# --------------------------------------------------------------------------------------


def test_open_folder_directory_and_archive(tree, tmp_path):
    train, val = open_folder(tree, "train"), open_folder(tree, "val")
    assert train.classes == val.classes == tuple(CLASSES) and train.split == "train"
    assert len(train) == 18 and len(val) == 6
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert train.path(7) == "train/dog/001.jpg" and val.paths[0] == "val/cat/000.jpg"
    assert open_folder(tree, "test").paths == val.paths  # test asks for test/ or val/
    assert train.read(0) == (tree / "train/cat/000.jpg").read_bytes()
    sub = train.subset([13, 2])
    assert sub.paths == [train.path(13), train.path(2)] and sub.labels.tolist() == [2, 0]

    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="wrapped")  # one folder above the splits, like many archives
    a_train = open_folder(archive, "train")
    a_val = open_folder(a_train.source, "val")  # reuse the archive already read
    assert a_train.paths == ["wrapped/" + p for p in train.paths] and a_val.labels.tolist() == val.labels.tolist()
    assert a_train.read(5) == train.read(5)


def test_val_classes_follow_train(tmp_path):
    root = write_tree(tmp_path / "t", {"train": 2})
    write_tree(root, {"val": 1}, classes=["dog"])
    assert open_folder(root, "val").labels.tolist() == [1]  # dog is train class 1


def test_folder_errors(tmp_path):
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="has no images") as e:
        open_folder(tmp_path / "empty", "train")
    assert "\n" not in str(e.value) and str(tmp_path / "empty") in str(e.value)
    (tmp_path / "none" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        open_folder(tmp_path / "none", "train")
    only_train = write_tree(tmp_path / "only", {"train": 1})
    with pytest.raises(DataError, match=r"no val/ or test/ folder in .*only"):
        open_folder(only_train, "val")
    with pytest.raises(DataError, match="does not exist"):
        open_folder(tmp_path / "missing", "train")
    with pytest.raises(DataError, match="unknown split"):
        open_folder(only_train, "validation")


# --------------------------------------------------------------------------------------
# class_subsets and the manifest
# --------------------------------------------------------------------------------------


def test_class_subsets_counts_disjoint_seeded():
    labels = torch.tensor([0] * 100 + [1] * 40 + [2] * 7 + [3] * 2 + [4] * 1)[torch.randperm(150)]
    w, a = class_subsets(labels, (0.1, 0.025), seed=3)
    assert w.dtype == torch.int64 and not set(w.tolist()) & set(a.tolist())
    assert torch.bincount(labels[w], minlength=5).tolist() == [10, 4, 1, 1, 1]
    assert torch.bincount(labels[a], minlength=5).tolist() == [2, 1, 1, 1, 0]  # class 4 has one image
    again = class_subsets(labels, (0.1, 0.025), seed=3)
    assert torch.equal(again[0], w) and torch.equal(again[1], a)
    other = class_subsets(labels, (0.1, 0.025), seed=4)
    assert not torch.equal(other[0], w)
    # a class with as many images as subsets gives one to each, taken from the big quota
    x, y, z = class_subsets(torch.zeros(3, dtype=torch.int64), (0.98, 0.01, 0.01), seed=0)
    assert sorted(x.tolist() + y.tolist() + z.tolist()) == [0, 1, 2]
    halves = class_subsets(labels, (0.5, 0.5), seed=0)  # fractions summing to 1 cover everything
    assert sorted(torch.cat(halves).tolist()) == list(range(150))
    assert torch.equal(class_subsets(labels, (1.0,), seed=0)[0], torch.arange(150))


@pytest.mark.parametrize("fractions", [(0.0,), (1.5,), (0.6, 0.5), (-0.1, 0.2), ()])
def test_class_subsets_rejects_bad_fractions(fractions):
    with pytest.raises(DataError) as e:
        class_subsets(torch.zeros(10, dtype=torch.int64), fractions, seed=0)
    assert "\n" not in str(e.value)


def test_subset_manifest_roundtrip(tree):
    index = open_folder(tree, "train")
    subsets = class_subsets(index.labels, (0.5, 0.25), seed=1)
    manifest = json.loads(json.dumps(subset_manifest(index, subsets, ["weights", "arch"])))
    assert list(manifest["subsets"]) == ["weights", "arch"] and manifest["classes"] == CLASSES
    assert manifest["subsets"]["arch"] == [index.path(i) for i in subsets[1].tolist()]
    restored = subsets_from_manifest(index, manifest)
    assert all(torch.equal(r, s) for r, s in zip(restored, subsets))
    manifest["subsets"]["arch"].append("train/cat/nope.jpg")
    with pytest.raises(DataError, match="nope.jpg"):
        subsets_from_manifest(index, manifest)


# --------------------------------------------------------------------------------------
# One image: crop geometry, decode, augmentation
# --------------------------------------------------------------------------------------


def test_crop_geometry():
    # torchvision: Resize(256) of 400x300 -> 341x256, CenterCrop(224) at left 58, top 16
    left, top, right, bottom = center_crop_box(400, 300, 224)
    assert (left, top) == pytest.approx((58 * 400 / 341, 16 * 300 / 256))
    assert (right - left, bottom - top) == pytest.approx((224 * 400 / 341, 224 * 300 / 256))
    rng = random.Random(0)
    for width, height in [(500, 375), (60, 20), (20, 60), (7, 7)]:
        for _ in range(50):
            l, t, r, b = resized_crop_box(width, height, rng)
            assert 0 <= l < r <= width and 0 <= t < b <= height
            if (width, height) == (500, 375):  # no fallback needed: area and aspect in range
                assert SCALE[0] * 0.95 <= (r - l) * (b - t) / (width * height) <= 1
                assert RATIO[0] * 0.95 <= (r - l) / (b - t) <= RATIO[1] * 1.05


def test_load_image_decodes_and_augments(tree):
    data = (tree / "train/cat/001.jpg").read_bytes()
    eval_a, eval_b = load_image(data, 24, None), load_image(data, 24, None)
    assert eval_a.shape == (24, 24, 3) and eval_a.dtype == np.uint8 and np.array_equal(eval_a, eval_b)
    crop = load_image(data, 24, random.Random(5))
    assert np.array_equal(crop, load_image(data, 24, random.Random(5)))
    jittered = load_image(data, 24, random.Random(5), jitter=PCDARTS_JITTER)
    assert np.array_equal(jittered, load_image(data, 24, random.Random(5), jitter=PCDARTS_JITTER))
    assert not np.array_equal(jittered, crop)
    gray = load_image((tree / "train/cat/004.png").read_bytes(), 24, None)
    assert np.array_equal(gray[..., 0], gray[..., 2])  # grayscale converted to RGB
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    buf = __import__("io").BytesIO()
    big.save(buf, "JPEG")
    assert load_image(buf.getvalue(), 32, random.Random(1)).shape == (32, 32, 3)  # drafted decode
    with pytest.raises(DataError, match="cannot decode image x.jpg"):
        load_image(b"not a jpeg", 24, None, what="x.jpg")


# --------------------------------------------------------------------------------------
# StreamLoader
# --------------------------------------------------------------------------------------


def test_stream_shapes_and_normalization(tmp_path):
    colors = {"a": (255, 0, 0), "b": (10, 200, 30)}
    for c, rgb in colors.items():
        (tmp_path / "t/val" / c).mkdir(parents=True)
        (tmp_path / "t/train" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40 + 7 * i, 30), rgb).save(tmp_path / "t/val" / c / f"{i}.png")
            Image.new("RGB", (33, 50), rgb).save(tmp_path / "t/train" / c / f"{i}.png")
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for split, train in [("val", False), ("train", True)]:
        loader = StreamLoader(open_folder(tmp_path / "t", split), 4, train=train, resolution=12)
        assert len(loader) == (1 if train else 2) and loader.num_classes == 2
        got = batches(loader)
        x, y = got[0]
        assert x.shape == (4, 3, 12, 12) and x.dtype == torch.float32 and x.is_contiguous() and y.dtype == torch.int64
        for xb, yb in got:
            for xi, yi in zip(xb, yb):
                want = (torch.tensor(colors["ab"[yi]], dtype=torch.float32).view(3, 1, 1) / 255 - mean) / std
                torch.testing.assert_close(xi, want.expand(3, 12, 12), rtol=0, atol=1e-5)
        if not train:  # eval keeps dataset order, last batch partial
            assert torch.cat([y for _, y in got]).tolist() == [0, 0, 0, 1, 1, 1] and len(got[1][1]) == 2


def test_stream_determinism_across_workers_and_seeds(tree):
    index = open_folder(tree, "train")
    kw = dict(train=True, resolution=16, seed=7, jitter=PCDARTS_JITTER)
    in_process = batches(StreamLoader(index, 4, **kw), epochs=2)
    workers = StreamLoader(index, 4, workers=2, **kw)
    assert_same(batches(workers, epochs=2), in_process)
    workers.close()
    assert len(in_process) == 8
    assert not torch.equal(in_process[0][0], in_process[4][0])  # epochs differ
    other = batches(StreamLoader(index, 4, **{**kw, "seed": 8}))
    assert not torch.equal(other[0][0], in_process[0][0])
    evals = [batches(StreamLoader(index, 5, train=False, resolution=16, workers=w)) for w in (0, 2)]
    assert_same(*evals)
    assert torch.cat([y for _, y in evals[0]]).tolist() == index.labels.tolist()


def test_stream_resume_mid_epoch_and_darts_iteration(tree):
    index = open_folder(tree, "train")
    kw = dict(train=True, resolution=16, seed=2)
    reference = batches(StreamLoader(index, 4, **kw), epochs=3)
    loader = StreamLoader(index, 4, **kw)
    batches(loader)  # epoch 0
    consumed = []
    for k, (x, y) in enumerate(loader):
        consumed.append((x.clone(), y.clone()))
        if k == 1:
            break
    state = pickle.loads(pickle.dumps(loader.state_dict()))
    assert (state["epoch"], state["position"]) == (1, 2)
    resumed = StreamLoader(index, 4, workers=2, **kw)
    resumed.load_state_dict(state)
    rest = batches(resumed) + batches(resumed)  # rest of epoch 1, then epoch 2
    resumed.close()
    assert_same(consumed + rest, reference[4:])
    darts = StreamLoader(index, 4, workers=1, **kw)  # next(iter(...)) per step keeps one stream
    assert_same([next(iter(darts)) for _ in range(len(reference))], reference)
    assert darts.restarts == 1
    darts.set_epoch(1)  # a jump restarts the stream
    assert_same(batches(darts), reference[4:8])
    assert darts.restarts == 2
    darts.close()
    with pytest.raises(ValueError, match="resolution"):
        StreamLoader(index, 4, train=True, resolution=8, seed=2).load_state_dict(state)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_stream_sharding(tmp_path, train):
    n, world = 11, 2  # one image per class: labels are image ids
    root = write_tree(tmp_path / "ids", {"train": 1}, classes=[f"c{i:02d}" for i in range(n)])
    index = open_folder(root, "train")
    loaders = [StreamLoader(index, 2, train=train, resolution=8, seed=4, rank=r, world_size=world)
               for r in range(world)]
    assert len({len(ld) for ld in loaders}) == 1
    shards = [torch.cat([y for _, y in ld]).tolist() for ld in loaders]
    everything = shards[0] + shards[1]
    if train:  # drop_last: disjoint, 11 // 2 = 5 per rank -> 2 full batches of 2
        assert len(everything) == len(set(everything)) == 8
    else:  # wrap-around padding: every image covered, one twice
        assert set(everything) == set(range(n)) and len(everything) == 12
    assert all(len(set(s)) == len(s) for s in shards)
    if train:  # same shards as the in-memory Loader's rule
        assert shards[1] == loaders[1].shard(0)[:4].tolist()


def test_stream_errors(tree):
    index = open_folder(tree, "train")
    with pytest.raises(ValueError, match="no batches"):
        StreamLoader(index, 32, train=True)
    with pytest.raises(ValueError):
        StreamLoader(index, 4, train=True, rank=2, world_size=2)
    (tree / "train/dog/002.jpg").write_bytes(b"truncated")
    for workers in (0, 2):
        loader = StreamLoader(open_folder(tree, "train"), 18, train=False, resolution=8, workers=workers)
        with pytest.raises(DataError, match="cannot decode image .*002.jpg") as e:
            next(iter(loader))
        assert "\n" not in str(e.value)
        loader.close()


def test_real_cifar10_jpeg_stream():
    """The real archive (read into memory, ~20 MB): 1 % class subsets, one 224 px batch."""
    if not SHARED_CIFAR10.is_file():
        pytest.skip(f"{SHARED_CIFAR10} not present")
    index = open_folder(SHARED_CIFAR10, "train")
    assert len(index) == 50000 and len(index.classes) == 10
    w, a = class_subsets(index.labels, (0.01, 0.01), seed=0)
    assert torch.bincount(index.labels[w]).tolist() == [50] * 10 and not set(w.tolist()) & set(a.tolist())
    loader = StreamLoader(index.subset(w), 8, train=True, resolution=224, workers=0)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 224, 224) and y.shape == (8,) and len(loader) == 62
    assert -3 < float(x.mean()) < 3 and math.isfinite(float(x.std()))
    val = open_folder(index.source, "test")
    assert len(val) == 10000 and val.classes == index.classes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_stream_cuda_matches_cpu(tree):
    """Pinned, non-blocking copies give the CPU loader's batches on the GPU."""
    index = open_folder(tree, "train")
    cpu = batches(StreamLoader(index, 4, train=True, resolution=16, seed=1), epochs=2)
    gpu_loader = StreamLoader(index, 4, train=True, resolution=16, seed=1, device="cuda", workers=2)
    gpu = [(x.cpu(), y.cpu()) for x, y in batches(gpu_loader, epochs=2)]
    gpu_loader.close()
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert torch.equal(yc, yg)
        torch.testing.assert_close(xg, xc, rtol=0, atol=1e-6)
