"""Public fused ops, with the fake (meta) kernels and autograd formulas torch needs.

The kernels are registered from C++ (csrc/); this module only adds what torch.compile and
autograd need on top, and the typed Python entry points.
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch
from torch import Tensor

from gaea_ext.reference import pf_code

__all__ = ["mixed_op", "mixed_op_pf", "eg_update_"]


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


# ---- mixed_op_pf --------------------------------------------------------------------------


def _pf_like(x: Tensor, ys: Sequence[Tensor]) -> Tensor:
    # Mirrors prepare_pf_forward in csrc/common.cpp: the layout x and every y share
    # (contiguous or channels_last), else contiguous.
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_common_format([x, *ys]))


@torch.library.register_fake("gaea::mixed_op_pf")
def _mixed_op_pf_fake(x, ys, weights, pf):
    torch._check(x.dim() in (3, 4), lambda: "mixed_op_pf: x must be 3-D or 4-D")
    torch._check(len(ys) + len(pf) >= 1, lambda: "mixed_op_pf: no candidates")
    torch._check(weights.dim() == 1 and weights.shape[0] == len(ys) + len(pf),
                 lambda: f"mixed_op_pf: weights must be 1-D of length {len(ys) + len(pf)}")
    return _pf_like(x, ys)


@torch.library.register_fake("gaea::mixed_op_pf_backward")
def _mixed_op_pf_backward_fake(grad, x, ys, weights, pf, ys_mask, x_grad=True, weights_grad=True):
    grad_ys = [_pf_like(x, ys) for needed in ys_mask if needed]
    grad_x = _pf_like(x, ys) if (x_grad and len(pf) > 0) else x.new_empty(0)
    return grad_ys, grad_x, weights.new_empty(len(ys) + len(pf))


_POOL = dict(kernel_size=[3, 3], stride=[1, 1], padding=[1, 1])


def _pf_vjp(x: Tensor, code: int, g: Tensor) -> Tensor:
    """The parameter-free candidate's vector-Jacobian product, from differentiable aten ops
    (each of these backward ops has its own derivative registered)."""
    if code == 1:
        return g
    k, st, pad = _POOL["kernel_size"], _POOL["stride"], _POOL["padding"]
    if code == 2:
        return torch.ops.aten.avg_pool2d_backward(g, x, k, st, pad, False, False, None)
    _, idx = torch.ops.aten.max_pool2d_with_indices(x.detach(), k, st, pad)
    return torch.ops.aten.max_pool2d_with_indices_backward(g, x, k, st, pad, [1, 1], False, idx)


def _no_grad_for(pf):
    # register_autograd matches the returned structure against the inputs': an int list is
    # one leaf (None), but an empty list looks like an empty tensor list ([]).
    return None if pf else []


def _pf_setup_context(ctx, inputs, output):
    x, ys, weights, pf = inputs
    ctx.pf = list(pf)
    ctx.ys_mask = [y.requires_grad for y in ys]
    ctx.x_grad = x.requires_grad
    ctx.weights_grad = weights.requires_grad
    # x, the ys and the weights only: the pooled candidates are recomputed from x.
    ctx.save_for_backward(x, *ys, weights)


def _pf_backward(ctx, grad):
    from gaea_ext.reference import pf_candidate

    x, *ys, weights = ctx.saved_tensors
    x_grad = ctx.x_grad and len(ctx.pf) > 0
    if torch.is_grad_enabled():
        # create_graph=True: as mixed_op, exact eager formulas that autograd can differentiate.
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        w, g, xa = weights.to(acc), grad.to(acc), x.to(acc)
        K = len(ys)
        grad_ys = [(w[k] * g).to(y.dtype) if needed else None
                   for k, (y, needed) in enumerate(zip(ys, ctx.ys_mask))]
        grad_x = None
        if x_grad:
            grad_x = sum(_pf_vjp(xa, c, w[K + j] * g) for j, c in enumerate(ctx.pf)).to(x.dtype)
        grad_w = None
        if ctx.weights_grad:
            terms = [*(y.to(acc) for y in ys), *(pf_candidate(xa, c) for c in ctx.pf)]
            grad_w = torch.stack([(g * t).sum() for t in terms]).to(weights.dtype)
        return grad_x, grad_ys, grad_w, _no_grad_for(ctx.pf)
    grad_ys, grad_x, grad_w = torch.ops.gaea.mixed_op_pf_backward(
        grad, x, ys, weights, ctx.pf, ctx.ys_mask, x_grad, ctx.weights_grad)
    given = iter(grad_ys)
    grad_ys = [next(given) if needed else None for needed in ctx.ys_mask]
    return (grad_x if x_grad else None), grad_ys, (grad_w if ctx.weights_grad else None), _no_grad_for(ctx.pf)


torch.library.register_autograd("gaea::mixed_op_pf", _pf_backward, setup_context=_pf_setup_context)


def mixed_op_pf(x: Tensor, ys: Sequence[Tensor], weights: Tensor, pf: Sequence[Union[int, str]]) -> Tensor:
    """mixed_op over [*ys, *(pf_j(x) for j in pf)] without materializing the pf_j(x).

    x: the edge input, 3-D (C, H, W) or 4-D (B, C, H, W), any float dtype. ys: the
    parametric candidates' outputs (K >= 0, K <= 64), each of x's shape, dtype and device
    (stride-1 edges). pf: distinct parameter-free ops, by name or code: "skip_connect" (1),
    "avg_pool_3x3" (2; stride 1, pad 1, count_include_pad=False) and "max_pool_3x3" (3;
    stride 1, pad 1, PyTorch's tie and NaN rules). weights: 1-D, len(ys) + len(pf) entries,
    the ys' first, float32 or x's dtype.

    The output is channels_last when x and every y are, else contiguous (other layouts are
    copied first). Differentiable in x, ys and weights; autograd saves x, ys and weights only.
    Weight gradients are accumulated in float32 (float64 for float64) deterministically.
    """
    return torch.ops.gaea.mixed_op_pf(x, list(ys), weights, [pf_code(op) for op in pf])


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

    A non-finite float lr raises. A non-finite lr tensor is not checked on the host (that
    would sync): every row is left unchanged and counted, on the CPU and on CUDA alike. A CPU
    lr tensor with CUDA params is read on the host at each call, so it is refused while a
    CUDA graph is being captured (the graph would keep its first value).
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
