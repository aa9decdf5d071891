"""mixed_op_bn: a mixed op whose candidates end in BatchNorm(affine=False), normalized inside.

In a search supernet every parametric candidate ends in BatchNorm(affine=False) (NB201's
ReLU-Conv-BN, DARTS' separable and dilated convs, DARTS' pools + BN). Run as modules, each
candidate's BN keeps its input z for its backward and the mixed op keeps the normalized
output y = (z - mean) * invstd for the weight gradient: two tensors of the edge's size per
candidate. Here the BN's training-mode forward (batch statistics, running-stat update,
num_batches_tracked) runs inside one native op together with the fused mix, and only z and
the per-channel statistics are saved: the normalized outputs are never written.

The op, its backward and its autograd are native (csrc/: ops.cpp schemas, cpu/ and cuda/
kernels, autograd.cpp), so an edge costs one dispatcher call per direction and no Python.
This module holds only the fake (meta) kernels torch.compile needs and the typed entry point.
Its pure-PyTorch twin is gaea_ext.reference.mixed_op_bn (F.batch_norm, then the reference
mixed op), which is what `--no-fused` runs in effect. No second derivative: backward raises
under create_graph (search never needs one).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from gaea_ext.ops import _common_format
from gaea_ext.reference import _acc, pf_code

__all__ = ["mixed_op_bn"]


def _out_like(x: Tensor, ys, zs, pf) -> Tensor:
    # Mirrors prepare_bn_forward in csrc/common.cpp: the layout all inputs share, x included
    # only when pf reads it.
    z = zs[0]
    fmt = _common_format([*([x] if pf else []), *ys, *zs])
    return torch.empty(z.shape, dtype=z.dtype, device=z.device, memory_format=fmt)


@torch.library.register_fake("gaea::mixed_op_bn")
def _mixed_op_bn_fake(x, ys, zs, weights, pf, running_means, running_vars, batches_tracked, momentum, eps,
                      w_index=()):
    torch._check(len(zs) >= 1, lambda: "mixed_op_bn: zs is empty (use mixed_op / mixed_op_pf)")
    torch._check(len(running_means) == len(running_vars) and len(running_means) in (0, len(zs)),
                 lambda: "mixed_op_bn: give running_means and running_vars for every z, or none")
    n = len(ys) + len(zs) + len(pf)
    torch._check(weights.dim() == 1 and (len(w_index) == n if w_index else weights.shape[0] == n),
                 lambda: f"mixed_op_bn: weights must be 1-D of length {n}, or w_index must have {n} entries")
    z = zs[0]
    stats = z.new_empty((len(zs), 2, z.shape[1]), dtype=_acc(z.dtype))
    return _out_like(x, ys, zs, pf), stats


@torch.library.register_fake("gaea::mixed_op_bn_backward")
def _mixed_op_bn_backward_fake(grad, x, ys, zs, weights, pf, stats, ys_mask, zs_mask, x_grad, weights_grad,
                               w_index=()):
    like = _out_like(x, ys, zs, pf)
    grad_ys = [torch.empty_like(like) for needed in ys_mask if needed]
    grad_zs = [torch.empty_like(like) for needed in zs_mask if needed]
    grad_x = torch.empty_like(_out_like(x, ys, zs, pf)) if (x_grad and len(pf) > 0) else x.new_empty(0)
    return grad_ys, grad_zs, grad_x, weights.new_empty(weights.shape)


def mixed_op_bn(x: Tensor, ys: Sequence[Tensor], zs: Sequence[Tensor], weights: Tensor,
                pf: Sequence[Union[int, str]] = (), running_means: Sequence[Tensor] = (),
                running_vars: Sequence[Tensor] = (), momentum: Optional[float] = 0.1,
                eps: float = 1e-5, num_batches_tracked: Sequence[Tensor] = (),
                w_index: Sequence[int] = ()) -> Tensor:
    """mixed_op over [*ys, *(BN(z) for z in zs), *(pf_j(x) for j in pf)].

    BN is BatchNorm(affine=False) in training mode: batch statistics over all dims but 1,
    and, when running_means / running_vars are given (one pair per z), their in-place update
    with `momentum` (unbiased variance), as nn.BatchNorm2d in train() does. With
    num_batches_tracked (one 0-d int64 tensor per z) each is incremented in place, and
    momentum=None means the cumulative average 1 / num_batches_tracked, as in the module.
    The normalized outputs are never saved for backward (see the module docstring). weights:
    1-D, len(ys) + len(zs) + len(pf) entries in that order, or any length with w_index
    giving each candidate's entry (an edge's whole row, `none` included: entries no candidate
    reads get a zero gradient). pf non-empty: x is the stride-1 edge input of mixed_op_pf and
    every y, z has its shape; pf empty: x is not used.
    """
    if len(zs) == 0:
        raise ValueError("mixed_op_bn: zs is empty (use mixed_op / mixed_op_pf)")
    out, _ = torch.ops.gaea.mixed_op_bn(x, list(ys), list(zs), weights, [pf_code(op) for op in pf],
                                        list(running_means), list(running_vars), list(num_batches_tracked),
                                        None if momentum is None else float(momentum), float(eps),
                                        list(w_index))
    return out
