"""NAS-Bench-101 without TensorFlow: the module hash and pruning against the published
algorithm, CRC32C and TFRecord framing, the hand-decoded ModelMetrics protobuf, and the cached
hash -> accuracy table, on a synthetic tfrecord written here (the real file is 500 MB)."""
from __future__ import annotations

import base64
import itertools
import json
import os
import random
import struct

import numpy as np
import pytest

from gaea_ext.benchmarks import nb101, tfrecord
from gaea_ext.benchmarks.nb101 import NB101Error, NB101Table, prune, spec_hash
from gaea_ext.cli import main

# A published (spec, hash) pair: NNI's NAS-Bench-101 example (microsoft/nni,
# docs/en_US/NAS/BenchmarksExample.ipynb, v1.7, commit 10973c4), whose query of the official
# database prints this cell (inputN: the parents of vertex N) with
# 'hash': '00005c142e6f48ac74fdcf73e3439874'. The same matrix, ops and hash appear as the first
# row of the nasbench_only108 data in other public code (e.g. NASLib's commented-out
# arch-iterator test). It is the only real pair found in public sources for this test.
PUBLISHED_MATRIX = [[0, 1, 0, 0, 1, 1, 0],
                    [0, 0, 1, 0, 0, 0, 0],
                    [0, 0, 0, 1, 0, 0, 1],
                    [0, 0, 0, 0, 0, 1, 0],
                    [0, 0, 0, 0, 0, 1, 0],
                    [0, 0, 0, 0, 0, 0, 1],
                    [0, 0, 0, 0, 0, 0, 0]]
PUBLISHED_OPS = ["input", "conv3x3-bn-relu", "maxpool3x3", "conv3x3-bn-relu", "conv3x3-bn-relu",
                 "conv1x1-bn-relu", "output"]
PUBLISHED_HASH = "00005c142e6f48ac74fdcf73e3439874"


