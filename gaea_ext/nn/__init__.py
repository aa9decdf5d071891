"""GAEA on your own model: MixedOp layers, their architecture parameters, and the search step.

    from gaea_ext.nn import MixedOp, ArchParameters, ExpGrad, gaea_step, choices

See README "Your own search space" and examples/custom_space.py.
"""
from gaea_ext.nn.arch import ArchParameters, choices, mixed_ops
from gaea_ext.nn.mixed import MixedOp
from gaea_ext.nn.search import gaea_step
from gaea_ext.optim import ExpGrad

__all__ = ["MixedOp", "ArchParameters", "choices", "mixed_ops", "gaea_step", "ExpGrad"]
