"""GAEA's single-level search step for any model with MixedOps (Li et al., ICLR 2021).

Single-level ERM: the architecture rows and the network weights minimize the same training
loss. Each step first takes the architecture gradient on an independent training minibatch
and applies it with ExpGrad (exponentiated gradient, so the rows stay on the simplex), then
takes the weight step on its own minibatch with the architecture fixed: its rows are marked
as not requiring grad for that forward/backward, so the kernels do not compute their weight
gradients at all.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["gaea_step"]

Batch = Tuple[torch.Tensor, torch.Tensor]


def _params(opt: torch.optim.Optimizer) -> Sequence[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def gaea_step(model: nn.Module, loss_fn: Callable, batch: Batch, arch_batch: Optional[Batch],
              weight_opt: torch.optim.Optimizer, arch_opt: torch.optim.Optimizer,
              grad_clip: Optional[float] = 5.0) -> torch.Tensor:
    """One GAEA step; returns the weight step's loss (detached). arch_batch=None skips the
    architecture step (a warm-up). The model is called as model(x); its MixedOps read the
    rows ArchParameters bound to them, which arch_opt (an ExpGrad) steps."""
    arch = _params(arch_opt)
    if arch_batch is not None:
        xa, ya = arch_batch
        grads = torch.autograd.grad(loss_fn(model(xa), ya), arch, allow_unused=True)
        for p, g in zip(arch, grads):
            p.grad = g
        arch_opt.step()
    x, y = batch
    weight_opt.zero_grad(set_to_none=True)
    wanted = [p.requires_grad for p in arch]
    for p in arch:
        p.requires_grad_(False)
    try:
        loss = loss_fn(model(x), y)
        loss.backward()
    finally:
        for p, w in zip(arch, wanted):
            p.requires_grad_(w)
    if grad_clip:
        nn.utils.clip_grad_norm_(_params(weight_opt), grad_clip)
    weight_opt.step()
    return loss.detach()
