"""Public fused ops, with the fake (meta) kernels and autograd formulas torch needs.

The kernels are registered from C++ (csrc/); this module only adds what torch.compile and
autograd need on top, and the typed Python entry points.
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch
from torch import Tensor

__all__ = ["mixed_op", "eg_update_"]


def _common_format(ys: Sequence[Tensor]) -> torch.memory_format:
    # Mirrors gaea::common_format in csrc/common.cpp: outputs keep a layout all ys share.
    formats = [torch.contiguous_format]
    if ys[0].dim() == 4:
        formats.append(torch.channels_last)
    elif ys[0].dim() == 5:
        formats.append(torch.channels_last_3d)
    for fmt in formats:
        if all(y.is_contiguous(memory_format=fmt) for y in ys):
            return fmt
    return torch.contiguous_format


def _like(ys: Sequence[Tensor]) -> Tensor:
    y = ys[0]
    return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=_common_format(ys))


@torch.library.register_fake("gaea::mixed_op")
def _mixed_op_fake(ys, weights):
    torch._check(len(ys) >= 1, lambda: "mixed_op: ys is an empty list")
    torch._check(weights.dim() == 1 and weights.shape[0] == len(ys),
                 lambda: f"mixed_op: weights must be 1-D of length {len(ys)}")
    return _like(ys)


@torch.library.register_fake("gaea::mixed_op_backward")
def _mixed_op_backward_fake(grad, ys, weights, ys_mask, weights_grad=True):
    grad_ys = [_like(ys) for needed in ys_mask if needed]
    return grad_ys, weights.new_empty(len(ys))


@torch.library.register_fake("gaea::eg_update_")
def _eg_update_fake(params, grads, lr, lr_tensor, eps):
    return params[0].new_empty((), dtype=torch.long)


def _setup_context(ctx, inputs, output):
    ys, weights = inputs
    ctx.ys_mask = [y.requires_grad for y in ys]
    ctx.weights_grad = weights.requires_grad
    ctx.save_for_backward(*ys, weights)


def _backward(ctx, grad):
    *ys, weights = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True: the fused backward has no derivative of its own, so build this
        # one from differentiable ops (second derivatives are rare in NAS; exactness matters).
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        w = weights.to(acc)
        grad_ys = [(w[k] * grad.to(acc)).to(y.dtype) if needed else None
                   for k, (y, needed) in enumerate(zip(ys, ctx.ys_mask))]
        grad_w = None
        if ctx.weights_grad:
            grad_w = torch.stack([(grad.to(acc) * y.to(acc)).sum() for y in ys]).to(weights.dtype)
        return grad_ys, grad_w
    grad_ys, grad_w = torch.ops.gaea.mixed_op_backward(grad, ys, weights, ctx.ys_mask, ctx.weights_grad)
    given = iter(grad_ys)
    grad_ys = [next(given) if needed else None for needed in ctx.ys_mask]
    return grad_ys, (grad_w if ctx.weights_grad else None)


torch.library.register_autograd("gaea::mixed_op", _backward, setup_context=_setup_context)


def mixed_op(ys: Sequence[Tensor], weights: Tensor) -> Tensor:
    """sum_k weights[k] * ys[k] in one pass, without stacking the K inputs.

    ys: K >= 1 tensors (K <= 64) of one shape, dtype (any float type) and device; any
    strides. weights: 1-D of length K, float32 or the ys dtype. Differentiable in both;
    the weight gradient is accumulated in float32 (float64 for float64) deterministically.
    """
    return torch.ops.gaea.mixed_op(list(ys), weights)


def eg_update_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    lr: Union[float, Tensor],
    eps: float = 1e-5,
) -> Tensor:
    """GAEA's exponentiated-gradient step on every row (last dim) of every param, in place.

    p <- p * exp(-lr * g); p <- clamp(p, min=eps); p <- p / sum(p), computed in the log
    domain so it cannot overflow. A row whose grad (or param) is not finite is left as is.
    lr may be a 0-d tensor on the params' device, which keeps the step free of host syncs
    (CUDA-graph capturable). Returns the number of rows skipped, as a 0-d int64 tensor.
    """
    params: List[Tensor] = list(params)
    grads: List[Tensor] = list(grads)
    if not params:
        # With a float lr and no tensor at all the dispatcher cannot pick a kernel and raises
        # its own, unhelpful, error before csrc's check could run.
        raise RuntimeError("eg_update_: params is an empty list")
    with torch.no_grad():  # an optimizer step: never recorded by autograd
        if isinstance(lr, Tensor):
            return torch.ops.gaea.eg_update_(params, grads, 0.0, lr, float(eps))
        return torch.ops.gaea.eg_update_(params, grads, float(lr), None, float(eps))
