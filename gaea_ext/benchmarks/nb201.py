"""NAS-Bench-201 lookup: score a cell from its final test accuracy instead of training it.

NAS-Bench-201 (the NATS-Bench topology space) trained every one of its 5^6 = 15,625 cells for
200 epochs on CIFAR-10, CIFAR-100 and ImageNet16-120. A search on this space can therefore
be evaluated by a table lookup of the cell it returns, and the table itself gives the
baselines to compare against: the best cell, and the distribution of a random cell.

The table comes either from a CSV export (`index,arch,cifar10,cifar100,imagenet16-120`,
read with the csv module so that loading all 15,625 rows takes a few hundred milliseconds)
or from the official NATS-Bench files through the optional `nats_bench` package.
"""
from __future__ import annotations

import csv
import math
import os
import random
import statistics
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

__all__ = ["OPS", "EDGES", "TableError", "arch_str", "parse_arch", "random_arch", "table_dataset",
           "NB201Table"]

OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
# (from_node, to_node) of the 6 edges of the 4-node cell, in the order of the benchmark's
# string form: grouped by destination node, then by source node.
EDGES = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))

# The NATS-Bench API spells one dataset differently from the CSV columns.
_NATS_NAMES = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet16-120": "ImageNet16-120"}

Arch = Union[str, Sequence[str]]


class TableError(ValueError):
    """A bad architecture, dataset name or table file; the message is one line for the user."""


def arch_str(ops: Sequence[str]) -> str:
    """The benchmark's string for a cell given its 6 ops in EDGES order.

    '|op~0|+|op~0|op~1|+|op~0|op~1|op~2|': one '+'-separated group per node 1..3, listing the
    op on the edge from each earlier node j as 'op~j'.
    """
    ops = list(ops)
    if len(ops) != len(EDGES):
        raise TableError(f"a NAS-Bench-201 cell has {len(EDGES)} ops, got {len(ops)}: {ops}")
    for op in ops:
        if op not in OPS:
            raise TableError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    nodes = ["|" + "|".join(f"{op}~{j}" for op, (j, k) in zip(ops, EDGES) if k == to) + "|"
             for to in (1, 2, 3)]
    return "+".join(nodes)


