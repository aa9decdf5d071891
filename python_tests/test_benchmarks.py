"""gaea_ext.benchmarks: the NAS-Bench-201 lookup.

Tests against the real table read it from <repo>/../shared/data/ and are skipped where it is
absent (a user's checkout has no ../shared); everything else runs on small CSVs written here.
"""
from __future__ import annotations

import itertools
import random
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from gaea_ext.benchmarks import (
    EDGES,
    OPS,
    NB201Table,
    TableError,
    arch_str,
    parse_arch,
    random_arch,
    table_dataset,
)

NB201_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nb201-test-accuracy.csv"
BEST_C10 = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|"
ALL_SKIP = "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"
HEADER = "index,arch,cifar10,cifar100,imagenet16-120\n"


@pytest.fixture(scope="module")
def table():
    if not NB201_CSV.is_file():
        pytest.skip(f"NAS-Bench-201 table not found at {NB201_CSV}")
    return NB201Table.load(str(NB201_CSV))


def write(tmp_path, text, name="t.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------ arch strings


def test_arch_str_follows_edge_order():
    s = arch_str(["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3", "none"])
    assert s == "|none~0|+|skip_connect~0|nor_conv_1x1~1|+|nor_conv_3x3~0|avg_pool_3x3~1|none~2|"
    # Each op's '~j' is the source node of its edge, and nodes appear in destination order.
    tokens = [t for group in s.split("+") for t in group.strip("|").split("|")]
    assert [int(t.split("~")[1]) for t in tokens] == [j for j, _ in EDGES]


def test_round_trip_every_cell():
    for ops in itertools.product(OPS, repeat=len(EDGES)):
        assert parse_arch(arch_str(ops)) == list(ops)
    assert parse_arch(f"  {ALL_SKIP}\n") == ["skip_connect"] * 6


@pytest.mark.parametrize("bad, why", [
    ("", "3 '+'-separated nodes"),
    ("|none~0|+|none~0|none~1|", "3 '+'-separated nodes"),
    ("none~0+|none~0|none~1|+|none~0|none~1|none~2|", "node 1"),
    ("|none~0|+|none~0|+|none~0|none~1|none~2|", "node 2 must have 2 inputs"),
    ("|none~0|+|none~0|none~1|+|none~0|none~2|none~1|", "input 1 of node 3"),
    ("|none|+|none~0|none~1|+|none~0|none~1|none~2|", "input 0 of node 1"),
    ("|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|", "unknown op 'conv'"),
])
def test_parse_arch_errors(bad, why):
    with pytest.raises(TableError, match="malformed NAS-Bench-201 architecture") as e:
        parse_arch(bad)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_arch_str_errors():
    with pytest.raises(TableError, match="has 6 ops, got 5"):
        arch_str(["none"] * 5)
    with pytest.raises(TableError, match="unknown op 'sep_conv_3x3'"):
        arch_str(["none"] * 5 + ["sep_conv_3x3"])
    assert issubclass(TableError, ValueError)


@pytest.mark.parametrize("make_rng", [random.Random, lambda s: torch.Generator().manual_seed(s)],
                         ids=["random", "torch"])
def test_random_arch(make_rng):
    draws = [random_arch(make_rng(0), exclude_none=False) for _ in range(2)]
    assert draws[0] == draws[1] and len(draws[0]) == 6 and set(draws[0]) <= set(OPS)
    rng = make_rng(1)
    seen = {op for _ in range(200) for op in random_arch(rng, exclude_none=True)}
    assert seen == set(OPS) - {"none"}
    rng = make_rng(2)
    assert "none" in {op for _ in range(200) for op in random_arch(rng, exclude_none=False)}


def test_table_dataset():
    assert table_dataset("cifar10") == "cifar10"
    assert table_dataset("CIFAR100") == "cifar100"
    assert table_dataset("ImageNet16-120") == "imagenet16-120"
    assert table_dataset("imagenet") is None and table_dataset("imagefolder") is None


# ------------------------------------------------------------------------ the real table


def test_load_is_fast():
    if not NB201_CSV.is_file():
        pytest.skip(f"NAS-Bench-201 table not found at {NB201_CSV}")
    t = time.perf_counter()
    assert len(NB201Table.load(str(NB201_CSV))) == 5 ** 6
    assert time.perf_counter() - t < 1.0


def test_known_entries(table):
    assert table.datasets == ("cifar10", "cifar100", "imagenet16-120")
    assert table.query(BEST_C10)["index"] == 6111
    assert table.accuracy(BEST_C10, "cifar10") == pytest.approx(94.3733)
    rec = table.query(["skip_connect"] * 6)
    assert rec["index"] == 1835 and rec["arch"] == ALL_SKIP and rec["cifar10"] == pytest.approx(54.2967)
    assert table.accuracy(ALL_SKIP, "CIFAR10") == table.accuracy(parse_arch(ALL_SKIP), "cifar10")
    assert table.accuracy(BEST_C10, "ImageNet16-120") == table.accuracy(BEST_C10, "imagenet16-120")
    with pytest.raises(TableError, match="unknown dataset 'imagenet'"):
        table.accuracy(BEST_C10, "imagenet")


def test_best_and_stats(table):
    assert table.best("cifar10")["index"] == 6111
    for dataset, top in [("cifar10", 94.3733), ("cifar100", 73.5133), ("imagenet16-120", 47.3111)]:
        best = table.best(dataset)
        assert best[dataset] == pytest.approx(top)
        assert table.stats(dataset)["max"] == pytest.approx(top)
        assert "none" not in parse_arch(table.best(dataset, exclude_none=True)["arch"])
    s = table.stats("cifar10", exclude_none=True)
    assert s["n"] == 4 ** 6 and table.stats("cifar10")["n"] == 5 ** 6
    assert s["median"] == pytest.approx(91.385) and s["p90"] == pytest.approx(93.25585)
    assert s["mean"] < s["median"] < s["p90"] < s["max"]


def test_sample(table):
    a = table.sample(50, "cifar100", seed=3, exclude_none=True)
    assert a == table.sample(50, "cifar100", seed=3, exclude_none=True)
    assert a != table.sample(50, "cifar100", seed=4, exclude_none=True)
    assert all("none" not in parse_arch(r["arch"]) for r in a)
    assert all(r["cifar100"] == table.accuracy(r["arch"], "cifar100") for r in a)
    with_none = table.sample(200, "cifar10", seed=0, exclude_none=False)
    assert any("none" in parse_arch(r["arch"]) for r in with_none)


# ------------------------------------------------------------------------ small CSVs


def rows(n):
    """n distinct rows in the real format, with made-up accuracies."""
    cells = itertools.islice(itertools.product(OPS, repeat=6), n)
    return "".join(f"{i},{arch_str(ops)},{90 + i},{70 + i},{40 + i}\n" for i, ops in enumerate(cells))


def test_small_csv_without_index(tmp_path):
    path = write(tmp_path, "ARCH,Cifar10\n" + "".join(f"{arch_str(['nor_conv_3x3'] * 6)},93.5\n"), "t.txt")
    t = NB201Table.load(path)
    assert t.datasets == ("cifar10",) and len(t) == 1
    assert t.query(["nor_conv_3x3"] * 6) == {"index": None, "arch": arch_str(["nor_conv_3x3"] * 6),
                                              "cifar10": 93.5}
    with pytest.raises(TableError, match=r"is not in .*t\.txt"):
        t.query(ALL_SKIP)


@pytest.mark.parametrize("text, where, why", [
    ("", "", "empty file"),
    ("index,cifar10\n", ":1:", "no 'arch' column"),
    ("index,arch\n", ":1:", "no accuracy columns"),
    ("arch,cifar10,CIFAR10\n", ":1:", "duplicate column 'cifar10'"),
    (HEADER, "", "no data rows"),
    (HEADER + rows(2) + "2,|none~0|,1,2,3\n", ":4:", "malformed NAS-Bench-201 architecture"),
    (HEADER + rows(1) + f"1,{ALL_SKIP},90,x,40\n", ":3:", "cifar100 accuracy 'x' is not a finite number"),
    (HEADER + f"0,{ALL_SKIP},nan,1,2\n", ":2:", "cifar10 accuracy 'nan'"),
    (HEADER + rows(1) + "\n" + rows(1).replace("0,", "7,", 1), ":4:", "duplicate architecture"),
    (HEADER + rows(2).replace("1,", "0,", 1), ":3:", "duplicate index 0"),
    (HEADER + rows(1).replace("0,", "zero,", 1), ":2:", "index 'zero' is not an integer"),
    (HEADER + rows(3) + f"3,{ALL_SKIP},1,2\n", ":5:", "expected 5 fields, got 4"),
])
def test_malformed_csv(tmp_path, text, where, why):
    path = write(tmp_path, text)
    with pytest.raises(TableError) as e:
        NB201Table.load(path)
    msg = str(e.value)
    assert msg.startswith(path + where) and why in msg and "\n" not in msg, msg


def test_missing_file_and_non_csv(tmp_path, monkeypatch):
    with pytest.raises(TableError, match="no such file"):
        NB201Table.load(str(tmp_path / "absent.csv"))
    monkeypatch.setitem(sys.modules, "nats_bench", None)  # import nats_bench -> ImportError
    with pytest.raises(TableError, match="needs the nats_bench package"):
        NB201Table.load(str(tmp_path))


def test_nats_bench_files(tmp_path, monkeypatch):
    """The NATS-Bench path, against a stand-in for the nats_bench API: queried lazily, with
    its dataset spelling and the 200-epoch results."""
    archs = [arch_str(ops) for ops in itertools.islice(itertools.product(OPS, repeat=6), 30)]
    calls = []

    class API:
        def __len__(self):
            return len(archs)

        def arch(self, i):
            return archs[i]

        def get_more_info(self, i, dataset, hp):
            calls.append((i, dataset, hp))
            return {"test-accuracy": {"cifar10": 90.0, "cifar100": 70.0, "ImageNet16-120": 40.0}[dataset] + i}

    def create(path, space, fast_mode, verbose):
        assert (path, space, fast_mode, verbose) == (str(tmp_path), "tss", True, False)
        return API()

    monkeypatch.setitem(sys.modules, "nats_bench", types.SimpleNamespace(create=create))
    t = NB201Table.load(str(tmp_path))
    assert len(t) == 30 and t.datasets == ("cifar10", "cifar100", "imagenet16-120") and not calls
    assert t.accuracy(archs[7], "imagenet16-120") == 47.0
    assert t.accuracy(archs[7], "ImageNet16-120") == 47.0
    assert calls == [(7, "ImageNet16-120", "200")]
    assert t.query(archs[2]) == {"index": 2, "arch": archs[2], "cifar10": 92.0, "cifar100": 72.0,
                                 "imagenet16-120": 42.0}
    assert t.best("cifar10")["index"] == 29
