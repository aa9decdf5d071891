"""NAS-Bench-101 (Ying et al., ICML 2019): a cell's module hash, pruning, and a table lookup
that needs no TensorFlow.

A NAS-Bench-101 cell is a DAG of at most 7 vertices: vertex 0 is the input, the last the
output, each other vertex one op of OPS. The benchmark identifies a cell by an
isomorphism-invariant MD5 fingerprint of its *pruned* graph, so a cell found by a search is
looked up by computing that fingerprint exactly as google-research/nasbench does:

- prune (nasbench/lib/model_spec.py, ModelSpec._prune): drop every vertex that is not both
  reachable from the input and able to reach the output; fewer than 2 vertices left means the
  input does not reach the output and the spec is invalid.
- hash (nasbench/lib/graph_util.py, hash_module): labels are -1 for the input, -2 for the
  output and each op's index in the canonical order CANONICAL_OPS (config['available_ops']:
  conv3x3-bn-relu, conv1x1-bn-relu, maxpool3x3); each vertex starts as md5(str((out_degree,
  in_degree, label))) and, V times, becomes md5(sorted in-neighbour hashes joined + '|' +
  sorted out-neighbour hashes joined + '|' + own hash); the fingerprint is
  md5(str(sorted vertex hashes)). The string forms matter: Python's str() of a tuple of ints
  and of a list of hex strings, as in the reference.

The table itself (hash -> mean validation and test accuracy over the 3 training repeats at
108 epochs) is read from the official `nasbench_only108.tfrecord` by gaea_ext.benchmarks.tfrecord
and cached in a compact .npz next to it (or under ~/.cache/gaea_ext when that directory is
read-only), so the 500 MB file is parsed once.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import struct
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from gaea_ext.benchmarks.nb201 import TableError
from gaea_ext.benchmarks import tfrecord

INPUT, OUTPUT = "input", "output"
CONV3X3, CONV1X1, MAXPOOL3X3 = "conv3x3-bn-relu", "conv1x1-bn-relu", "maxpool3x3"
CANONICAL_OPS = (CONV3X3, CONV1X1, MAXPOOL3X3)  # the label order of the benchmark's hashes
EPOCHS = 108
TABLE_VERSION = 1

Matrix = List[List[int]]


class NB101Error(TableError):
    """A bad cell or a missing, truncated or corrupt table file (one line for the user)."""


# -- graphs ------------------------------------------------------------------------------
def _check(matrix: Sequence[Sequence[int]], ops: Sequence[str]) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.int64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise NB101Error(f"a NAS-Bench-101 matrix must be square, got shape {m.shape}")
    if m.shape[0] != len(ops):
        raise NB101Error(f"{len(ops)} ops for a {m.shape[0]}-vertex matrix")
    if np.any(np.tril(m) != 0):
        raise NB101Error("a NAS-Bench-101 matrix must be strictly upper triangular (a DAG in vertex order)")
    if ops[0] != INPUT or ops[-1] != OUTPUT:
        raise NB101Error(f"ops must start with {INPUT!r} and end with {OUTPUT!r}, got {list(ops)}")
    for op in ops[1:-1]:
        if op not in CANONICAL_OPS:
            raise NB101Error(f"unknown NAS-Bench-101 op {op!r}; expected one of {', '.join(CANONICAL_OPS)}")
    return (m != 0).astype(np.int64)


def prune(matrix: Sequence[Sequence[int]], ops: Sequence[str]) -> Optional[Tuple[Matrix, List[str]]]:
    """The cell without the vertices that are not on some input -> output path, as
    ModelSpec._prune computes it; None when the input does not reach the output."""
    m = _check(matrix, ops)
    n = m.shape[0]

    def reach(start: int, step) -> set:
        seen, frontier = {start}, [start]
        while frontier:
            v = frontier.pop()
            for w in step(v):
                if w not in seen:
                    seen.add(w)
                    frontier.append(w)
        return seen

    forward = reach(0, lambda v: [w for w in range(v + 1, n) if m[v, w]])
    backward = reach(n - 1, lambda v: [u for u in range(v) if m[u, v]])
    keep = sorted(forward & backward)
    if len(keep) < 2 or 0 not in keep or n - 1 not in keep:
        return None
    return m[np.ix_(keep, keep)].tolist(), [ops[i] for i in keep]


def _md5(s: str) -> str:
    return hashlib.md5(s.encode("utf-8")).hexdigest()


def hash_module(matrix: Sequence[Sequence[int]], labels: Sequence[int]) -> str:
    """graph_util.hash_module: the isomorphism-invariant MD5 fingerprint of a labelled DAG."""
    m = np.asarray(matrix, dtype=np.int64)
    n = m.shape[0]
    in_deg = [int(x) for x in m.sum(axis=0)]
    out_deg = [int(x) for x in m.sum(axis=1)]
    hashes = [_md5(str((out_deg[v], in_deg[v], int(labels[v])))) for v in range(n)]
    for _ in range(n):
        hashes = [_md5("".join(sorted(hashes[w] for w in range(n) if m[w, v])) + "|"
                       + "".join(sorted(hashes[w] for w in range(n) if m[v, w])) + "|" + hashes[v])
                  for v in range(n)]
    return _md5(str(sorted(hashes)))


def spec_hash(matrix: Sequence[Sequence[int]], ops: Sequence[str]) -> str:
    """The benchmark's hash of a cell (ModelSpec(matrix, ops).hash_spec(available_ops)):
    pruned first, then hashed with the canonical op labels."""
    pruned = prune(matrix, ops)
    if pruned is None:
        raise NB101Error("invalid NAS-Bench-101 cell: the input does not reach the output")
    m, o = pruned
    labels = [-1] + [CANONICAL_OPS.index(op) for op in o[1:-1]] + [-2]
    return hash_module(m, labels)


# -- the table ---------------------------------------------------------------------------
EVAL_FIELDS = {1: "current_epoch", 2: "training_time", 3: "train_accuracy", 4: "validation_accuracy",
               5: "test_accuracy"}


def evaluations(raw: bytes) -> List[bytes]:
    """The serialized evaluation_data entries of a serialized nasbench.ModelMetrics, decoded by
    hand (nasbench/lib/model_metrics.proto: ModelMetrics.evaluation_data = 1, a repeated
    message; trainable_parameters 2 and total_time 3 are skipped)."""
    return [value for field, wire, value in _fields(raw) if field == 1 and wire == 2]


def decode_evaluation(msg: bytes) -> Dict[str, float]:
    """One EvaluationData: current_epoch 1, training_time 2, train_accuracy 3,
    validation_accuracy 4, test_accuracy 5 (doubles); checkpoint_path 6 (a string) skipped."""
    return {EVAL_FIELDS[f]: struct.unpack("<d", v)[0] for f, w, v in _fields(msg) if f in EVAL_FIELDS and w == 1}


def _varint(buf: bytes, pos: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _fields(buf: bytes) -> Iterator[Tuple[int, int, object]]:
    """(field number, wire type, value) of each field of a protobuf message: an int for
    varints, raw bytes for fixed64/fixed32/length-delimited."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > len(buf):
                raise ValueError("truncated fixed-width field")
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("truncated length-delimited field")
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if field == 0:
            raise ValueError("field number 0")
        yield field, wire, value


