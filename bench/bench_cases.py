"""Benchmark cases shared by the pytest-benchmark suite (test_bench_kernels.py) and the
standalone interleaved timer (kernels.py).

Every case allocates its inputs once; a contender is a zero-argument callable that runs one
step on those buffers. Contender callables never synchronize: pytest wraps them with
torch.cuda.synchronize(), kernels.py brackets them with CUDA events.

Contenders
----------
mixed_op (forward; forward+backward wrt every ys[k] and the weights):
  fused     gaea_ext.mixed_op(ys, weights)
  eager     sum(w * y for w, y in zip(weights, ys)) with autograd, as DARTS / PC-DARTS /
            GAEA release run it: sum(w * op(x) for w, op in zip(weights, self._ops))
  compiled  torch.compile (default mode, dynamic=False) of that same expression, compiled
            and warmed up before timing

eg_update_ (DARTS-sized architecture parameters: alphas 14x8 normal/reduce, betas of
lengths 2..5 normal/reduce, 10 tensors, float32):
  fused       gaea_ext.eg_update_
  loop        gaea_ext.reference.eg_update_formula_ (per-tensor Python loop, GAEA release)
  foreach     torch._foreach_* chain (foreach_eg_update_ below)
  ref-safe    gaea_ext.reference.eg_update_ (overflow-safe log-domain loop)

NB201 edge (forward+backward of the edge's mix on x, z1, z2 = the two convolutions' outputs
before their BatchNorm(affine=False), skip and avg_pool_3x3 of x; weights [z1, z2, skip, avg];
BN without running statistics so every call is the same):
  fused     gaea_ext.mixed_op_bn(x, [], [z1, z2], weights, (skip, avg))
  eager     the DARTS expression sum(w * op) over [BN(z1), BN(z2), x, avg_pool(x)] (F.batch_norm)

Bytes that must move (for GB/s), N = elements of one ys tensor, s = element size:
  mixed_op forward           (K+1)·N·s
  mixed_op forward+backward  (K+1)·N·s + (2K+1)·N·s
  eg_update_                 3 · (total elements) · s
  NB201 edge fwd+bwd         17·N·s: forward reads z1, z2 for the statistics, then x, z1, z2
                             and writes out (6N); backward reads g, x, z1, z2 for the weight
                             gradients and BN sums, then g, x, z1, z2 again to write grad_x,
                             grad_z1, grad_z2 (11N)
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

import gaea_ext
from gaea_ext import reference

SHAPE = (64, 16, 32, 32)
KS = (5, 8)
MIXED_CONTENDERS = ("fused", "eager", "compiled")
EG_CONTENDERS = ("fused", "loop", "foreach", "ref-safe")
# alpha_normal, alpha_reduce (14 edges x 8 ops), then betas per intermediate node, normal
# then reduce: node i of the 4 intermediate nodes has i + 2 incoming edges.
EG_SHAPES = ((14, 8), (14, 8), (2,), (3,), (4,), (5,), (2,), (3,), (4,), (5,))
EG_LR = 0.1
EG_EPS = 1e-5

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
               torch.float64: "fp64"}


class Unavailable(Exception):
    """A contender that cannot run here (no kernel for the device, compile failure)."""


def devices() -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def mixed_dtypes(device: str) -> List[torch.dtype]:
    # bf16 only where it is a first-class training dtype for these shapes.
    return [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]


def elem_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def mixed_bytes(K: int, dtype: torch.dtype, backward: bool, shape=SHAPE) -> int:
    n = math.prod(shape)
    s = elem_size(dtype)
    fwd = (K + 1) * n * s
    return fwd + (2 * K + 1) * n * s if backward else fwd


def eg_bytes(dtype: torch.dtype = torch.float32, shapes=EG_SHAPES) -> int:
    return 3 * sum(math.prod(s) for s in shapes) * elem_size(dtype)


def mixed_group(device: str, dtype: torch.dtype, K: int, backward: bool) -> str:
    return f"mixed_op {'fwd+bwd' if backward else 'fwd'} {device} {DTYPE_NAMES[dtype]} K={K}"


def edge_bytes(dtype: torch.dtype, shape=SHAPE) -> int:
    return 17 * math.prod(shape) * elem_size(dtype)


def edge_group(device: str, dtype: torch.dtype) -> str:
    return f"nb201 edge fwd+bwd {device} {DTYPE_NAMES[dtype]}"


def eg_group(device: str, dtype: torch.dtype = torch.float32) -> str:
    return f"eg_update_ darts {device} {DTYPE_NAMES[dtype]}"


# --------------------------------------------------------------------------- baselines


def eager_mixed(ys: Sequence[Tensor], weights: Tensor) -> Tensor:
    """The DARTS MixedOp reduction, verbatim (Python's sum starts from the int 0)."""
    return sum(w * y for w, y in zip(weights, ys))


def _fresh_eager_mixed() -> Callable:
    # A distinct code object per compiled contender: dynamo keys its cache (and its recompile
    # limit) on the code object, so each case gets exactly one compiled entry and one guard.
    code = eager_mixed.__code__.replace()
    return types.FunctionType(code, eager_mixed.__globals__, eager_mixed.__name__)


@torch.no_grad()
def foreach_eg_update_(params: List[Tensor], grads: List[Tensor], lr: float, eps: float) -> None:
    """p <- p * exp(-lr g); p <- max(p, eps); p <- p / sum(p) with torch._foreach_* ops."""
    factors = torch._foreach_mul(grads, -lr)
    torch._foreach_exp_(factors)
    torch._foreach_mul_(params, factors)
    torch._foreach_clamp_min_(params, eps)
    sums = [p.sum(dim=-1, keepdim=True) for p in params]
    torch._foreach_div_(params, sums)


# --------------------------------------------------------------------------- cases


@dataclass
class Contender:
    name: str
    fn: Optional[Callable[[], Any]] = None
    skip: Optional[str] = None  # why it cannot run here


@dataclass
class Case:
    group: str
    kind: str  # "mixed_fwd" | "mixed_fwdbwd" | "eg_update"
    device: str
    dtype: torch.dtype
    K: Optional[int]
    nbytes: int
    contenders: Dict[str, Contender] = field(default_factory=dict)

    def extra_info(self, contender: str) -> Dict[str, Any]:
        info = {"case": self.group, "kind": self.kind, "contender": contender,
                "device": self.device, "dtype": DTYPE_NAMES[self.dtype], "bytes": self.nbytes}
        if self.K is not None:
            info["K"] = self.K
            info["shape"] = list(SHAPE)
        return info


class MixedInputs:
    """ys, weights and the upstream gradient, allocated once per case."""

    def __init__(self, device: str, dtype: torch.dtype, K: int, backward: bool, seed: int = 0):
        gen = torch.Generator(device="cpu").manual_seed(seed + K)
        self.ys = [torch.randn(SHAPE, generator=gen).to(device=device, dtype=dtype)
                   .requires_grad_(backward) for _ in range(K)]
        # Weights are a softmax over architecture logits in DARTS: float32 even for bf16 ys.
        self.weights = torch.softmax(torch.randn(K, generator=gen), 0).to(device)
        self.weights.requires_grad_(backward)
        self.grad_out = (torch.randn(SHAPE, generator=gen).to(device=device, dtype=dtype)
                         if backward else None)
        self.backward = backward

    def step_fn(self, f: Callable[[Sequence[Tensor], Tensor], Tensor]) -> Callable[[], Any]:
        ys, w, g = self.ys, self.weights, self.grad_out
        if not self.backward:
            return lambda: f(ys, w)
        inputs = [*ys, w]

        def fwd_bwd():
            out = f(ys, w)
            # autograd.grad, not .backward(): nothing accumulates into .grad across calls.
            return (out, *torch.autograd.grad(out, inputs, g))

        return fwd_bwd


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:200]


