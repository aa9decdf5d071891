"""Sparsity-aware search (`--prune-below T`): candidates whose mixing weight has fallen under
T on an edge are no longer computed.

GAEA's exponentiated-gradient steps drive most of each row's mass onto one or two ops within
a few epochs, so late in a search most candidates contribute (weight x output) almost nothing
to the sum while still costing their full forward and backward. Dropping them is an
approximation: the output loses sum(w_k y_k) over the dropped k, and a dropped candidate gets
no gradient, so its weight moves only through the renormalization of its row and it cannot
come back by its own merit. The row's argmax is always kept. bench/RESULTS.md records what
it does to step time and to the NB201 accuracy of the found cell.

One host sync per table and forward (the kept set is control flow), so it does not combine
with a graph-captured step. Methods whose forward already picks ops (gaea-gdas) ignore it.
"""
from __future__ import annotations

from typing import Sequence

from gaea_ext.spaces.arch import ArchParam, ArchWeights


def prune(weights: ArchWeights, spec: Sequence[ArchParam], threshold: float) -> ArchWeights:
    """weights with, per "ops" row, the tuple of op indices to compute (None: all of them)."""
    if threshold <= 0 or weights.hard is not None:
        return weights
    select = {}
    for p in spec:
        if p.kind != "ops":
            continue
        rows = weights[p.name].detach().float().cpu()
        keep = rows >= threshold
        keep[range(rows.shape[0]), rows.argmax(-1)] = True
        picks = [None if bool(k.all()) else tuple(k.nonzero().flatten().tolist()) for k in keep]
        if any(pick is not None for pick in picks):
            select[p.name] = picks
    return ArchWeights(weights.w, select or None)
