"""ExpGrad: GAEA's exponentiated-gradient (mirror descent on the simplex) optimizer."""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from torch import Tensor

from gaea_ext import ops, reference

__all__ = ["ExpGrad"]


class ExpGrad(torch.optim.Optimizer):
    """p <- normalize(clamp(p * exp(-lr * grad), eps)) on every row (last dim) of each param.

    Params should start on the simplex (e.g. uniform rows). lr may be a float or a 0-d
    tensor on the params' device (a tensor keeps the step free of host syncs, so it can be
    captured in a CUDA graph). fused=False runs the pure-PyTorch twin.
    After each step, `nonfinite_rows` holds the number of rows left unchanged because their
    gradient was not finite (a 0-d tensor; reading it syncs with the device).
    """

    def __init__(self, params, lr=0.1, eps: float = 1e-5, fused: bool = True):
        if not isinstance(lr, Tensor) and not lr >= 0:
            raise ValueError(f"ExpGrad: invalid learning rate {lr}")
        if not eps >= 0:
            raise ValueError(f"ExpGrad: eps must be >= 0, got {eps}")
        super().__init__(params, dict(lr=lr, eps=eps, fused=fused))
        self.nonfinite_rows: Optional[Tensor] = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        total = None
        for group in self.param_groups:
            by_device = defaultdict(lambda: ([], []))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ExpGrad does not support sparse gradients")
                ps, gs = by_device[p.device]
                ps.append(p)
                gs.append(p.grad)
            update = ops.eg_update_ if group["fused"] else reference.eg_update_
            for ps, gs in by_device.values():
                n = update(ps, gs, group["lr"], group["eps"])
                total = n if total is None else total + n.to(total.device)
        self.nonfinite_rows = total
        return loss