def make_mixed_contender(name: str, inputs: MixedInputs, warmup: int = 2) -> Contender:
    """Builds (and for `compiled`, compiles and warms up) one contender on shared inputs."""
    if name == "fused":
        fn = inputs.step_fn(gaea_ext.mixed_op)
        try:
            fn()
        except NotImplementedError as e:  # no kernel registered for this device
            return Contender(name, skip=f"fused kernel unavailable: {_first_line(e)}")
    elif name == "eager":
        fn = inputs.step_fn(eager_mixed)
        fn()
    elif name == "compiled":
        compiled = torch.compile(_fresh_eager_mixed(), dynamic=False)
        fn = inputs.step_fn(compiled)
        try:
            fn()  # compiles forward (and backward, on its first run) outside any timing
        except Exception as e:  # inductor needs a working C++/Triton toolchain
            return Contender(name, skip=f"torch.compile failed: {_first_line(e)}")
    else:
        raise ValueError(f"unknown mixed_op contender {name!r}")
    for _ in range(warmup):
        fn()
    return Contender(name, fn)


def mixed_meta(device: str, dtype: torch.dtype, K: int, backward: bool) -> Case:
    """The case's name, byte count and extra_info, without allocating anything."""
    return Case(mixed_group(device, dtype, K, backward),
                "mixed_fwdbwd" if backward else "mixed_fwd", device, dtype, K,
                mixed_bytes(K, dtype, backward))


