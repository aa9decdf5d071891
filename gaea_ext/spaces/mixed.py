"""The built-in spaces' edge: gaea_ext.nn.MixedOp with candidates named by op and built by
the space's builders ("none" is the zero op, never run).

There is one edge implementation, gaea_ext/nn/mixed.py (structural planning in
gaea_ext/nn/plan.py); this keeps the spaces' constructor, MixedOp(names, build, fused,
stride), and the planning names the tests and other spaces import from here.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

from torch import nn

from gaea_ext.nn import mixed
from gaea_ext.nn.plan import EdgePlan, Plan, chain, pf_code, plan

__all__ = ["MixedOp", "EdgePlan", "Plan", "chain", "pf_code", "plan"]


class MixedOp(mixed.MixedOp):
    def __init__(self, names: Sequence[str], build: Dict[str, Callable[[], nn.Module]], fused: bool,
                 stride: int = 1):
        super().__init__({n: None if n == "none" else build[n]() for n in names}, fused, stride=stride)
