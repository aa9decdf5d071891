"""mixed_op_bn: a mixed op whose candidates end in BatchNorm(affine=False), normalized inside.

In a search supernet every parametric candidate ends in BatchNorm(affine=False) (NB201's
ReLU-Conv-BN, DARTS' separable and dilated convs, DARTS' pools + BN). Run as modules, each
candidate's BN keeps its input z for its backward and the mixed op keeps the normalized
output y = (z - mean) * invstd for the weight gradient: two tensors of the edge's size per
candidate. Here the BN's training-mode forward (batch statistics, running-stat update) runs
inside one op together with the fused mixed op, and only z and the per-channel statistics are
saved: backward recomputes y from them with one elementwise pass, hands it to the fused
backward kernel (which returns the weight gradients and grad_y = w * grad), and finishes with
aten's own batch-norm backward. The y tensors live only while the op runs.

The kernels are the fused mixed_op / mixed_op_pf (csrc/); this module is autograd glue around
them and aten's batch norm, registered as a custom op so torch.compile and opcheck see one
opaque node. Its pure-PyTorch twin is gaea_ext.reference.mixed_op_bn (BatchNorm via
F.batch_norm, then the reference mixed op), which is what `--no-fused` runs in effect.
No second derivative: backward raises under create_graph (search never needs one).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

import gaea_ext.ops  # noqa: F401  (loads the extension and the mixed_op / mixed_op_pf registrations)
from gaea_ext.reference import _acc, pf_code

__all__ = ["mixed_op_bn"]


def _channel_view(v: Tensor, z: Tensor) -> Tensor:
    return v.view(1, -1, *([1] * (z.dim() - 2))) if z.dim() > 1 else v


def _normalize(z: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    # The same y as native_batch_norm's forward up to rounding (~1 ulp): computed in the
    # statistics' type, stored in z's dtype and layout.
    return ((z.to(mean.dtype) - _channel_view(mean, z)) * _channel_view(invstd, z)).to(z.dtype)


def _mix(x: Tensor, ys: List[Tensor], weights: Tensor, pf: List[int]) -> Tensor:
    if pf:
        return torch.ops.gaea.mixed_op_pf(x, ys, weights, pf)
    return torch.ops.gaea.mixed_op(ys, weights)


# Functional (torch only accepts autograd formulas for functional custom ops): the updated
# running statistics come back as a third output, [Z, 2, C] (means, vars), which the Python
# wrapper copies into the buffers; without running statistics it is empty.
@torch.library.custom_op("gaea::mixed_op_bn", mutates_args=())
def _mixed_op_bn(x: Tensor, ys: List[Tensor], zs: List[Tensor], weights: Tensor, pf: List[int],
                 running_means: List[Tensor], running_vars: List[Tensor], momentum: float,
                 eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    torch._check(len(zs) >= 1, lambda: "mixed_op_bn: zs is empty (use mixed_op / mixed_op_pf)")
    torch._check(len(running_means) == len(running_vars) and len(running_means) in (0, len(zs)),
                 lambda: "mixed_op_bn: give running_means and running_vars for every z, or none")
    normed, stats, running = [], [], []
    for k, z in enumerate(zs):
        rm = running_means[k].clone() if running_means else None
        rv = running_vars[k].clone() if running_vars else None
        y, mean, invstd = torch.ops.aten.native_batch_norm(z, None, None, rm, rv, True, momentum, eps)
        normed.append(y)
        stats.append(torch.stack([mean, invstd]))
        if rm is not None:
            running.append(torch.stack([rm, rv]))
    out = _mix(x, [*ys, *normed], weights, pf)
    new_running = torch.stack(running) if running else zs[0].new_empty((0,), dtype=_acc(zs[0].dtype))
    return out, torch.stack(stats), new_running


@_mixed_op_bn.register_fake
def _(x, ys, zs, weights, pf, running_means, running_vars, momentum, eps):
    torch._check(len(zs) >= 1, lambda: "mixed_op_bn: zs is empty (use mixed_op / mixed_op_pf)")
    z = zs[0]
    fake_ys = [*ys, *(torch.empty_like(z) for z in zs)]
    out = (torch.ops.gaea.mixed_op_pf(x, fake_ys, weights, pf) if pf
           else torch.ops.gaea.mixed_op(fake_ys, weights))
    stats = z.new_empty((len(zs), 2, z.shape[1]), dtype=_acc(z.dtype))
    if running_means:
        running = running_means[0].new_empty((len(zs), 2, running_means[0].shape[0]))
    else:
        running = z.new_empty((0,), dtype=_acc(z.dtype))
    return out, stats, running


def _setup_context(ctx, inputs, output):
    x, ys, zs, weights, pf, _, _, _, eps = inputs
    ctx.pf, ctx.eps, ctx.K, ctx.Z = list(pf), eps, len(ys), len(zs)
    ctx.n_running = len(inputs[5])
    ctx.ys_mask = [y.requires_grad for y in ys] + [z.requires_grad for z in zs]
    ctx.x_grad = x.requires_grad and len(pf) > 0
    ctx.weights_grad = weights.requires_grad
    # x only when a pf candidate must be recomputed from it; never the normalized outputs.
    ctx.save_for_backward(x if pf else None, *ys, *zs, weights, output[1])


def _backward(ctx, grad, _grad_stats, _grad_running):
    if torch.is_grad_enabled():
        raise RuntimeError("mixed_op_bn has no second derivative; run this with --no-fused "
                           "(gaea_ext.reference.mixed_op_bn) to differentiate twice")
    x, *rest = ctx.saved_tensors
    ys, zs, (weights, stats) = rest[:ctx.K], rest[ctx.K:ctx.K + ctx.Z], rest[ctx.K + ctx.Z:]
    normed = [_normalize(z, stats[k, 0], stats[k, 1]) for k, z in enumerate(zs)]
    all_ys = [*ys, *normed]
    if ctx.pf:
        grad_all, grad_x, grad_w = torch.ops.gaea.mixed_op_pf_backward(
            grad, x, all_ys, weights, ctx.pf, ctx.ys_mask, ctx.x_grad, ctx.weights_grad)
    else:
        grad_all, grad_w = torch.ops.gaea.mixed_op_backward(grad, all_ys, weights, ctx.ys_mask,
                                                            ctx.weights_grad)
        grad_x = None
    given = iter(grad_all)
    grad_all = [next(given) if needed else None for needed in ctx.ys_mask]
    grad_zs = []
    for k, z in enumerate(zs):
        gy = grad_all[ctx.K + k]
        if gy is None:
            grad_zs.append(None)
            continue
        gz, _, _ = torch.ops.aten.native_batch_norm_backward(
            gy, z, None, None, None, stats[k, 0], stats[k, 1], True, ctx.eps, [True, False, False])
        grad_zs.append(gz)
    # The returned structure must match the inputs': an int list is one leaf (None) unless
    # empty, a tensor list is a list.
    no_stats = [None] * ctx.n_running
    return ((grad_x if ctx.x_grad else None), grad_all[:ctx.K], grad_zs,
            (grad_w if ctx.weights_grad else None), (None if ctx.pf else []), no_stats, list(no_stats),
            None, None)


_mixed_op_bn.register_autograd(_backward, setup_context=_setup_context)


def mixed_op_bn(x: Tensor, ys: Sequence[Tensor], zs: Sequence[Tensor], weights: Tensor,
                pf: Sequence[Union[int, str]] = (), running_means: Sequence[Tensor] = (),
                running_vars: Sequence[Tensor] = (), momentum: float = 0.1,
                eps: float = 1e-5) -> Tensor:
    """mixed_op over [*ys, *(BN(z) for z in zs), *(pf_j(x) for j in pf)].

    BN is BatchNorm(affine=False) in training mode: batch statistics over all dims but 1,
    and, when running_means / running_vars are given (one pair per z), their in-place update
    with `momentum` (unbiased variance), as nn.BatchNorm2d in train() does. The
    normalized outputs are never saved for backward (see the module docstring). weights:
    1-D, len(ys) + len(zs) + len(pf) entries in that order. pf non-empty: x is the stride-1
    edge input of mixed_op_pf and every y, z has its shape; pf empty: x is not used.
    """
    if len(zs) == 0:
        raise ValueError("mixed_op_bn: zs is empty (use mixed_op / mixed_op_pf)")
    running_means, running_vars = list(running_means), list(running_vars)
    out, _, running = _mixed_op_bn(x, list(ys), list(zs), weights, [pf_code(op) for op in pf],
                                   running_means, running_vars, float(momentum), float(eps))
    with torch.no_grad():
        for k, (rm, rv) in enumerate(zip(running_means, running_vars)):
            rm.copy_(running[k, 0])
            rv.copy_(running[k, 1])
    return out