def mixed_case(device: str, dtype: torch.dtype, K: int, backward: bool,
               contenders: Sequence[str] = MIXED_CONTENDERS, warmup: int = 2) -> Case:
    case = mixed_meta(device, dtype, K, backward)
    inputs = MixedInputs(device, dtype, K, backward)
    for name in contenders:
        case.contenders[name] = make_mixed_contender(name, inputs, warmup)
    return case


def eg_inputs(device: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """params on the simplex (softmax rows) and small gradients, one set per contender."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params, grads = [], []
    for shape in EG_SHAPES:
        params.append(torch.softmax(1e-3 * torch.randn(shape, generator=gen), -1)
                      .to(device=device, dtype=dtype))
        grads.append((0.1 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype))
    return params, grads


def make_eg_contender(name: str, device: str, dtype: torch.dtype = torch.float32,
                      warmup: int = 2) -> Contender:
    params, grads = eg_inputs(device, dtype)
    lr, eps = EG_LR, EG_EPS
    if name == "fused":
        fn = lambda: gaea_ext.eg_update_(params, grads, lr, eps)  # noqa: E731
        try:
            fn()
        except NotImplementedError as e:
            return Contender(name, skip=f"fused kernel unavailable: {_first_line(e)}")
    elif name == "loop":
        fn = lambda: reference.eg_update_formula_(params, grads, lr, eps)  # noqa: E731
    elif name == "foreach":
        fn = lambda: foreach_eg_update_(params, grads, lr, eps)  # noqa: E731
    elif name == "ref-safe":
        fn = lambda: reference.eg_update_(params, grads, lr, eps)  # noqa: E731
    else:
        raise ValueError(f"unknown eg_update_ contender {name!r}")
    for _ in range(warmup):
        fn()
    c = Contender(name, fn)
    c.params = params  # for the sanity check
    return c


def eg_meta(device: str, dtype: torch.dtype = torch.float32) -> Case:
    return Case(eg_group(device, dtype), "eg_update", device, dtype, None, eg_bytes(dtype))


def eg_case(device: str, dtype: torch.dtype = torch.float32,
            contenders: Sequence[str] = EG_CONTENDERS, warmup: int = 2) -> Case:
    case = eg_meta(device, dtype)
    for name in contenders:
        case.contenders[name] = make_eg_contender(name, device, dtype, warmup)
    return case


EDGE_CONTENDERS = ("fused", "eager")
EDGE_PF = ("skip_connect", "avg_pool_3x3")


def eager_edge(x: Tensor, zs: Sequence[Tensor], weights: Tensor) -> Tensor:
    ys = [torch.nn.functional.batch_norm(z, None, None, training=True) for z in zs]
    ys += [x, torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)]
    return sum(w * y for w, y in zip(weights, ys))


def fused_edge(x: Tensor, zs: Sequence[Tensor], weights: Tensor) -> Tensor:
    return gaea_ext.mixed_op_bn(x, [], zs, weights, EDGE_PF)


class EdgeInputs:
    """x, z1, z2, weights and the upstream gradient of one NB201 edge, allocated once."""

    def __init__(self, device: str, dtype: torch.dtype, seed: int = 0):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.x, self.z1, self.z2 = [torch.randn(SHAPE, generator=gen).to(device=device, dtype=dtype).requires_grad_()
                                    for _ in range(3)]
        self.weights = torch.softmax(torch.randn(4, generator=gen), 0).to(device).requires_grad_()
        self.grad_out = torch.randn(SHAPE, generator=gen).to(device=device, dtype=dtype)

    def step_fn(self, f: Callable) -> Callable[[], Any]:
        x, zs, w, g = self.x, [self.z1, self.z2], self.weights, self.grad_out

        def fwd_bwd():
            out = f(x, zs, w)
            return (out, *torch.autograd.grad(out, [x, *zs, w], g))

        return fwd_bwd


def edge_meta(device: str, dtype: torch.dtype) -> Case:
    return Case(edge_group(device, dtype), "edge_fwdbwd", device, dtype, None, edge_bytes(dtype))


def edge_case(device: str, dtype: torch.dtype, contenders: Sequence[str] = EDGE_CONTENDERS, warmup: int = 2) -> Case:
    case = edge_meta(device, dtype)
    inputs = EdgeInputs(device, dtype)
    for name in contenders:
        fn = inputs.step_fn(fused_edge if name == "fused" else eager_edge)
        try:
            fn()
        except NotImplementedError as e:
            case.contenders[name] = Contender(name, skip=f"fused kernel unavailable: {_first_line(e)}")
            continue
        for _ in range(warmup):
            fn()
        case.contenders[name] = Contender(name, fn)
    return case


def all_cases(device: str, warmup: int = 2, log: Callable[[str], None] = lambda s: None):
    """Every case for one device, in report order (built lazily: compiling takes a while)."""
    for backward in (False, True):
        for dtype in mixed_dtypes(device):
            for K in KS:
                log(f"building {mixed_group(device, dtype, K, backward)}")
                yield mixed_case(device, dtype, K, backward, warmup=warmup)
    for dtype in mixed_dtypes(device):
        log(f"building {edge_group(device, dtype)}")
        yield edge_case(device, dtype, warmup=warmup)
    log(f"building {eg_group(device)}")
    yield eg_case(device, warmup=warmup)


# --------------------------------------------------------------------------- sanity check


def _tol(dtype: torch.dtype) -> float:
    return 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4


def check_mixed(device: str, dtype: torch.dtype, K: int, backward: bool,
                fns: Dict[str, Callable[[], Any]]) -> List[str]:
    """Compares every contender's result with the float64 oracle; returns problems found.

    `fns` must have been built on inputs identical to MixedInputs(device, dtype, K, backward).
    """
    inputs = MixedInputs(device, dtype, K, backward)
    ys64 = [y.detach().double().requires_grad_(backward) for y in inputs.ys]
    w64 = inputs.weights.detach().double().requires_grad_(backward)
    with torch.enable_grad():
        want = [reference.mixed_op(ys64, w64)]
        if backward:
            want += list(torch.autograd.grad(want[0], [*ys64, w64], inputs.grad_out.double()))
    problems = []
    for name, fn in fns.items():
        got = fn()
        got = [got] if isinstance(got, Tensor) else list(got)
        for i, (g, w) in enumerate(zip(got, want)):
            what = "out" if i == 0 else ("grad_w" if i == len(want) - 1 else f"grad_ys[{i - 1}]")
            w = w.detach().to(g.device)
            # Max error relative to the result's magnitude (grad_w sums N products).
            err = ((g.detach().double() - w).abs().max() / w.abs().max().clamp(min=1)).item()
            if not err <= _tol(dtype):
                problems.append(f"{name}: {what} differs from the float64 oracle "
                                f"(max error {err:.3g} of its magnitude)")
    return problems


def check_eg(device: str, dtype: torch.dtype = torch.float32) -> List[str]:
    """One step of every eg_update_ contender from the same state vs the formula in float64."""
    problems = []
    p0, g0 = eg_inputs(device, dtype)
    want = [p.double() for p in p0]
    reference.eg_update_formula_(want, [g.double() for g in g0], EG_LR, EG_EPS)
    for name in EG_CONTENDERS:
        c = make_eg_contender(name, device, dtype, warmup=0)
        if c.skip:
            continue
        if name == "fused":  # already stepped once by the availability probe: restart
            for p, q in zip(c.params, p0):
                p.copy_(q)
        c.fn()
        for i, (p, w) in enumerate(zip(c.params, want)):
            if not torch.allclose(p.double(), w, rtol=1e-5, atol=1e-6):
                err = (p.double() - w).abs().max().item()
                problems.append(f"{name}: params[{i}] differs from the formula (max abs err {err:.3g})")
    return problems


def check_edge(device: str, dtype: torch.dtype, fns: Dict[str, Callable[[], Any]]) -> List[str]:
    """Every edge contender (built on EdgeInputs(device, dtype)) vs float64 eager_edge."""
    inputs = EdgeInputs(device, dtype)
    leaves = [t.detach().double().requires_grad_() for t in (inputs.x, inputs.z1, inputs.z2, inputs.weights)]
    with torch.enable_grad():
        out = eager_edge(leaves[0], leaves[1:3], leaves[3])
        want = [out, *torch.autograd.grad(out, leaves, inputs.grad_out.double())]
    names = ["out", "grad_x", "grad_z1", "grad_z2", "grad_w"]
    problems = []
    for name, fn in fns.items():
        for what, g, w in zip(names, fn(), want):
            w = w.detach().to(g.device)
            err = ((g.detach().double() - w).abs().max() / w.abs().max().clamp(min=1)).item()
            if not err <= _tol(dtype):
                problems.append(f"{name}: {what} differs from the float64 oracle (max error {err:.3g} of its magnitude)")
    return problems
