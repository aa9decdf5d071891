"""Shared tables, input builders and numeric checkers for the gaea_ext test suite.

Layout of the suite (pytorch_scatter style): every numeric test is a table of cases crossed
with DTYPES x DEVICES. "cuda" is always in the device table; it is skipped, with a reason, when
torch.cuda.is_available() is False. On a GPU machine the extension must have been built with
its CUDA kernels: a CPU-only build fails the cuda cases loudly instead of skipping them
(test_build.py checks the same thing directly).

Test modules import helpers from here (`from conftest import ...`); python_tests/ has no
__init__.py, so pytest puts this directory on sys.path.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import pytest
import torch

import gaea_ext  # noqa: F401  (registers torch.ops.gaea.*)

# --------------------------------------------------------------------------------------
# Parameter tables
# --------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f64", "f16", "bf16"]

CUDA_SKIP_REASON = "CUDA is not available (torch.cuda.is_available() is False); cuda cases need a GPU"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=cuda_only),
]

# The CPU kernel walks tiles of kTile elements and reduces the weight gradient over chunks
# of kChunk elements (csrc/cpu/mixed_op_cpu.cpp); the CUDA kernels use 256-thread blocks of
# 16-byte vectors (4 floats, 8 halves, 2 doubles). Sizes around all of these are tested.
K_TILE = 1024
K_CHUNK = 16 * K_TILE
CUDA_BLOCK_ELEMS = 256 * 8  # 256 threads x 8 halves per 16-byte vector
MAX_K = 64


def dtype_params():
    return [pytest.param(d, id=i) for d, i in zip(DTYPES, DTYPE_IDS)]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' arithmetic type: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Error allowed from accumulating in the acc dtype, relative to the magnitude scale
# (sum of |terms|) of each result element.
ACC_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def rounding_eps(dtype: torch.dtype) -> float:
    """One ulp at 1.0 of the result dtype: twice the worst relative rounding error."""
    return torch.finfo(dtype).eps


def smallest_subnormal(dtype: torch.dtype) -> float:
    fi = torch.finfo(dtype)
    return fi.tiny * fi.eps


# --------------------------------------------------------------------------------------
# Per-test seeding: every test gets its own fresh random stream, reproducible by node id.
# --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield


@pytest.fixture
def restore_num_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------
# Input builders
# --------------------------------------------------------------------------------------

LAYOUTS = (
    "contiguous",
    "transposed",  # last two dims swapped in memory (needs >= 2-D)
    "sliced",  # every second element of a twice-as-long last dim
    "offset",  # x[1:] of a flat buffer: storage offset of one element breaks 16-byte alignment
    "expanded",  # a size-1 leading dim expanded (stride 0): overlapping memory
    "channels_last",  # 4-D
    "channels_last_3d",  # 5-D
)


def randn(shape, dtype, device, layout: str = "contiguous") -> torch.Tensor:
    """Standard-normal values of `shape` laid out in memory as `layout`. Never zeros."""
    shape = tuple(shape)

    def fresh(s):
        return torch.randn(s, dtype=torch.float64, device=device).to(dtype)

    if layout == "contiguous":
        return fresh(shape)
    if layout == "transposed":
        assert len(shape) >= 2
        return fresh(shape[:-2] + (shape[-1], shape[-2])).transpose(-1, -2)
    if layout == "sliced":
        assert len(shape) >= 1
        return fresh(shape[:-1] + (2 * shape[-1],))[..., ::2]
    if layout == "offset":
        n = math.prod(shape)
        return fresh((n + 1,))[1:].view(shape)
    if layout == "expanded":
        assert len(shape) >= 1
        return fresh((1,) + shape[1:]).expand(shape)
    if layout == "channels_last":
        assert len(shape) == 4
        return fresh(shape).contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        assert len(shape) == 5
        return fresh(shape).contiguous(memory_format=torch.channels_last_3d)
    raise ValueError(layout)


def expected_format(ys: Sequence[torch.Tensor]) -> torch.memory_format:
    """The documented output layout: the one every y is dense in, else contiguous."""
    fmts = [torch.contiguous_format]
    if ys[0].dim() == 4:
        fmts.append(torch.channels_last)
    if ys[0].dim() == 5:
        fmts.append(torch.channels_last_3d)
    for f in fmts:
        if all(y.is_contiguous(memory_format=f) for y in ys):
            return f
    return torch.contiguous_format


# --------------------------------------------------------------------------------------
# Output poisoning
# --------------------------------------------------------------------------------------


def poison(numel: int, dtype: torch.dtype, device, count: int = 1) -> None:
    """Leave `count` freed blocks of `numel` elements full of NaN (or -1 for ints) behind.

    The ops allocate their own outputs, so we cannot pre-fill them. Instead we fill blocks of
    exactly the output's size with NaN and free them just before the op runs:
      * CUDA: the caching allocator hands the same blocks back for the next allocations of
        that size, so any output element the kernel does not write stays NaN.
      * CPU: small blocks are usually recycled by malloc too; large ones may come from a
        fresh mmap (zeros) instead. That is why every test also asserts the outputs are
        NaN-free for NaN-free inputs and compares every element against a float64
        computation, which catches unwritten (zero) elements as well.
    """
    numel = max(int(numel), 1)
    fill = float("nan") if dtype.is_floating_point else -1
    blocks = [torch.full((numel,), fill, dtype=dtype, device=device) for _ in range(count)]
    del blocks


def assert_no_nan(t: torch.Tensor, what: str) -> None:
    bad = torch.isnan(t)
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {t.numel()} elements are NaN (unwritten output?); "
        f"first at flat index {int(bad.flatten().nonzero()[0])}"
    )


# --------------------------------------------------------------------------------------
# Numeric checks
# --------------------------------------------------------------------------------------


def assert_accurate(
    actual: torch.Tensor,
    ref: Optional[torch.Tensor],
    exact: torch.Tensor,
    scale: torch.Tensor,
    acc: torch.dtype,
    what: str,
    roundings: int = 1,
) -> None:
    """Checks a fused result against a float64 computation, flash-attention style.

    exact: the float64 result; scale: per element, the sum of |terms| that produced it (the
    natural magnitude for accumulated rounding error under cancellation). roundings: how many
    times partial results were rounded to the output dtype (e.g. autograd summing the grads of
    a tensor passed several times); each adds eps(dtype)*scale.
    Two checks:
      1. element-wise: |actual - exact| <= eps(dtype)*|exact| + ACC_TOL[acc]*scale + subnormal
         (one rounding to the output dtype plus accumulation error in the acc dtype);
      2. flash-attention style: max|actual - exact| <= 2*max|ref - exact| + ACC_TOL[acc]*max(scale)
         + subnormal, i.e. the fused op is never much worse than the pure-PyTorch reference.
    """
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    if actual.numel() == 0:
        return
    assert_no_nan(actual, what)
    dt = actual.dtype
    a = actual.double()
    err = (a - exact).abs()
    tiny = smallest_subnormal(dt)
    bound = rounding_eps(dt) * exact.abs() + ACC_TOL[acc] * scale + tiny
    if roundings > 1:
        bound = bound + (roundings - 1) * rounding_eps(dt) * scale
    over = err > bound
    if bool(over.any()):
        i = int(over.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(over.sum())}/{err.numel()} elements off; first at flat index {i}: "
            f"got {a.flatten()[i].item()!r}, float64 gives {exact.flatten()[i].item()!r} "
            f"(error {err.flatten()[i].item():.3g} > bound {bound.flatten()[i].item():.3g})"
        )
    if ref is not None:
        assert ref.shape == exact.shape
        ref_err = (ref.double() - exact).abs().max().item()
        fused_err = err.max().item()
        allowed = 2 * ref_err + ACC_TOL[acc] * scale.max().item() + tiny
        assert fused_err <= allowed, (
            f"{what}: fused max error {fused_err:.3g} vs reference max error {ref_err:.3g} "
            f"(allowed {allowed:.3g})"
        )


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    if a.numel() == 0:
        return
    ai = a.detach().contiguous().view(torch.uint8)
    bi = b.detach().contiguous().view(torch.uint8)
    assert torch.equal(ai, bi), f"{what}: not bitwise identical (max diff {(a.double() - b.double()).abs().max().item()})"


# --------------------------------------------------------------------------------------
# Simplex helpers (eg_update_ / ExpGrad)
# --------------------------------------------------------------------------------------


def simplex(shape, dtype, device, spread: float = 1.0) -> torch.Tensor:
    """Rows (last dim) on the probability simplex, strictly positive, random."""
    logits = spread * torch.randn(tuple(shape), dtype=torch.float64, device=device)
    return torch.softmax(logits, dim=-1).to(dtype)


def assert_on_simplex(p: torch.Tensor, what: str, positive: bool = False) -> None:
    """Rows sum to 1 and entries are >= 0 (> 0 if positive). Note that eps does not bound
    entries from below after the step: clamping happens before normalization, so an entry
    clamped to eps ends at eps / row_sum, which underflows to 0 when another entry's
    p * exp(-lr g) is huge."""
    if p.numel() == 0:
        return
    assert bool(torch.isfinite(p).all()), f"{what}: non-finite entries"
    if positive:
        assert bool((p > 0).all()), f"{what}: entries <= 0 (min {p.min().item()})"
    else:
        assert bool((p >= 0).all()), f"{what}: negative entries (min {p.min().item()})"
    L = p.shape[-1]
    sums = p.double().sum(-1)
    tol = 2 * L * rounding_eps(p.dtype) + 1e-12
    dev = (sums - 1).abs().max().item()
    assert dev <= tol, f"{what}: rows sum to 1 +- {dev:.3g} (allowed {tol:.3g})"


@dataclass
class Tol:
    rtol: float
    atol: float


def eg_tol(dtype: torch.dtype) -> Tol:
    """Tolerance of an EG step result vs a float64 evaluation of the formula, for moderate
    steps (|lr g| up to ~60): the log-domain evaluation in the acc dtype loses about
    |lr g| * eps(acc) relative accuracy; half types add one rounding of the result."""
    if dtype == torch.float64:
        return Tol(1e-10, 1e-300)
    if dtype == torch.float32:
        return Tol(3e-5, 1e-30)
    return Tol(2 * rounding_eps(dtype) + 2e-5, smallest_subnormal(dtype))


def assert_close_tol(actual: torch.Tensor, expected: torch.Tensor, tol: Tol, what: str) -> None:
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol.rtol, atol=tol.atol, msg=lambda m: f"{what}: {m}"
    )


def saved_storages(fn):
    """(fn(), {storage data_ptr: nbytes}) of every tensor autograd saves while fn runs; each
    storage counted once."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


