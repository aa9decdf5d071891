"""Data parallelism with torch.distributed (gloo on CPU, nccl on GPU), launched by torchrun.

Gradients are averaged with one flattened all-reduce per step instead of wrapping the model
in DDP: the search alternates two optimizers over disjoint parameter sets, and reducing only
the set being stepped halves the traffic. Every rank applies the same averaged gradient with
the same deterministic update, so architecture weights stay identical across ranks.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Tuple

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


# The group the stop flags travel on (faults.Guard): CPU tensors over gloo, so agreeing on a
# signal never waits for a GPU. None: the default group, when that is gloo already.
_control: Optional[dist.ProcessGroup] = None


def init(device: torch.device) -> tuple[int, int]:
    """(rank, world_size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        # torch.distributed.nn binds ``group.WORLD`` as a default argument when it is imported,
        # and torch.optim imports it lazily (through torch._dynamo) when the first optimizer is
        # built. Imported after the group exists, it keeps the group alive past
        # destroy_process_group, so gloo's worker threads outlive shutdown() and can free a
        # Python-owned tensor during interpreter exit (std::terminate, SIGABRT). Imported first,
        # it binds None.
        import torch.distributed.nn  # noqa: F401

        backend = "nccl" if device.type == "cuda" else "gloo"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart in ("", "0"):
            dist.init_process_group(backend)
        else:
            # A torchrun restart reuses the agent's store, which still holds the dead group's
            # addresses (gloo would connect to them and time out): key this group by attempt.
            store, rank, size = next(dist.rendezvous("env://"))
            dist.init_process_group(backend, store=dist.PrefixStore(f"gaea/attempt{restart}", store),
                                    rank=rank, world_size=size)
        global _control
        _control = dist.new_group(backend="gloo") if backend != "gloo" else None
    return dist.get_rank(), dist.get_world_size()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_grads(params: Iterable[torch.Tensor]) -> None:
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(r)


def broadcast_state(module: torch.nn.Module) -> None:
    """Start every rank from rank 0's parameters and buffers."""
    if not active():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def all_reduce_sum(values: list[float], device) -> list[float]:
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def max_async(value: int) -> Tuple[dist.Work, torch.Tensor]:
    """Start an all-reduce (max) of one integer over the ranks, on the CPU; (work, tensor)."""
    t = torch.tensor([value], dtype=torch.int64)
    return dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control, async_op=True), t


def all_gather_values(values: list[float], device) -> list[list[float]]:
    """Every rank's ``values`` (float64, so float32 and integer counts come back exact)."""
    if not active():
        return [list(values)]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        # Tear down only after every rank is done talking: a rank that destroys its group while
        # a peer is still in a collective can abort the peer (gloo: std::terminate).
        dist.barrier()
        dist.destroy_process_group()
    global _control
    _control = None