def parse_row(record: bytes) -> Tuple[str, int, Dict[str, float]]:
    """(module hash, epochs, final evaluation) of one tfrecord row: the JSON list
    [module_hash, epochs, raw_adjacency, raw_operations, base64 ModelMetrics] (nasbench/api.py).
    The final evaluation is evaluation_data[2], as the official API reads it."""
    try:
        module_hash, epochs, _adjacency, _operations, raw = json.loads(record.decode("utf-8"))
        final = decode_evaluation(evaluations(base64.b64decode(raw, validate=True))[2])
        return str(module_hash), int(epochs), {k: final[k] for k in ("validation_accuracy", "test_accuracy")}
    except (ValueError, TypeError, IndexError, KeyError, UnicodeDecodeError, binascii.Error) as e:
        raise ValueError(f"malformed row ({type(e).__name__}: {e})") from None


class NB101Table:
    """hash -> (mean validation accuracy, mean test accuracy, repeats) at 108 epochs, accuracies
    as fractions in [0, 1] like the benchmark's."""

    def __init__(self, hashes: np.ndarray, valid: np.ndarray, test: np.ndarray, repeats: np.ndarray):
        self.hashes, self.valid, self.test, self.repeats = hashes, valid, test, repeats
        self.index = {h.decode("ascii"): i for i, h in enumerate(hashes.tolist())}

    def __len__(self) -> int:
        return len(self.index)

    def query(self, module_hash: str) -> Optional[Dict[str, float]]:
        i = self.index.get(module_hash)
        if i is None:
            return None
        return {"valid_acc": float(self.valid[i]), "test_acc": float(self.test[i]), "repeats": int(self.repeats[i])}

    # -- building and caching ------------------------------------------------------------
    @classmethod
    def from_tfrecord(cls, path: str) -> "NB101Table":
        sums: Dict[str, List[float]] = {}
        try:
            for n, record in enumerate(tfrecord.read_records(path)):
                try:
                    h, epochs, final = parse_row(record)
                except ValueError as e:
                    raise NB101Error(f"{path}: record {n}: {e}") from None
                if epochs != EPOCHS:
                    continue  # nasbench_full.tfrecord also holds 4, 12 and 36 epochs
                s = sums.setdefault(h, [0.0, 0.0, 0])
                s[0] += final["validation_accuracy"]
                s[1] += final["test_accuracy"]
                s[2] += 1
        except tfrecord.TFRecordError as e:
            raise NB101Error(str(e)) from None
        if not sums:
            raise NB101Error(f"{path}: no {EPOCHS}-epoch rows: not a NAS-Bench-101 tfrecord")
        keys = sorted(sums)
        counts = np.array([sums[k][2] for k in keys], dtype=np.int64)
        return cls(np.array([k.encode("ascii") for k in keys], dtype="S32"),
                   np.array([sums[k][0] for k in keys]) / counts, np.array([sums[k][1] for k in keys]) / counts,
                   counts.astype(np.uint8))

    def save(self, path: str, source: Optional[Tuple[int, int]] = None) -> None:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            np.savez(f, version=np.int64(TABLE_VERSION), hashes=self.hashes, valid=self.valid, test=self.test,
                     repeats=self.repeats, source=np.array(source if source else (-1, -1), dtype=np.int64))
        os.replace(tmp, path)

    @classmethod
    def from_npz(cls, path: str, source: Optional[Tuple[int, int]] = None) -> Optional["NB101Table"]:
        """The cached table, or None when it is unreadable, of another version, or made from
        another file (size and mtime differ)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["version"]) != TABLE_VERSION:
                    return None
                if source is not None and tuple(int(x) for x in z["source"]) != tuple(source):
                    return None
                return cls(z["hashes"], z["valid"], z["test"], z["repeats"])
        except (OSError, ValueError, KeyError, EOFError):
            return None

    @classmethod
    def load(cls, path: str, cache: Optional[str] = None, echo=None) -> "NB101Table":
        """The table of a tfrecord file (converted once, then read from its cache), or of a
        cache file (.npz) given directly."""
        if not os.path.isfile(path):
            raise NB101Error(f"NAS-Bench-101 file not found: {path}")
        if path.endswith(".npz"):
            table = cls.from_npz(path)
            if table is None:
                raise NB101Error(f"{path}: not a gaea_ext NAS-Bench-101 table (or of another version)")
            return table
        st = os.stat(path)
        source = (st.st_size, int(st.st_mtime_ns))
        for candidate in ([cache] if cache else cache_paths(path)):
            table = cls.from_npz(candidate, source) if os.path.isfile(candidate) else None
            if table is not None:
                return table
        if echo:
            echo(f"converting {path} to a compact table (once; CRC-checked, this takes a while)")
        table = cls.from_tfrecord(path)
        for candidate in ([cache] if cache else cache_paths(path)):
            try:
                os.makedirs(os.path.dirname(os.path.abspath(candidate)), exist_ok=True)
                table.save(candidate, source)
                break
            except OSError:
                continue
        return table


def cache_paths(path: str) -> List[str]:
    """Where the compact table of `path` is cached: next to it, else in the user's cache."""
    name = os.path.basename(path) + ".gaea-table.npz"
    home = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    tag = hashlib.md5(os.path.abspath(path).encode("utf-8")).hexdigest()[:8]
    return [path + ".gaea-table.npz", os.path.join(home, "gaea_ext", f"{tag}-{name}")]