def assert_fused_matches_reference(fused, reference, weight_of) -> None:
    """Two float64 supernets built alike (the fused and the reference path) give the same
    architecture gradients and the same gradient for ``weight_of(model)``, under GAEA weights
    off uniform (so the weights matter), on a 3x3x16x16 batch."""
    from gaea_ext.search.methods import GAEA

    method = GAEA(fused.arch_spec()).double()
    for p in method.params():
        p.data = torch.softmax(torch.randn_like(p), -1)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    grads = []
    for model in (fused, reference):
        method.zero_grad()
        model(x, method.weights()).square().sum().backward()
        grads.append([p.grad.clone() for p in method.params()] + [weight_of(model).grad.clone()])
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-10)


def run_result(out: str) -> dict:
    """RUN_DIR/result.json of a finished `gaea search` or `gaea train`."""
    with open(os.path.join(out, "result.json")) as f:
        return json.load(f)


def run_log(out: str) -> list:
    """RUN_DIR/log.jsonl, one record per epoch."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------------------
# The `cuda` marker: every CUDA case, so bench/gpu_check.sh can run them all with `-m cuda`
# (a `-k cuda` name filter misses @cuda_only tests whose names lack the word)
# --------------------------------------------------------------------------------------


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: a CUDA case (skipped without a GPU); added automatically")


def _is_cuda_case(item) -> bool:
    if "cuda" in item.name:
        return True
    return any(m.kwargs.get("reason") == CUDA_SKIP_REASON for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_cuda_case(item):
            item.add_marker(pytest.mark.cuda)