def permuted(matrix, ops, perm):
    """The same graph with vertex v renamed perm[v] (any order, not only topological)."""
    n = len(ops)
    m = [[0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if matrix[i][j]:
                m[perm[i]][perm[j]] = 1
    o = [None] * n
    for v in range(n):
        o[perm[v]] = ops[v]
    return m, o


def labels(ops):
    return [-1 if op == "input" else -2 if op == "output" else nb101.CANONICAL_OPS.index(op) for op in ops]


# -- hash and pruning ----------------------------------------------------------------------
def test_published_hash():
    assert spec_hash(PUBLISHED_MATRIX, PUBLISHED_OPS) == PUBLISHED_HASH


def test_hash_is_invariant_under_relabelling_and_sensitive_to_ops_and_edges():
    rng = random.Random(0)
    base = nb101.hash_module(PUBLISHED_MATRIX, labels(PUBLISHED_OPS))
    assert base == PUBLISHED_HASH
    for _ in range(20):
        perm = list(range(7))
        rng.shuffle(perm)
        m, o = permuted(PUBLISHED_MATRIX, PUBLISHED_OPS, perm)
        assert nb101.hash_module(m, labels(o)) == PUBLISHED_HASH
    # Intermediate vertices renumbered in another topological order: a valid spec, same hash.
    m, o = permuted(PUBLISHED_MATRIX, PUBLISHED_OPS, [0, 1, 2, 4, 3, 5, 6])
    assert spec_hash(m, o) == PUBLISHED_HASH
    # The op label order matters: swapping two labels' meanings changes the hash.
    swapped = [{"conv3x3-bn-relu": "conv1x1-bn-relu", "conv1x1-bn-relu": "conv3x3-bn-relu"}.get(op, op)
               for op in PUBLISHED_OPS]
    assert spec_hash(PUBLISHED_MATRIX, swapped) != PUBLISHED_HASH
    moved = [row[:] for row in PUBLISHED_MATRIX]
    moved[0][4], moved[1][4] = 0, 1  # one edge re-attached
    assert spec_hash(moved, PUBLISHED_OPS) != PUBLISHED_HASH


def test_prune_drops_vertices_off_every_input_output_path():
    # Vertex 2 reaches the output but not from the input; vertex 4 is reached but leads nowhere.
    m = [[0, 1, 0, 0, 1, 0, 0],
         [0, 0, 0, 1, 0, 0, 0],
         [0, 0, 0, 1, 0, 0, 0],
         [0, 0, 0, 0, 0, 0, 1],
         [0, 0, 0, 0, 0, 0, 0],
         [0, 0, 0, 0, 0, 0, 0],
         [0, 0, 0, 0, 0, 0, 0]]
    ops = ["input", "conv3x3-bn-relu", "maxpool3x3", "conv1x1-bn-relu", "maxpool3x3", "conv1x1-bn-relu", "output"]
    pm, po = prune(m, ops)
    assert po == ["input", "conv3x3-bn-relu", "conv1x1-bn-relu", "output"]
    assert pm == [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert spec_hash(m, ops) == spec_hash(pm, po)
    # The chain differs from the cell without vertex 1's conv.
    assert spec_hash(m, ops) != spec_hash([[0, 1, 0], [0, 0, 1], [0, 0, 0]], ["input", "conv1x1-bn-relu", "output"])
    with pytest.raises(NB101Error, match="does not reach"):
        spec_hash([[0, 1, 0], [0, 0, 0], [0, 0, 0]], ["input", "maxpool3x3", "output"])
    with pytest.raises(NB101Error, match="upper triangular"):
        spec_hash([[0, 1], [1, 0]], ["input", "output"])


# -- CRC32C and framing --------------------------------------------------------------------
def crc32c_bitwise(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    return c ^ 0xFFFFFFFF


def test_crc32c_known_values_and_lengths():
    # RFC 3720 appendix B.4 vectors and the usual check value.
    assert tfrecord.crc32c(b"123456789") == 0xE3069283
    assert tfrecord.crc32c(bytes(32)) == 0x8A9136AA
    assert tfrecord.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert tfrecord.crc32c(bytes(range(32))) == 0x46DD794E
    rng = random.Random(1)
    for n in list(range(0, 40)) + [255, 1000]:  # every tail length around the 8-byte words
        data = bytes(rng.randrange(256) for _ in range(n))
        assert tfrecord.crc32c(data) == crc32c_bitwise(data), n
    a, b = b"nasbench", b"-only108"
    assert tfrecord.crc32c(b, tfrecord.crc32c(a)) == tfrecord.crc32c(a + b)
    c = tfrecord.crc32c(b"x")
    assert tfrecord.masked_crc32c(b"x") == ((((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


# -- a synthetic nasbench tfrecord -----------------------------------------------------------
def varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def field(number: int, wire: int, payload: bytes) -> bytes:
    key = varint(number << 3 | wire)
    return key + (varint(len(payload)) + payload if wire == 2 else payload)


def double(number: int, value: float) -> bytes:
    return field(number, 1, struct.pack("<d", value))


def evaluation(epoch, valid, test, path="gs://bucket/model.ckpt-1"):
    # Fields out of order and a string field, as a real encoder may write them.
    return (double(5, test) + double(1, epoch) + double(2, 1000.0 * epoch) + double(3, 1.0)
            + double(4, valid) + field(6, 2, path.encode()))


def metrics(evals, params=8555530):
    body = b"".join(field(1, 2, evaluation(*e)) for e in evals)
    return field(2, 0, varint(params)) + body + double(3, 1768.78)


def row(module_hash, epochs, valid, test, matrix=PUBLISHED_MATRIX, ops=PUBLISHED_OPS) -> bytes:
    evals = [(0.0, 0.1, 0.1), (epochs / 2, valid - 0.1, test - 0.1), (float(epochs), valid, test)]
    raw = base64.b64encode(metrics(evals)).decode()
    adjacency = "".join(str(x) for r in matrix for x in r)
    return json.dumps([module_hash, epochs, adjacency, ",".join(ops), raw]).encode()


OTHER = "0123456789abcdef0123456789abcdef"
ROWS = [row(PUBLISHED_HASH, 108, 0.9264, 0.9206), row(PUBLISHED_HASH, 108, 0.9246, 0.9191),
        row(PUBLISHED_HASH, 108, 0.9305, 0.9216), row(PUBLISHED_HASH, 36, 0.50, 0.50),
        row(OTHER, 108, 0.80, 0.81), row(OTHER, 108, 0.82, 0.79), row(OTHER, 108, 0.84, 0.80)]


@pytest.fixture
def record_file(tmp_path):
    path = tmp_path / "nasbench_only108.tfrecord"
    tfrecord.write_records(str(path), ROWS)
    return path


def test_framing_roundtrip_and_metrics_decoding(record_file):
    records = list(tfrecord.read_records(str(record_file)))
    assert records == ROWS
    h, epochs, final = nb101.parse_row(records[0])
    assert (h, epochs) == (PUBLISHED_HASH, 108)
    assert final == {"validation_accuracy": 0.9264, "test_accuracy": 0.9206}


def test_table_means_over_repeats_at_108_epochs_and_cache(record_file, monkeypatch):
    table = NB101Table.load(str(record_file))
    assert len(table) == 2
    q = table.query(PUBLISHED_HASH)
    assert q["repeats"] == 3  # the 36-epoch row is not one of them
    assert q["valid_acc"] == pytest.approx((0.9264 + 0.9246 + 0.9305) / 3)
    assert q["test_acc"] == pytest.approx((0.9206 + 0.9191 + 0.9216) / 3)
    assert table.query(OTHER)["test_acc"] == pytest.approx(0.80)
    assert table.query("f" * 32) is None
    cache = str(record_file) + ".gaea-table.npz"
    assert os.path.isfile(cache)

    def no_parse(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(NB101Table, "from_tfrecord", classmethod(no_parse))
    assert NB101Table.load(str(record_file)).query(OTHER) == table.query(OTHER)
    assert NB101Table.load(cache).query(PUBLISHED_HASH) == q  # the cache given directly
    monkeypatch.undo()
    # A changed source file invalidates the cache.
    tfrecord.write_records(str(record_file), ROWS[4:])
    assert NB101Table.load(str(record_file)).query(PUBLISHED_HASH) is None


def corrupt(path, how):
    data = bytearray(path.read_bytes())
    first = 12 + len(ROWS[0]) + 4
    if how == "truncated":
        data = data[:first + 20]
    elif how == "short-header":
        data = data[:first + 5]
    elif how == "length-crc":
        data[first + 9] ^= 0x01
    elif how == "data-crc":
        data[first + 12 + 30] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, message", [("truncated", "truncated"), ("short-header", "truncated"),
                                          ("length-crc", "length CRC"), ("data-crc", "data CRC")])
def test_corrupt_framing_is_one_line_error(record_file, how, message):
    corrupt(record_file, how)
    with pytest.raises(NB101Error, match=message) as e:
        NB101Table.load(str(record_file))
    assert "\n" not in str(e.value) and "record 1" in str(e.value)


@pytest.mark.parametrize("bad", [
    b"not json",
    json.dumps([PUBLISHED_HASH, 108, "0", "input"]).encode(),  # 4 fields
    json.dumps([PUBLISHED_HASH, 108, "0", "input,output", "@@not base64@@"]).encode(),
    json.dumps([PUBLISHED_HASH, 108, "0", "input,output",
                base64.b64encode(metrics([(0.0, 0.1, 0.1)])).decode()]).encode(),  # no final evaluation
    json.dumps([PUBLISHED_HASH, 108, "0", "input,output", base64.b64encode(b"\x0a\x7f\x01").decode()]).encode(),
], ids=["json", "fields", "base64", "evaluations", "protobuf"])
def test_malformed_rows_are_one_line_errors(tmp_path, bad):
    path = tmp_path / "bad.tfrecord"
    tfrecord.write_records(str(path), [ROWS[0], bad])  # framing and CRCs are right
    with pytest.raises(NB101Error, match="record 1: malformed row") as e:
        NB101Table.load(str(path))
    assert "\n" not in str(e.value)


def test_cli_exit_2_with_one_line_for_missing_and_corrupt_files(tmp_path, record_file, capsys):
    args = ["search", "--space", "nb1shot1-1", "--epochs", "1", "--train-images", "64"]
    assert main(args + ["--nb101", str(tmp_path / "absent.tfrecord")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err
    corrupt(record_file, "data-crc")
    assert main(args + ["--nb101", str(record_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data CRC" in err
    assert main(["search", "--space", "pcdarts", "--nb101", str(record_file)]) == 2
    assert "--nb101" in capsys.readouterr().err


def test_every_relabelling_of_a_5_op_cell_hashes_alike():
    """Exhaustive over the 5! renamings of the intermediate vertices that keep the matrix upper
    triangular or not: the fingerprint never changes."""
    for perm in itertools.permutations(range(1, 6)):
        m, o = permuted(PUBLISHED_MATRIX, PUBLISHED_OPS, [0, *perm, 6])
        assert nb101.hash_module(np.array(m), labels(o)) == PUBLISHED_HASH