def parse_arch(s: str) -> List[str]:
    """The 6 ops, in EDGES order, of a benchmark string (the inverse of arch_str)."""
    def bad(why: str) -> TableError:
        return TableError(f"malformed NAS-Bench-201 architecture {s!r}: {why}")

    if not isinstance(s, str):
        raise TableError(f"expected an architecture string, got {type(s).__name__}")
    groups = s.strip().split("+")
    if len(groups) != 3:
        raise bad(f"expected 3 '+'-separated nodes, got {len(groups)}")
    ops = []
    for to, group in enumerate(groups, start=1):
        if len(group) < 2 or group[0] != "|" or group[-1] != "|":
            raise bad(f"node {to} must look like '|op~0|...|'")
        tokens = group[1:-1].split("|")
        if len(tokens) != to:
            raise bad(f"node {to} must have {to} inputs, got {len(tokens)}")
        for j, token in enumerate(tokens):
            op, sep, src = token.partition("~")
            if not sep or src != str(j):
                raise bad(f"input {j} of node {to} must be 'op~{j}', got {token!r}")
            if op not in OPS:
                raise bad(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
            ops.append(op)
    return ops


def random_arch(rng: Union[random.Random, torch.Generator], exclude_none: bool = False) -> List[str]:
    """6 ops drawn uniformly and independently: a uniformly random cell of the space.

    exclude_none draws from the 4 ops other than 'none', i.e. uniformly among the 4^6 cells
    without a zeroed edge (cells whose edges are all 'none' near the output cannot learn).
    """
    choices = OPS[1:] if exclude_none else OPS
    if isinstance(rng, torch.Generator):
        picks = torch.randint(len(choices), (len(EDGES),), generator=rng).tolist()
        return [choices[i] for i in picks]
    return [rng.choice(choices) for _ in EDGES]


def table_dataset(train_dataset: str) -> Optional[str]:
    """The table column that scores a search trained on `train_dataset`, or None if no column
    does (e.g. a custom ImageFolder), in which case there is nothing to look up."""
    key = str(train_dataset).strip().lower()
    return key if key in _NATS_NAMES else None


def _has_none(arch: str) -> bool:
    return "none~" in arch


class NB201Table:
    """Final test accuracy (%) of NAS-Bench-201 cells, per dataset.

    Rows are held as canonical arch strings; accuracies come from `lookup(row, dataset)`,
    which is a list access for a CSV and a (cached) NATS-Bench API query otherwise, so the
    official files are only read for the cells actually asked about.
    """

    def __init__(self, archs: List[str], indices: List[Optional[int]], datasets: Sequence[str],
                 lookup: Callable[[int, str], float], source: str = "<table>"):
        self.datasets = tuple(datasets)
        self.source = source
        self._archs = archs
        self._indices = indices
        self._lookup = lookup
        self._rows = {a: r for r, a in enumerate(archs)}

    # ---------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: str) -> "NB201Table":
        """A table from a CSV export, or from NATS-Bench tss files if `nats_bench` is installed."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise TableError(f"{path}: no such file or directory (expected a NAS-Bench-201 CSV table)")
        if _looks_like_csv(path):
            return cls._load_csv(path)
        try:
            import nats_bench
        except ImportError:
            raise TableError(
                f"{path}: not a CSV table with an 'arch' column, and reading the official "
                "NATS-Bench files needs the nats_bench package (pip install nats_bench)") from None
        return cls._load_nats(nats_bench, path)

    @classmethod
    def _load_csv(cls, path: str) -> "NB201Table":
        def bad(line, why: str) -> TableError:
            return TableError(f"{path}:{line}: {why}" if line else f"{path}: {why}")

        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if header is None:
                    raise bad(None, "empty file (expected a header with an 'arch' column)")
                cols = [c.strip().lower() for c in header]
                dup = next((c for c in cols if cols.count(c) > 1), None)
                if dup is not None:
                    raise bad(1, f"duplicate column {dup!r}")
                if "arch" not in cols:
                    raise bad(1, f"no 'arch' column in header {','.join(header)!r}")
                datasets = [c for c in cols if c not in ("index", "arch")]
                if not datasets:
                    raise bad(1, "no accuracy columns (expected e.g. cifar10,cifar100,imagenet16-120)")
                i_arch = cols.index("arch")
                i_index = cols.index("index") if "index" in cols else None
                i_data = [cols.index(d) for d in datasets]

                archs, indices, values = [], [], []
                first_line: Dict[str, int] = {}
                seen_index: Dict[int, int] = {}
                for fields in reader:
                    line = reader.line_num
                    if not fields or all(not x.strip() for x in fields):
                        continue
                    if len(fields) != len(cols):
                        raise bad(line, f"expected {len(cols)} fields, got {len(fields)}")
                    try:
                        arch = arch_str(parse_arch(fields[i_arch]))
                    except TableError as e:
                        raise bad(line, str(e)) from None
                    if arch in first_line:
                        raise bad(line, f"duplicate architecture {arch} (first on line {first_line[arch]})")
                    first_line[arch] = line
                    index = None
                    if i_index is not None:
                        try:
                            index = int(fields[i_index])
                        except ValueError:
                            raise bad(line, f"index {fields[i_index]!r} is not an integer") from None
                        if index in seen_index:
                            raise bad(line, f"duplicate index {index} (first on line {seen_index[index]})")
                        seen_index[index] = line
                    row = []
                    for d, i in zip(datasets, i_data):
                        try:
                            v = float(fields[i])
                        except ValueError:
                            v = math.nan
                        if not math.isfinite(v):
                            raise bad(line, f"{d} accuracy {fields[i]!r} is not a finite number")
                        row.append(v)
                    archs.append(arch)
                    indices.append(index)
                    values.append(row)
        except OSError as e:
            raise bad(None, f"cannot read: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise bad(None, "not a UTF-8 text file") from None
        except csv.Error as e:
            raise bad(reader.line_num, f"CSV syntax error: {e}") from None
        if not archs:
            raise bad(None, "no data rows after the header")
        column = {d: i for i, d in enumerate(datasets)}
        return cls(archs, indices, datasets, lambda r, d: values[r][column[d]], source=path)

    @classmethod
    def _load_nats(cls, nats_bench, path: str) -> "NB201Table":
        api = nats_bench.create(path, "tss", fast_mode=True, verbose=False)
        n = len(api)
        archs = [arch_str(parse_arch(api.arch(i))) for i in range(n)]
        cache: Dict[tuple, float] = {}

        def lookup(r: int, d: str) -> float:
            if (r, d) not in cache:
                info = api.get_more_info(r, _NATS_NAMES[d], hp="200")
                cache[r, d] = float(info["test-accuracy"])
            return cache[r, d]

        return cls(archs, list(range(n)), tuple(_NATS_NAMES), lookup, source=path)

    # ---------------------------------------------------------------------------- queries

    def __len__(self) -> int:
        return len(self._archs)

    def __repr__(self) -> str:
        return f"NB201Table({self.source!r}, {len(self)} cells, datasets={self.datasets})"

    def dataset(self, name: str) -> str:
        """This table's column for `name` ('cifar10', 'cifar100', 'ImageNet16-120', any case)."""
        key = str(name).strip().lower()
        if key not in self.datasets:
            raise TableError(f"unknown dataset {name!r}; this table has {', '.join(self.datasets)}")
        return key

    def _row(self, arch: Arch) -> int:
        key = arch_str(parse_arch(arch)) if isinstance(arch, str) else arch_str(arch)
        if key not in self._rows:
            raise TableError(f"architecture {key} is not in {self.source}")
        return self._rows[key]

    def _record(self, r: int, datasets: Sequence[str]) -> dict:
        rec = {"index": self._indices[r], "arch": self._archs[r]}
        rec.update((d, self._lookup(r, d)) for d in datasets)
        return rec

    def query(self, arch: Arch) -> dict:
        """{'index', 'arch', <dataset>: accuracy, ...} for a string or a list of 6 ops."""
        return self._record(self._row(arch), self.datasets)

    def accuracy(self, arch: Arch, dataset: str) -> float:
        """Final test accuracy (%) of one cell on one dataset."""
        return self._lookup(self._row(arch), self.dataset(dataset))

    def _candidates(self, exclude_none: bool) -> List[int]:
        return [r for r, a in enumerate(self._archs) if not (exclude_none and _has_none(a))]

    def best(self, dataset: str, exclude_none: bool = False) -> dict:
        """The query record of the most accurate cell on `dataset` (the first one on ties)."""
        d = self.dataset(dataset)
        candidates = self._candidates(exclude_none)
        if not candidates:
            raise TableError(f"{self.source}: no cells to choose from (exclude_none={exclude_none})")
        return self._record(max(candidates, key=lambda r: self._lookup(r, d)), self.datasets)

    def stats(self, dataset: str, exclude_none: bool = False) -> dict:
        """{'n', 'mean', 'median', 'p90', 'max'} of the accuracies of all cells in the table.

        This is the distribution a uniformly random cell is drawn from, so it is the baseline
        a search method has to beat. p90 interpolates linearly between order statistics
        (numpy.percentile's default).
        """
        d = self.dataset(dataset)
        accs = [self._lookup(r, d) for r in self._candidates(exclude_none)]
        if not accs:
            raise TableError(f"{self.source}: no cells to summarize (exclude_none={exclude_none})")
        p90 = statistics.quantiles(accs, n=10, method="inclusive")[-1] if len(accs) > 1 else accs[0]
        return {"n": len(accs), "mean": statistics.fmean(accs), "median": statistics.median(accs),
                "p90": p90, "max": max(accs)}

    def sample(self, n: int, dataset: str, seed: int = 0, exclude_none: bool = False) -> List[dict]:
        """n cells drawn uniformly (with replacement) from the table, scored on `dataset`.

        This is random search with a free evaluation: the records are {'index', 'arch',
        <dataset>: accuracy}, and the same seed gives the same cells. Drawing from the table's
        rows rather than from the op space keeps this valid for a table holding a subset.
        """
        d = self.dataset(dataset)
        candidates = self._candidates(exclude_none)
        if n > 0 and not candidates:
            raise TableError(f"{self.source}: no cells to sample from (exclude_none={exclude_none})")
        rng = random.Random(seed)
        return [self._record(rng.choice(candidates), (d,)) for _ in range(n)]


def _looks_like_csv(path: str) -> bool:
    """A .csv file, or any file whose first line is a header with an 'arch' column."""
    if not os.path.isfile(path):
        return False
    if path.lower().endswith(".csv"):
        return True
    with open(path, "rb") as f:
        first = f.read(65536).split(b"\n", 1)[0]
    return b"arch" in [c.strip().lower() for c in first.split(b",")]
