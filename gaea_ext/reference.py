"""Pure-PyTorch twins of the fused ops: same signatures, same semantics.

They are the correctness oracle in the tests, the A/B baseline in the benchmarks, and what
`--no-fused` runs. Arithmetic follows the kernels: float32 for half types, float64 for float64.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mixed_op", "mixed_op_pf", "mixed_op_bn", "pf_candidate", "PF_CODES", "eg_update_", "eg_update_formula_"]

# Parameter-free candidates of mixed_op_pf, by name and by the op's int code.
PF_CODES = {"skip_connect": 1, "avg_pool_3x3": 2, "max_pool_3x3": 3}


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def mixed_op(ys: Sequence[Tensor], weights: Tensor) -> Tensor:
    """sum_k weights[k] * ys[k], evaluated eagerly with autograd."""
    if len(ys) == 0:
        raise ValueError("mixed_op: ys is an empty list")
    if weights.dim() != 1 or weights.shape[0] != len(ys):
        raise ValueError(f"mixed_op: weights must be 1-D of length {len(ys)}, got {tuple(weights.shape)}")
    acc = _acc(ys[0].dtype)
    w = weights.to(acc)
    out = w[0] * ys[0].to(acc)
    for k in range(1, len(ys)):
        out = out + w[k] * ys[k].to(acc)
    return out.to(ys[0].dtype)


def pf_code(op: Union[int, str]) -> int:
    code = PF_CODES.get(op, op) if isinstance(op, str) else int(op)
    if code not in PF_CODES.values():
        raise ValueError(f"mixed_op_pf: {op!r} is not a parameter-free op ({', '.join(PF_CODES)} or 1, 2, 3)")
    return code


def pf_candidate(x: Tensor, op: Union[int, str]) -> Tensor:
    """A parameter-free candidate's output, as NB201's and DARTS' bare ops compute it (stride 1)."""
    code = pf_code(op)
    if code == 1:
        return x
    if code == 2:
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return F.max_pool2d(x, 3, stride=1, padding=1)


def mixed_op_pf(x: Tensor, ys: Sequence[Tensor], weights: Tensor, pf: Sequence[Union[int, str]]) -> Tensor:
    """mixed_op over ys followed by the parameter-free candidates of x named in pf, which
    this twin materializes (the fused op does not)."""
    codes = [pf_code(op) for op in pf]
    if len(set(codes)) != len(codes):
        raise ValueError(f"mixed_op_pf: pf names an op twice: {list(pf)}")
    return mixed_op([*ys, *(pf_candidate(x, c) for c in codes)], weights)


def mixed_op_bn(x: Tensor, ys: Sequence[Tensor], zs: Sequence[Tensor], weights: Tensor,
                pf: Sequence[Union[int, str]] = (), running_means: Sequence[Tensor] = (),
                running_vars: Sequence[Tensor] = (), momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """mixed_op_pf over [*ys, *(BatchNorm(affine=False, train)(z) for z in zs)] and pf: the
    candidates' BatchNorms run as F.batch_norm, and autograd keeps what they and the mix save."""
    if len(zs) == 0:
        raise ValueError("mixed_op_bn: zs is empty (use mixed_op / mixed_op_pf)")
    rms = list(running_means) or [None] * len(zs)
    rvs = list(running_vars) or [None] * len(zs)
    normed = [F.batch_norm(z, rm, rv, training=True, momentum=momentum, eps=eps)
              for z, rm, rv in zip(zs, rms, rvs)]
    return mixed_op_pf(x, [*ys, *normed], weights, pf)


@torch.no_grad()
def eg_update_(
    params: Sequence[Tensor], grads: Sequence[Tensor], lr: Union[float, Tensor], eps: float = 1e-5
) -> Tensor:
    """Overflow-safe exponentiated-gradient step; rows with non-finite grads are skipped.

    A non-finite float lr raises; a non-finite lr tensor skips (and counts) every row, as the
    kernels do (they never read a device lr on the host).

    Returns the number of skipped rows as a 0-d int64 tensor on the params' device.
    """
    if not isinstance(lr, Tensor) and not math.isfinite(lr):
        raise RuntimeError(f"eg_update_: lr must be finite, got {lr}")
    skipped = torch.zeros((), dtype=torch.long, device=params[0].device)
    for p, g in zip(params, grads, strict=True):
        acc = _acc(p.dtype)
        step = lr.to(device=p.device, dtype=acc) if isinstance(lr, Tensor) else lr
        logits = torch.log(p.to(acc)) - step * g.to(acc)
        if eps > 0:
            logits = logits.clamp(min=math.log(eps))
        bad = (
            ~torch.isfinite(torch.as_tensor(step, device=p.device))  # a non-finite lr tensor: every row
            | ~torch.isfinite(g).all(-1)
            | torch.isnan(logits).any(-1)
            | (logits == math.inf).any(-1)
            | (logits.amax(-1) == -math.inf)
        )
        new = torch.softmax(logits, dim=-1).to(p.dtype)
        p.copy_(torch.where(bad.unsqueeze(-1), p, new))
        skipped += bad.sum()
    return skipped


@torch.no_grad()
def eg_update_formula_(
    params: Sequence[Tensor], grads: Sequence[Tensor], lr: float, eps: float = 1e-5
) -> None:
    """The update exactly as written (and as GAEA's release runs it): one tensor at a time.

    Overflows to inf/NaN once |lr * g| is large; kept as the definition to test against and
    as the per-tensor-loop baseline in bench/.
    """
    for p, g in zip(params, grads, strict=True):
        p.mul_(torch.exp(-lr * g))
        p.clamp_(min=eps)
        p.div_(p.sum(dim=-1, keepdim=True))
