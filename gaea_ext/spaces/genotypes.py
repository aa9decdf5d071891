"""DARTS-space cells as genotypes: the published ones, derivation from architecture weights,
and the JSON form written to result.json and read by `gaea train --genotype`.

A genotype lists, for each of the 4 intermediate nodes of a cell, its two inputs as (op, input
node) pairs -- nodes 0 and 1 are the outputs of the two previous cells -- plus the nodes
concatenated into the cell output. Same form as DARTS' ``Genotype`` namedtuple.
"""
from __future__ import annotations

import json
import os
from collections import namedtuple
from typing import Dict, List, Sequence, Tuple

import torch

from gaea_ext.spaces.darts_ops import OPS

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")


class GenotypeError(ValueError):
    pass


# Published cells, for comparison runs. Sources: DARTS_V2 -- Liu et al. 2019 (quark0/darts
# genotypes.py); PC_DARTS, PC_DARTS_IMAGENET -- Xu et al. 2020 (yuhuixu1993/PC-DARTS genotypes.py,
# PC_DARTS_cifar / PC_DARTS_image).
NAMED: Dict[str, Genotype] = {
    "DARTS_V2": Genotype(
        normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
                ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
                ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
        reduce_concat=[2, 3, 4, 5]),
    "PC_DARTS": Genotype(
        normal=[("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
                ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
                ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)],
        reduce_concat=[2, 3, 4, 5]),
    "PC_DARTS_IMAGENET": Genotype(
        normal=[("skip_connect", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 0), ("skip_connect", 1),
                ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("dil_conv_5x5", 4)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_5x5", 2), ("max_pool_3x3", 1),
                ("sep_conv_3x3", 2), ("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_3x3", 3)],
        reduce_concat=[2, 3, 4, 5]),
}


def edge_index(node: int, j: int) -> int:
    """Row of the edge j -> node (node 0..steps-1 among intermediate nodes) in a [14, ops] table."""
    return sum(2 + i for i in range(node)) + j


def parse_cell(scores: torch.Tensor, op_names: Sequence[str], steps: int = 4) -> List[Tuple[str, int]]:
    """Keep, for each node, the 2 incoming edges whose best non-`none` score is highest, and on
    each the best non-`none` op. ``scores``: [edges, ops] (PC-DARTS: op weight times edge weight)."""
    scores = scores.detach().double().cpu()
    live = [k for k, n in enumerate(op_names) if n != "none"]
    if not live:
        raise GenotypeError("no op other than `none` to choose from")
    gene = []
    for node in range(steps):
        rows = scores[edge_index(node, 0):edge_index(node, 0) + node + 2][:, live]
        best, arg = rows.max(dim=1)
        # Stable order: ties go to the lower input index, as Python's sorted() does in DARTS.
        order = sorted(range(node + 2), key=lambda j: -float(best[j]))[:2]
        gene += [(op_names[live[int(arg[j])]], j) for j in order]
    return gene


def derive(normal: torch.Tensor, reduce: torch.Tensor, op_names: Sequence[str], steps: int = 4) -> Genotype:
    concat = list(range(2, 2 + steps))
    return Genotype(parse_cell(normal, op_names, steps), concat, parse_cell(reduce, op_names, steps), concat)


def to_json(g: Genotype) -> dict:
    return {"normal": [list(p) for p in g.normal], "normal_concat": list(g.normal_concat),
            "reduce": [list(p) for p in g.reduce], "reduce_concat": list(g.reduce_concat)}


def validate(g: Genotype) -> Genotype:
    """Check the ops exist and every input refers to an earlier node; raise GenotypeError."""
    for cell in ("normal", "reduce"):
        pairs = getattr(g, cell)
        if not pairs or len(pairs) % 2:
            raise GenotypeError(f"{cell}: need 2 (op, input) pairs per node, got {len(pairs)} pairs")
        for k, (op, j) in enumerate(pairs):
            if op not in OPS:
                raise GenotypeError(f"{cell}: op {op!r} is not in the DARTS space ({', '.join(sorted(OPS))})")
            if not isinstance(j, int) or not 0 <= j < 2 + k // 2:
                raise GenotypeError(f"{cell}: pair {k} ({op!r}, {j!r}) takes an input that is not an earlier node")
        concat = getattr(g, f"{cell}_concat")
        if not concat or any(not isinstance(c, int) or not 0 <= c < 2 + len(pairs) // 2 for c in concat):
            raise GenotypeError(f"{cell}_concat {list(concat)!r} names nodes the cell does not have")
    return g


def from_json(obj) -> Genotype:
    if isinstance(obj, dict) and "genotype" in obj and isinstance(obj["genotype"], dict):
        obj = obj["genotype"]  # a search's result.json
    try:
        g = Genotype(normal=[(str(op), j) for op, j in obj["normal"]], normal_concat=list(obj["normal_concat"]),
                     reduce=[(str(op), j) for op, j in obj["reduce"]], reduce_concat=list(obj["reduce_concat"]))
    except (KeyError, TypeError, ValueError) as e:
        raise GenotypeError(f"not a genotype (need normal, normal_concat, reduce, reduce_concat): {e!r}") from None
    return validate(g)


def load(spec: str) -> Genotype:
    """A built-in name (DARTS_V2, PC_DARTS, ...), or a JSON file: a genotype, or a search's result.json."""
    if spec in NAMED:
        return NAMED[spec]
    if not os.path.exists(spec):
        raise GenotypeError(f"{spec!r} is neither a built-in genotype ({', '.join(NAMED)}) nor a file")
    try:
        with open(spec) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise GenotypeError(f"cannot read genotype file {spec}: {e}") from None
    try:
        return from_json(obj)
    except GenotypeError as e:
        raise GenotypeError(f"{spec}: {e}") from None
