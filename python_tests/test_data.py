"""Tests for gaea_ext.data: dataset formats, splits and subsets, the decoded-image cache,
user-facing errors, and the on-device Loader (determinism, augmentation, resume, sharding).

Everything runs offline on tiny synthetic files written to tmp_path, except
test_real_cifar10_jpeg_slow, which decodes the real 60k-image CIFAR-10 JPEG archive from
<repo>/../shared/data/ once (about 10 s; skipped when the archive is absent).
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gaea_ext.data import DATASETS, DataError, ImageSet, Loader, load, split
from gaea_ext.data import datasets as datasets_mod
from gaea_ext.data import folder as folder_mod
from gaea_ext.data.sampling import balanced_indices

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test gets its own empty decoded-image cache."""
    path = tmp_path / "gaea-cache"
    monkeypatch.setenv("GAEA_CACHE", str(path))
    return path


# --------------------------------------------------------------------------------------
# Writers of small synthetic datasets
# --------------------------------------------------------------------------------------


def random_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def dump_pickle(path: Path, obj: dict, protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def batch_dict(images: np.ndarray, labels, label_key: str, bytes_keys: bool) -> dict:
    entry = {"data": images.reshape(len(images), -1), label_key: [int(v) for v in labels]}
    return {k.encode(): v for k, v in entry.items()} if bytes_keys else entry


def write_cifar10_pickles(root: Path, train, test, *, bytes_keys: bool = False, protocol: int = 2) -> Path:
    """torchvision's layout: root/cifar-10-batches-py/data_batch_{1..5}, test_batch."""
    base = root / "cifar-10-batches-py"
    for i, idx in enumerate(np.array_split(np.arange(len(train[0])), 5), start=1):
        dump_pickle(base / f"data_batch_{i}", batch_dict(train[0][idx], train[1][idx], "labels", bytes_keys), protocol)
    dump_pickle(base / "test_batch", batch_dict(test[0], test[1], "labels", bytes_keys), protocol)
    return root


def write_image_tree(root: Path, split_name: str, images: np.ndarray, labels, classes, ext: str = "png") -> None:
    """root/<split>/<class>/<NNNN>.<ext>, file names in image order."""
    for i, (img, label) in enumerate(zip(images, labels)):
        d = root / split_name / classes[int(label)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(d / f"{i:04d}.{ext}")


def tiny_cifar10(seed: int = 0, per_class: int = 3):
    """Class-sorted train/test arrays, so ImageFolder order (class, file name) matches."""
    y_train = np.repeat(np.arange(10), per_class)
    y_test = np.arange(10)
    return (random_images(len(y_train), seed), y_train), (random_images(10, seed + 1), y_test)


def write_tar(archive: Path, src_dir: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src_dir, arcname=arcname)
    return archive


def write_imagenet16(root: Path, seed: int = 0, per_batch: int = 6):
    """NAS-Bench-201's ImageNet16 files with 1-based labels 1..200 (only 1..120 are kept)."""
    rng = np.random.default_rng(seed)
    expected = {"train": ([], []), "test": ([], [])}
    names = [("train", f"train_data_batch_{i}") for i in range(1, 11)] + [("test", "val_data")]
    for split_name, name in names:
        data = rng.integers(0, 256, (per_batch, 768), dtype=np.uint8)
        labels = rng.integers(1, 201, per_batch)
        labels[0] = 1 + (len(expected[split_name][1]) % 120)  # at least one kept image per file
        dump_pickle(root / name, {"data": data, "labels": labels.tolist(), "mean": data.mean(0)})
        keep = labels <= 120
        expected[split_name][0].append(data[keep].reshape(-1, 3, 16, 16))
        expected[split_name][1].append(labels[keep] - 1)
    return {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in expected.items()}


def make_set(n: int, num_classes: int, *, size: int = 8, flip: bool = True, ids_as_labels: bool = False) -> ImageSet:
    """Synthetic ImageSet; pixel (y, x) of every channel holds 1 + y * size + x + (image id
    in the last row's spare bits), so crops and flips can be read back from a batch."""
    images = (1 + torch.arange(size * size).view(size, size)).to(torch.uint8).expand(n, 3, size, size).clone()
    images[:, 1, 0, 0] = torch.arange(n) % 256  # image id in channel 1's corner...
    images[:, 2, 0, 0] = torch.arange(n) // 256  # ...and channel 2's
    labels = torch.arange(n) if ids_as_labels else torch.arange(n) % num_classes
    return ImageSet(images, labels, n if ids_as_labels else num_classes, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), flip, "synthetic")


def unnormalize(x: torch.Tensor, data: ImageSet) -> torch.Tensor:
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    return ((x.cpu() * std + mean) * 255).round().to(torch.uint8)


def no_decoding(*args, **kwargs):
    raise AssertionError("decoded again instead of using the cache")


def all_batches(loader, epochs: int = 1):
    return [(x.clone(), y.clone()) for _ in range(epochs) for x, y in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --------------------------------------------------------------------------------------
# digits, split, max_images
# --------------------------------------------------------------------------------------


def test_datasets_constant():
    assert DATASETS == ("digits", "cifar10", "cifar100", "imagenet16-120", "imagefolder")


def test_digits_loads_offline():
    train, test = load("digits", None), load("digits", "/ignored", "test")
    for d in (train, test):
        assert d.images.dtype == torch.uint8 and d.images.is_contiguous() and d.images.shape[1:] == (1, 16, 16)
        assert d.labels.dtype == torch.int64 and d.labels.shape == (len(d),)
        assert 0 <= int(d.labels.min()) and int(d.labels.max()) < 10
        assert d.num_classes == 10 and d.flip is False and d.name == "digits"
        assert len(d.mean) == len(d.std) == 1
    assert (len(train), len(test)) == (1438, 359)
    assert test.mean == train.mean and test.std == train.std  # test normalized with training stats
    assert 0.2 < train.mean[0] < 0.4 and 0.2 < train.std[0] < 0.5
    # stratified: every class is split 80/20 up to one image
    n_train, n_test = torch.bincount(train.labels, minlength=10), torch.bincount(test.labels, minlength=10)
    assert ((0.2 * (n_train + n_test) - n_test).abs() <= 1).all()


def test_digits_split_is_disjoint_covering_and_fixed():
    from sklearn.datasets import load_digits

    train, test = load("digits", None, resolution=8), load("digits", None, "test", resolution=8, seed=123)
    raw = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    rows = sorted(bytes(r) + bytes([int(y)]) for r, y in zip(raw.reshape(len(raw), -1), load_digits().target))
    ours = sorted(bytes(img.numpy().reshape(-1)) + bytes([int(y)])
                  for d in (train, test) for img, y in zip(d.images, d.labels))
    assert ours == rows  # every sklearn image exactly once, pixel values round(v * 255 / 16)
    again = load("digits", None, "test", resolution=8, seed=7)  # seed does not move the test set
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


def test_split_stratified_deterministic():
    data = make_set(103, 4)
    a, b = split(data, 0.5, seed=1)
    assert len(a) == 52 and len(b) == 51
    ids = lambda d: set((d.images[:, 1, 0, 0].long() + 256 * d.images[:, 2, 0, 0].long()).tolist())
    assert ids(a).isdisjoint(ids(b)) and ids(a) | ids(b) == set(range(103))
    ca, cb = torch.bincount(a.labels, minlength=4), torch.bincount(b.labels, minlength=4)
    assert ((ca - cb).abs() <= 1).all()
    a2, _ = split(data, 0.5, seed=1)
    a3, _ = split(data, 0.5, seed=2)
    assert torch.equal(a.images, a2.images) and not torch.equal(a.images, a3.images)
    small, _ = split(data, 0.3, seed=0)
    assert len(small) == 31
    with pytest.raises(ValueError):
        split(data, 1.0)


def test_max_images_is_class_balanced_and_seeded():
    full = load("digits", None)
    sub = load("digits", None, max_images=100, seed=1)
    assert len(sub) == 100 and torch.bincount(sub.labels, minlength=10).tolist() == [10] * 10
    assert sub.mean == full.mean  # stats come from the full training split
    same, other = load("digits", None, max_images=100, seed=1), load("digits", None, max_images=100, seed=2)
    assert torch.equal(same.images, sub.images) and not torch.equal(other.images, sub.images)
    assert len(load("digits", None, max_images=10**6)) == len(full)


def test_balanced_indices_with_small_classes():
    labels = torch.repeat_interleave(torch.arange(4), torch.tensor([50, 30, 5, 40]))
    idx = balanced_indices(labels, 4, 60, seed=0)
    counts = torch.bincount(labels[idx], minlength=4).tolist()
    assert sum(counts) == 60 and counts[2] == 5 and sorted(counts[:2] + counts[3:]) == [18, 18, 19]
    assert len(set(idx.tolist())) == 60


# --------------------------------------------------------------------------------------
# CIFAR formats, ImageFolder, archives, cache
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bytes_keys,protocol", [(False, 2), (True, 2), (True, 5)], ids=["py2", "py3", "proto5"])
def test_cifar10_pickles_match_imagefolder(tmp_path, bytes_keys, protocol):
    train, test = tiny_cifar10()
    write_cifar10_pickles(tmp_path / "pk", train, test, bytes_keys=bytes_keys, protocol=protocol)
    write_image_tree(tmp_path / "tree", "train", *train, CIFAR10_CLASSES)
    write_image_tree(tmp_path / "tree", "test", *test, CIFAR10_CLASSES)
    for split_name, (images, labels) in (("train", train), ("test", test)):
        from_pickles = load("cifar10", str(tmp_path / "pk"), split_name)
        from_tree = load("cifar10", str(tmp_path / "tree"), split_name)
        assert torch.equal(from_pickles.images, torch.from_numpy(images))
        assert torch.equal(from_pickles.labels, torch.from_numpy(labels))
        assert torch.equal(from_tree.images, from_pickles.images)
        assert torch.equal(from_tree.labels, from_pickles.labels)
        assert from_tree.num_classes == 10 and from_tree.mean == from_pickles.mean
    # the batches directory itself is accepted as root too
    direct = load("cifar10", tmp_path / "pk" / "cifar-10-batches-py", "test")
    assert torch.equal(direct.images, torch.from_numpy(test[0]))


def test_cifar10_constants_and_resolution(tmp_path):
    train, test = tiny_cifar10()
    root = write_cifar10_pickles(tmp_path, train, test)
    d = load("cifar10", root)
    assert d.mean == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    assert d.std == pytest.approx((63.0 / 255, 62.1 / 255, 66.7 / 255))
    assert d.flip is True
    small = load("cifar10", root, resolution=16)
    assert small.images.shape == (30, 3, 16, 16) and small.images.dtype == torch.uint8
    # antialiased downsampling of a constant image keeps the constant
    flat = (np.full((30, 3, 32, 32), 77, np.uint8), train[1])
    write_cifar10_pickles(tmp_path / "flat", flat, test)
    assert (load("cifar10", tmp_path / "flat", resolution=16).images == 77).all()


def test_cifar100_pickles(tmp_path):
    rng = np.random.default_rng(3)
    images, labels = random_images(200, 3), rng.integers(0, 100, 200)
    base = tmp_path / "cifar-100-python"
    dump_pickle(base / "train", {"data": images.reshape(200, -1), "fine_labels": labels.tolist(),
                                 "coarse_labels": (labels // 5).tolist()})
    dump_pickle(base / "test", {"data": images[:20].reshape(20, -1), "fine_labels": labels[:20].tolist()})
    d = load("cifar100", tmp_path)
    assert d.num_classes == 100 and torch.equal(d.labels, torch.from_numpy(labels))
    assert torch.equal(d.images, torch.from_numpy(images))
    assert len(load("cifar100", tmp_path, "test")) == 20


def test_imagefolder_converts_resizes_and_accepts_val(tmp_path):
    root = tmp_path / "tree"
    (root / "train" / "zebra").mkdir(parents=True)
    (root / "train" / "ant").mkdir(parents=True)
    (root / "val" / "zebra").mkdir(parents=True)
    Image.new("L", (50, 30), 200).save(root / "train" / "zebra" / "a.png")
    Image.new("RGBA", (10, 10), (10, 20, 30, 0)).save(root / "train" / "zebra" / "b.png")
    Image.new("RGB", (64, 64), (255, 0, 0)).save(root / "train" / "ant" / "c.jpg", quality=95)
    Image.new("P", (7, 9), 3).save(root / "val" / "zebra" / "d.gif")
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    (root / "train" / ".hidden").mkdir()
    train = load("imagefolder", root, resolution=12)
    assert train.images.shape == (3, 3, 12, 12) and train.num_classes == 2
    assert train.labels.tolist() == [0, 1, 1]  # ant < zebra
    assert (train.images[1] == 200).all() and train.images[2].flatten(1)[:, 0].tolist() == [10, 20, 30]
    red = train.images[0].float().mean((1, 2))
    assert red[0] > 250 and red[1] < 5 and red[2] < 5  # JPEG, approximately pure red
    test = load("imagefolder", root, "test", resolution=12)
    assert len(test) == 1 and test.labels.tolist() == [1] and test.num_classes == 2
    assert test.mean == train.mean and test.std == train.std
    assert load("imagefolder", root).images.shape[-1] == 32  # default resolution


def test_archive_loads_and_caches(tmp_path, cache_dir, monkeypatch):
    train, test = tiny_cifar10()
    write_image_tree(tmp_path / "tree", "train", *train, CIFAR10_CLASSES)
    write_image_tree(tmp_path / "tree", "test", *test, CIFAR10_CLASSES)
    archive = write_tar(tmp_path / "cifar10-png.tar.gz", tmp_path / "tree", "cifar10")  # wrapped in a folder
    first = load("cifar10", archive, "train")
    assert torch.equal(first.images, torch.from_numpy(train[0]))
    assert torch.equal(first.labels, torch.from_numpy(train[1]))
    assert len(list((cache_dir / "decoded").glob("*.pt"))) == 1

    monkeypatch.setattr(folder_mod, "decode_images", no_decoding)
    second = load("cifar10", archive, "train")  # cache hit
    assert torch.equal(second.images, first.images) and torch.equal(second.labels, first.labels)
    st = archive.stat()
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed archive is decoded again
    with pytest.raises(AssertionError, match="decoded again"):
        load("cifar10", archive, "train")


def test_directory_tree_is_cached_and_invalidated(tmp_path, monkeypatch):
    train, test = tiny_cifar10()
    root = tmp_path / "tree"
    write_image_tree(root, "train", *train, CIFAR10_CLASSES)
    first = load("imagefolder", root)
    monkeypatch.setattr(folder_mod, "decode_images", no_decoding)
    assert torch.equal(load("imagefolder", root).images, first.images)
    Image.new("RGB", (32, 32)).save(root / "train" / "cat" / "9999.png")  # new file: new key
    with pytest.raises(AssertionError, match="decoded again"):
        load("imagefolder", root)


def test_archive_of_pickles(tmp_path):
    train, test = tiny_cifar10()
    write_cifar10_pickles(tmp_path / "src", train, test)
    archive = write_tar(tmp_path / "cifar-10-python.tar.gz", tmp_path / "src" / "cifar-10-batches-py",
                        "cifar-10-batches-py")
    d = load("cifar10", archive, "test")
    assert torch.equal(d.images, torch.from_numpy(test[0]))


def test_real_cifar10_jpeg_slow(tmp_path_factory, monkeypatch):
    """The real archive: decoded once (train ~8 s, test ~4 s), then served from the cache."""
    if not SHARED_CIFAR10.is_file():
        pytest.skip(f"{SHARED_CIFAR10} not present")
    monkeypatch.setenv("GAEA_CACHE", str(tmp_path_factory.mktemp("real-cifar-cache")))
    train = load("cifar10", SHARED_CIFAR10, "train")
    test = load("cifar10", SHARED_CIFAR10, "test")
    assert (len(train), len(test)) == (50000, 10000)
    assert train.images.shape == (50000, 3, 32, 32) and train.num_classes == test.num_classes == 10
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # JPEG-re-encoded CIFAR-10: its pixel statistics are close to the CIFAR constants used
    mean = train.images[::10].double().mean((0, 2, 3)) / 255  # every class
    assert torch.allclose(mean, torch.tensor(train.mean, dtype=torch.float64), atol=0.02)
    proxy = load("cifar10", SHARED_CIFAR10, max_images=10000, seed=0)  # from the cache: fast
    assert len(proxy) == 10000 and torch.bincount(proxy.labels).tolist() == [1000] * 10


def test_imagenet16_synthetic(tmp_path):
    expected = write_imagenet16(tmp_path / "ImageNet16")
    for split_name in ("train", "test"):
        d = load("imagenet16-120", tmp_path, split_name)  # the ImageNet16 folder is found one level down
        images, labels = expected[split_name]
        assert torch.equal(d.images, torch.from_numpy(images))  # channel-major, like CIFAR
        assert torch.equal(d.labels, torch.from_numpy(labels))
        assert d.num_classes == 120 and d.images.shape[1:] == (3, 16, 16) and int(d.labels.max()) < 120
        assert d.mean == pytest.approx((122.68 / 255, 116.66 / 255, 104.01 / 255))
    assert load("imagenet16-120", tmp_path / "ImageNet16", resolution=32).images.shape[-1] == 32


def test_imagenet16_bad_files(tmp_path):
    write_imagenet16(tmp_path)
    (tmp_path / "train_data_batch_7").unlink()
    with pytest.raises(DataError, match="missing train_data_batch_7"):
        load("imagenet16-120", tmp_path)
    dump_pickle(tmp_path / "val_data", {"data": np.zeros((2, 768), np.uint8), "labels": [0, 1]})
    with pytest.raises(DataError, match="1-based"):
        load("imagenet16-120", tmp_path, "test")


# --------------------------------------------------------------------------------------
# User-facing errors
# --------------------------------------------------------------------------------------


def raises_data_error(*args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_unknown_dataset_and_split():
    msg = raises_data_error("mnist", None)
    assert "unknown dataset 'mnist'" in msg and "cifar10" in msg
    assert "unknown split 'val'" in raises_data_error("digits", None, "val")


def test_missing_directories(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    msg = raises_data_error("imagefolder", missing)
    assert str(missing) in msg and "does not exist" in msg
    monkeypatch.setattr(datasets_mod, "_torchvision_available", lambda: False)
    msg = raises_data_error("cifar10", missing)
    assert str(missing) in msg and "torchvision is not installed" in msg and "cifar-10-batches-py" in msg
    (tmp_path / "empty").mkdir()
    msg = raises_data_error("cifar100", tmp_path / "empty", download=False)
    assert "no cifar100 data" in msg and "download=False" in msg
    assert "needs root" in raises_data_error("imagenet16-120", None)


def test_empty_or_broken_imagefolder(tmp_path):
    (tmp_path / "train").mkdir()
    assert "no class folders" in raises_data_error("imagefolder", tmp_path)
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "readme.txt").write_text("x")
    assert "has no images" in raises_data_error("imagefolder", tmp_path)
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not a png at all")
    msg = raises_data_error("imagefolder", tmp_path)
    assert "cannot decode image" in msg and "broken.png" in msg
    assert "no test/ or val/ folder" in raises_data_error("imagefolder", tmp_path, "test")
    assert "expected 10 class folders" in raises_data_error("cifar10", tmp_path, download=False)


def test_corrupt_pickles(tmp_path):
    train, test = tiny_cifar10()
    base = write_cifar10_pickles(tmp_path, train, test) / "cifar-10-batches-py"
    (base / "data_batch_2").write_bytes(b"\x80\x02garbage")
    msg = raises_data_error("cifar10", tmp_path)
    assert "malformed pickle file" in msg and "data_batch_2" in msg
    (base / "data_batch_2").write_bytes(pickle.dumps({"data": os.system}))  # code, not data
    assert "refusing to load global" in raises_data_error("cifar10", tmp_path)
    dump_pickle(base / "data_batch_2", {"pixels": np.zeros((2, 3072), np.uint8)})
    assert "no 'data' or 'labels' entry" in raises_data_error("cifar10", tmp_path)
    dump_pickle(base / "data_batch_2", {"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]})
    assert "N x 3072" in raises_data_error("cifar10", tmp_path)
    (base / "test_batch").unlink()
    assert "missing test_batch" in raises_data_error("cifar10", tmp_path, "test")


def test_corrupt_archive(tmp_path):
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"\x1f\x8b this is not gzip")
    assert "cannot read archive" in raises_data_error("cifar10", bad)
    (tmp_path / "file.txt").write_text("x")
    assert "neither a directory nor a tar archive" in raises_data_error("imagefolder", tmp_path / "file.txt")


# --------------------------------------------------------------------------------------
# ImageSet
# --------------------------------------------------------------------------------------


def test_imageset_subset_and_validation():
    data = make_set(10, 3)
    sub = data.subset(torch.tensor([4, 1]))
    assert len(sub) == 2 and sub.labels.tolist() == [1, 1] and sub.mean == data.mean and sub.name == "synthetic"
    assert len(data.subset(data.labels == 0)) == 4
    assert "n=10" in repr(data) and "tensor" not in repr(data)
    with pytest.raises(ValueError):
        ImageSet(data.images.float(), data.labels, 3, data.mean, data.std, True, "x")
    with pytest.raises(ValueError):
        ImageSet(data.images, data.labels, 2, data.mean, data.std, True, "x")  # label 2 out of range
    with pytest.raises(ValueError):
        ImageSet(data.images, data.labels, 3, (0.5,), (0.2,), True, "x")


# --------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------


def test_eval_loader_is_sequential_and_normalized():
    data = load("digits", None, "test")
    loader = Loader(data, 100, train=False)
    batches = all_batches(loader)
    assert len(loader) == len(batches) == 4 and [len(y) for _, y in batches] == [100, 100, 100, 59]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (359, 1, 16, 16)
    assert torch.equal(y, data.labels)
    expected = (data.images.float() / 255 - data.mean[0]) / data.std[0]
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


def test_train_loader_shapes_and_normalization():
    data = load("digits", None)
    loader = Loader(data, 64, train=True, seed=3)
    batches = all_batches(loader)
    assert len(loader) == len(batches) == len(data) // 64
    assert all(x.shape == (64, 1, 16, 16) and y.shape == (64,) for x, y in batches)
    x = torch.cat([b[0] for b in batches])
    # crops only add black (zero) borders, so values stay in the normalized [0, 255] range
    lo, hi = (0 - data.mean[0]) / data.std[0], (1 - data.mean[0]) / data.std[0]
    assert float(x.min()) >= lo - 1e-5 and float(x.max()) <= hi + 1e-5
    assert abs(float(x.mean())) < 0.3 and 0.7 < float(x.std()) < 1.3


def test_loader_determinism_and_seeds():
    data = make_set(300, 5)
    a = all_batches(Loader(data, 32, train=True, seed=1), epochs=2)
    b = all_batches(Loader(data, 32, train=True, seed=1), epochs=2)
    c = all_batches(Loader(data, 32, train=True, seed=2), epochs=2)
    assert_same_batches(a, b)
    assert not torch.equal(a[0][0], c[0][0])
    n = len(a) // 2
    assert not torch.equal(a[0][1], a[n][1])  # epochs are shuffled differently


def _crop_candidates(image: torch.Tensor, pad: int, flip: bool):
    padded = torch.nn.functional.pad(image, (pad,) * 4)
    h, w = image.shape[-2:]
    out = {}
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            out[(dy, dx, False)] = crop
            if flip:
                out[(dy, dx, True)] = crop.flip(-1)
    return out


@pytest.mark.parametrize("flip", [True, False], ids=["flip", "digits-noflip"])
def test_augmentation_crops_and_flips(flip):
    pad = 2
    if flip:
        data = make_set(96, 96, ids_as_labels=True)
    else:  # the digits ImageSet itself, with readable pixel patterns
        digits = load("digits", None, resolution=8, max_images=96)
        data = dataclasses.replace(digits, images=make_set(96, 1).images[:, :1].clone(), labels=torch.arange(96),
                                   num_classes=96)
        assert data.flip is False
    originals = data.images
    seen = set()
    for x, y in Loader(data, 32, train=True, seed=5, pad=pad):
        for img, i in zip(unnormalize(x, data), y.tolist()):
            matches = [k for k, c in _crop_candidates(originals[i], pad, flip=True).items() if torch.equal(c, img)]
            assert len(matches) == 1, "output is not a crop (or mirrored crop) of its source image"
            seen.add(matches[0])
    assert any(k[:2] != (pad, pad) for k in seen), "never shifted"
    assert any(k[2] for k in seen) == flip  # flipped sometimes iff flip is allowed
    if flip:
        assert any(not k[2] for k in seen)


def test_eval_loader_does_not_augment():
    data = make_set(40, 4)
    x = torch.cat([b[0] for b in Loader(data, 16, train=False)])
    assert torch.equal(unnormalize(x, data), data.images)


def test_exact_resume_mid_epoch():
    data = make_set(200, 5)
    reference = all_batches(Loader(data, 16, train=True, seed=9), epochs=3)
    per_epoch = len(reference) // 3

    loader = Loader(data, 16, train=True, seed=9)
    all_batches(loader)  # epoch 0
    consumed = []
    for k, (x, y) in enumerate(loader):  # epoch 1: stop after 5 batches
        consumed.append((x.clone(), y.clone()))
        if k == 4:
            break
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["position"] == 5
    state = pickle.loads(pickle.dumps(state))  # as if from a checkpoint file

    resumed = Loader(data, 16, train=True, seed=9)
    resumed.load_state_dict(state)
    rest = all_batches(resumed)  # remainder of epoch 1
    assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["position"] == 0
    rest += all_batches(resumed)  # epoch 2
    assert_same_batches(consumed + rest, reference[per_epoch:])

    loader.set_epoch(0)
    assert_same_batches(all_batches(loader), reference[:per_epoch])


def test_exhausted_epoch_continues_with_the_next():
    data = make_set(64, 4)
    reference = all_batches(Loader(data, 16, train=True), epochs=3)
    loader = Loader(data, 16, train=True)
    for _ in zip(range(len(loader)), loader):  # takes every batch but does not close the epoch
        pass
    state = loader.state_dict()
    assert (state["epoch"], state["position"]) == (0, len(loader))
    resumed = Loader(data, 16, train=True)
    resumed.load_state_dict(state)
    assert_same_batches(all_batches(resumed), reference[len(loader):2 * len(loader)])
    assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["position"] == 0


def test_lockstep_and_darts_style_iteration():
    """zip(train, valid) gives full epochs; next(iter(valid)) per step walks the same stream."""
    train, valid = split(make_set(128, 4), 0.5)
    a, b = Loader(train, 16, train=True, seed=1), Loader(valid, 16, train=True, seed=2)
    stream_b = all_batches(Loader(valid, 16, train=True, seed=2), epochs=3)
    pairs = [[(xb.clone(), yb.clone()) for (_, _), (xb, yb) in zip(a, b)] for _ in range(3)]
    assert [len(p) for p in pairs] == [len(a)] * 3
    assert_same_batches([batch for epoch in pairs for batch in epoch], stream_b)
    c = Loader(valid, 16, train=True, seed=2)
    assert_same_batches([next(iter(c)) for _ in range(len(stream_b))], stream_b)


def test_load_state_dict_rejects_other_settings():
    data = make_set(64, 4)
    state = Loader(data, 16, train=True, seed=1).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        Loader(data, 8, train=True, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        Loader(data, 16, train=True, seed=2).load_state_dict(state)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_rank_sharding(train):
    n, world, batch = 103, 4, 5
    data = make_set(n, n, ids_as_labels=True)
    loaders = [Loader(data, batch, train=train, seed=4, rank=r, world_size=world) for r in range(world)]
    assert len({len(ld) for ld in loaders}) == 1
    shards = [torch.cat([y for _, y in ld]).tolist() for ld in loaders]
    assert len({len(s) for s in shards}) == 1
    everything = [i for s in shards for i in s]
    if train:  # drop_last: disjoint, at most world - 1 images left out, full batches
        assert len(everything) == len(set(everything)) == (n // world) // batch * batch * world
    else:  # wrap-around padding: every image covered, 104 - 103 = 1 image twice
        assert set(everything) == set(range(n)) and len(everything) == 26 * world
    assert all(len(set(s)) == len(s) for s in shards)


def test_sharded_epochs_cover_everything_over_time():
    data = make_set(10, 10, ids_as_labels=True)
    seen = set()
    ld = Loader(data, 2, train=True, rank=1, world_size=3)
    for _ in range(60):  # 2 of 10 images per epoch on this rank; which ones changes each epoch
        seen |= set(torch.cat([y for _, y in ld]).tolist())
    assert seen == set(range(10))


def test_loader_rejects_bad_settings():
    data = make_set(10, 2)
    with pytest.raises(ValueError, match="no batches"):
        Loader(data, 16, train=True)
    assert len(Loader(data, 16, train=False)) == 1
    with pytest.raises(ValueError):
        Loader(data, 4, train=True, rank=2, world_size=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_loader_matches_cpu():
    data = make_set(300, 5)
    cpu = all_batches(Loader(data, 64, train=True, seed=3), epochs=2)
    gpu = [(x.cpu(), y.cpu()) for x, y in all_batches(Loader(data, 64, train=True, seed=3, device="cuda"), 2)]
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert torch.equal(yc, yg)
        torch.testing.assert_close(xg, xc, rtol=0, atol=1e-6)
