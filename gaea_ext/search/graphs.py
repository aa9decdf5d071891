"""`gaea search --cuda-graphs`: the whole search step (architecture step, weight step, both
optimizer steps) recorded once as a CUDA graph and replayed for every minibatch.

At NB201's widths a GPU step is mostly launch overhead: thousands of small kernels, each a few
microseconds of work. A replayed graph launches them all at once. What makes the step
capturable: static input buffers the batches are copied into; SGD with its learning rate as a
device tensor (fused SGD; the scheduler fills the tensor between epochs); the EG step's lr is a
constant and eg_update_ never syncs; clip_grad_norm_ scales on the device; autocast without
its weight cache. What does not fit, and is refused by config validation: host-side control
flow in the step (gaea-gdas samples, --prune-below), fp16 loss scaling (its overflow check
reads the device), data parallel runs, and --compile.

Every batch trains exactly once: the first `warmup` batches run eagerly on a side stream (as
capture requires; they also create the momentum buffers), the next is captured and then
replayed, and the rest are replayed. A step kind ("arch and weights" or "weights only", the
latter during --arch-warmup epochs) gets its own graph; when the kind changes the old graph is
released (with its private memory pool, about one step's activations) before the new one is
captured, so at most one is held. On a device other than CUDA the same
static-buffer path runs eagerly (`capture=False`), which is how its plumbing is tested here.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor


class GraphedStep:
    def __init__(self, step: Callable[..., Tuple[Tensor, Tensor]], warmup: int = 3, capture: bool = True):
        self.step, self.warmup, self.capture = step, warmup, capture
        self.static: Optional[Sequence[Tensor]] = None
        self.out: Optional[Tuple[Tensor, Tensor]] = None
        self.graph = None
        self.calls = 0
        self.released = False

    def __call__(self, *batch: Tensor) -> Tuple[Tensor, Tensor]:
        if self.static is None:
            self.static = [t.clone() for t in batch]
        for s, t in zip(self.static, batch):
            if s.shape != t.shape:
                raise RuntimeError(f"--cuda-graphs: batch shape {tuple(t.shape)} differs from the captured "
                                   f"{tuple(s.shape)} (training loaders drop the last partial batch)")
            s.copy_(t, non_blocking=True)
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            return self.out
        if not self.capture:
            return self.step(*self.static)
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(*self.static)
            torch.cuda.current_stream().wait_stream(side)
            return out
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a data-loading thread touching CUDA meanwhile must not void the capture.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = self.step(*self.static)
        self.graph.replay()  # capture only records: this batch's step runs now
        return self.out

    def release(self) -> None:
        """Drop the graph, its outputs and static inputs, so its private memory pool can be
        freed (torch returns the pool's blocks once no graph or tensor holds them)."""
        if self.graph is not None:
            self.graph.reset()
        self.graph, self.out, self.static = None, None, None
        self.released = True
