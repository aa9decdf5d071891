"""gaea_ext.mixed_op_pf: the mixed op with parameter-free candidates computed from x.

Forward, backward (the op and through autograd), non-finite inputs (max-pool NaN rule),
determinism across thread counts, gradcheck / gradgradcheck, opcheck, torch.compile, bad
input, saved activations, and MixedOp's use of the op. Numeric cases are (case x dtype x
device) with conftest.py's tolerance model: a float64 recomputation, with the
flash-attention-style comparison against gaea_ext.reference.mixed_op_pf.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F

import gaea_ext
from gaea_ext import reference
from conftest import (
    DEVICES,
    acc_dtype,
    assert_accurate,
    assert_bitwise_equal,
    cuda_only,
    dtype_params,
    poison,
    randn,
    saved_storages,
)

SKIP, AVG, MAX = "skip_connect", "avg_pool_3x3", "max_pool_3x3"
CODE = reference.PF_CODES

# --------------------------------------------------------------------------------------
# Case table
# --------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    shape: Tuple[int, ...]
    K: int
    pf: Tuple[str, ...]
    xlayout: str = "contiguous"
    ylayouts: Tuple[str, ...] = ("contiguous",)  # cycled over the ys
    wdtype: str = "same"  # "same" or "f32" (AMP: float32 weights for half inputs)
    mask: str = "all"  # who requires grad: see MASKS
    glayout: str = "contiguous"
    values: str = "normal"  # normal | ties (small integers: max-pool ties, exact window sums)
    y_is_x: bool = False  # ys[0] is x itself (autograd adds the two gradients)

    def __str__(self):
        return self.name


C = Case
CL = "channels_last"
CASES: List[Case] = [
    # NB201's edge: two convs, skip and avg pool
    C("nb201_k2", (2, 4, 8, 8), 2, (SKIP, AVG)),
    C("nb201_32x32", (2, 4, 32, 32), 2, (SKIP, AVG), wdtype="f32"),
    C("all_three_k3", (2, 3, 5, 7), 3, (SKIP, AVG, MAX)),
    C("all_three_32x32", (1, 6, 32, 32), 2, (MAX, SKIP, AVG), mask="no_w"),
    # only parameter-free candidates
    C("pf_only_avg", (2, 3, 4, 5), 0, (AVG,)),
    C("pf_only_max", (2, 3, 6, 5), 0, (MAX,), mask="w_only"),
    C("pf_only_all", (3, 2, 5, 4), 0, (MAX, SKIP, AVG), wdtype="f32"),
    C("pf_only_skip", (2, 3, 4, 4), 0, (SKIP,)),
    # one or no pf op
    C("k1_max", (2, 3, 7, 6), 1, (MAX,), mask="x_only"),
    C("k2_skip", (2, 3, 5, 5), 2, (SKIP,), mask="none_of_ys"),
    C("k3_no_pf", (2, 3, 5, 5), 3, ()),
    # tiny, thin and odd planes
    C("plane_1x1", (3, 4, 1, 1), 1, (SKIP, AVG, MAX)),
    C("plane_2x3", (2, 2, 2, 3), 2, (AVG, MAX)),
    C("plane_3x2", (2, 2, 3, 2), 1, (MAX, AVG), wdtype="f32"),
    C("row_1x9", (2, 3, 1, 9), 1, (AVG, MAX)),
    C("col_9x1", (2, 3, 9, 1), 2, (MAX, AVG, SKIP), mask="no_x"),
    C("odd_7x11", (3, 5, 7, 11), 3, (SKIP, AVG, MAX), wdtype="f32"),
    C("chw_3d", (4, 6, 5), 1, (AVG, MAX)),
    C("batch1_chan1", (1, 1, 5, 6), 1, (AVG, MAX)),
    # many CPU chunks (images grouped by 4096 elements) and images above a chunk
    C("many_chunks", (8, 16, 33, 17), 2, (SKIP, AVG, MAX)),
    C("big_planes", (2, 3, 70, 65), 1, (AVG, MAX), wdtype="f32"),
    # ties in every max-pool window (first maximum in scan order gets the gradient)
    C("ties", (2, 3, 9, 8), 1, (MAX, AVG), values="ties"),
    C("ties_cl", (2, 5, 6, 7), 1, (MAX,), xlayout=CL, ylayouts=(CL,), values="ties"),
    # layouts: channels_last kept when x and all ys are; anything else is copied
    C("channels_last", (2, 6, 5, 7), 2, (SKIP, AVG, MAX), xlayout=CL, ylayouts=(CL,), glayout=CL),
    C("channels_last_grad_contig", (2, 8, 4, 4), 2, (AVG, SKIP), xlayout=CL, ylayouts=(CL,)),
    C("channels_last_c16_32x32", (2, 16, 32, 32), 2, (SKIP, AVG), xlayout=CL, ylayouts=(CL,), wdtype="f32"),
    C("x_cl_ys_contig", (2, 6, 5, 7), 2, (MAX, AVG), xlayout=CL, glayout=CL),
    C("x_contig_ys_cl", (2, 6, 5, 7), 2, (SKIP, MAX), ylayouts=(CL, "contiguous")),
    C("transposed_sliced", (2, 3, 6, 5), 2, (AVG, MAX), xlayout="transposed", ylayouts=("sliced",),
      glayout="transposed"),
    C("offset_expanded", (3, 2, 5, 6), 2, (SKIP, AVG, MAX), xlayout="offset", ylayouts=("expanded", "offset")),
    C("expanded_x", (3, 2, 5, 6), 1, (AVG, MAX), xlayout="expanded", glayout="sliced"),
    # a candidate output that is x itself: x's gradient gets both parts
    C("y_is_x", (2, 3, 5, 6), 2, (AVG, MAX), y_is_x=True),
    # empty
    C("empty_batch", (0, 3, 4, 4), 2, (SKIP, AVG, MAX)),
]


def _values(shape, dtype, device, layout, values):
    t = randn(shape, dtype, device, layout)
    if values == "ties":
        ints = torch.randint(-2, 3, tuple(shape), device=device).to(dtype)
        with torch.no_grad():
            t.copy_(ints)
    return t


# mask -> which of (x, ys, weights) require grad
MASKS = {
    "all": (True, True, True),
    "no_w": (True, True, False),
    "w_only": (False, False, True),
    "x_only": (True, False, False),
    "no_x": (False, True, True),
    "none_of_ys": (True, False, True),
}


def make_case(case: Case, dtype, device, requires_grad: bool):
    x = _values(case.shape, dtype, device, case.xlayout, case.values)
    ys = [_values(case.shape, dtype, device, case.ylayouts[k % len(case.ylayouts)], case.values)
          for k in range(case.K)]
    if case.y_is_x:
        ys[0] = x
    n = case.K + len(case.pf)
    w = torch.randn(n, dtype=torch.float64, device=device).to(torch.float32 if case.wdtype == "f32" else dtype)
    if requires_grad:
        rx, rys, rw = MASKS[case.mask]
        x.requires_grad_(rx)
        for y in ys:
            if y is not x:
                y.requires_grad_(rys)
        w.requires_grad_(rw)
    return x, ys, w


# --------------------------------------------------------------------------------------
# float64 ground truth
# --------------------------------------------------------------------------------------


def _abs_term(x64, code):
    """Magnitude of a candidate's terms: the rounding-error scale of computing it."""
    if code == 1:
        return x64.abs()
    if code == 2:
        return F.avg_pool2d(x64.abs(), 3, 1, 1, count_include_pad=False)
    return F.max_pool2d(x64, 3, 1, 1).abs()


def exact_terms(x, ys, pf):
    x64 = x.detach().double()
    codes = [CODE[p] for p in pf]
    terms = [y.detach().double() for y in ys] + [reference.pf_candidate(x64, c) for c in codes]
    scales = [y.detach().double().abs() for y in ys] + [_abs_term(x64, c) for c in codes]
    return terms, scales


def exact_forward(x, ys, w, pf):
    terms, scales = exact_terms(x, ys, pf)
    w64 = w.detach().double()
    out = sum(w64[j] * t for j, t in enumerate(terms))
    scale = sum(w64[j].abs() * s for j, s in enumerate(scales))
    return out, scale


def exact_pf_grad_x(x, w, pf, g, K):
    """float64 parameter-free part of x's gradient and its scale (the same linear maps applied
    to |w| and |g|: skip, avg-pool and max-pool backward have non-negative coefficients)."""
    codes = [CODE[p] for p in pf]
    w64, g64 = w.detach().double(), g.detach().double()

    def vjp(weights, grad):
        if not codes:
            return torch.zeros_like(grad)
        xr = x.detach().double().requires_grad_()
        f = sum(weights[K + j] * reference.pf_candidate(xr, c) for j, c in enumerate(codes))
        return torch.autograd.grad(f, xr, grad)[0]

    return vjp(w64, g64), vjp(w64.abs(), g64.abs())


def exact_grad_w(x, ys, pf, g):
    terms, scales = exact_terms(x, ys, pf)
    g64 = g.detach().double()
    gw = torch.stack([(g64 * t).sum() for t in terms]) if terms else g64.new_zeros(0)
    sc = torch.stack([(g64.abs() * s).sum() for s in scales]) if terms else g64.new_zeros(0)
    return gw, sc


def expected_format(x, ys):
    if x.dim() == 4 and all(t.is_contiguous(memory_format=torch.channels_last) for t in (x, *ys)) and not all(
        t.is_contiguous() for t in (x, *ys)
    ):
        return torch.channels_last
    return torch.contiguous_format


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward(case, dtype, device):
    x, ys, w = make_case(case, dtype, device, requires_grad=False)
    poison(x.numel(), dtype, device, count=case.K + 3)
    out = gaea_ext.mixed_op_pf(x, ys, w, case.pf)
    assert out.dtype == dtype and out.device == x.device and out.shape == x.shape
    fmt = expected_format(x, ys)
    assert out.is_contiguous(memory_format=fmt), f"output strides {out.stride()} are not dense in {fmt}"
    ref = reference.mixed_op_pf(x, ys, w, case.pf)
    exact, scale = exact_forward(x, ys, w, case.pf)
    assert_accurate(out, ref, exact, scale, acc_dtype(dtype), f"{case.name} forward")


@pytest.mark.parametrize("device", DEVICES)
def test_forward_codes_and_names_agree_and_inputs_untouched(device):
    x = randn((2, 3, 5, 6), torch.float32, device)
    ys = [randn((2, 3, 5, 6), torch.float32, device)]
    before = [t.clone() for t in (x, *ys)]
    w = torch.randn(3, device=device)
    a = gaea_ext.mixed_op_pf(x, ys, w, [SKIP, MAX])
    b = gaea_ext.mixed_op_pf(x, ys, w, [1, 3])
    c = torch.ops.gaea.mixed_op_pf(x, ys, w, [1, 3])
    assert_bitwise_equal(a, b, "names vs codes")
    assert_bitwise_equal(a, c, "wrapper vs op")
    for t, t0 in zip((x, *ys), before):
        assert torch.equal(t, t0)
    # skip alone with weight 1 is a fresh copy of x, not an alias
    one = gaea_ext.mixed_op_pf(x, [], torch.ones(1, device=device), [SKIP])
    assert one.data_ptr() != x.data_ptr()
    assert torch.equal(one, x)


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward(case, dtype, device):
    x, ys, w = make_case(case, dtype, device, requires_grad=True)
    acc = acc_dtype(dtype)
    K, n = case.K, case.K + len(case.pf)
    g = randn(case.shape, dtype, device, case.glayout)
    gx_exact, gx_scale = exact_pf_grad_x(x, w, case.pf, g, K)
    gw_exact, gw_scale = exact_grad_w(x, ys, case.pf, g)
    g64, w64 = g.double(), w.detach().double()

    # --- the backward op itself ---------------------------------------------------------
    mask = [bool(y.requires_grad) and y is not x for y in ys]
    x_grad = bool(x.requires_grad)
    poison(x.numel(), dtype, device, count=case.K + 4)
    grad_ys, grad_x, grad_w = torch.ops.gaea.mixed_op_pf_backward(
        g, x.detach(), [y.detach() for y in ys], w.detach(), [CODE[p] for p in case.pf], mask, x_grad, True)
    assert len(grad_ys) == sum(mask)
    fmt = expected_format(x, ys)
    got = iter(grad_ys)
    for k, needed in enumerate(mask):
        if needed:
            gk = next(got)
            assert gk.dtype == dtype and gk.shape == x.shape and gk.is_contiguous(memory_format=fmt)
            assert_accurate(gk, None, w64[k] * g64, w64[k].abs() * g64.abs(), acc, f"{case.name} op grad_ys[{k}]")
    if x_grad and case.pf:
        assert grad_x.dtype == dtype and grad_x.shape == x.shape and grad_x.is_contiguous(memory_format=fmt)
        assert_accurate(grad_x, None, gx_exact, gx_scale, acc, f"{case.name} op grad_x")
    else:
        assert grad_x.numel() == 0
    assert grad_w.dtype == w.dtype and grad_w.shape == (n,)
    assert_accurate(grad_w, None, gw_exact, gw_scale, acc, f"{case.name} op grad_weights")

    # --- through autograd, against gaea_ext.reference -----------------------------------
    leaves = [x, *(y for y in ys if y is not x), w]
    ref_leaves = {id(t): t.detach().clone().requires_grad_(t.requires_grad) for t in leaves}
    rx = ref_leaves[id(x)]
    ref_out = reference.mixed_op_pf(rx, [ref_leaves[id(y)] for y in ys], ref_leaves[id(w)], case.pf)
    poison(x.numel(), dtype, device, count=case.K + 4)
    out = gaea_ext.mixed_op_pf(x, ys, w, case.pf)
    if not any(t.requires_grad for t in leaves):
        return
    out.backward(g)
    ref_out.backward(g)
    for k, y in enumerate(ys):
        if y is x:
            continue
        if y.requires_grad:
            assert_accurate(y.grad, ref_leaves[id(y)].grad, w64[k] * g64, w64[k].abs() * g64.abs(), acc,
                            f"{case.name} grad of ys[{k}]")
            assert_bitwise_equal(y.grad, grad_ys[sum(mask[:k])], "autograd grad_ys vs the op")
        else:
            assert y.grad is None
    if x.requires_grad:
        if case.y_is_x:
            exact = gx_exact + w64[0] * g64
            scale = gx_scale + w64[0].abs() * g64.abs()
            assert_accurate(x.grad, rx.grad, exact, scale, acc, f"{case.name} grad of x", roundings=3)
        elif case.pf:
            assert_accurate(x.grad, rx.grad, gx_exact, gx_scale, acc, f"{case.name} grad of x")
            assert_bitwise_equal(x.grad, grad_x, "autograd grad_x vs the op")
        else:
            assert x.grad is None
    else:
        assert x.grad is None
    if w.requires_grad:
        assert_accurate(w.grad, ref_leaves[id(w)].grad, gw_exact, gw_scale, acc, f"{case.name} grad_weights")
        assert_bitwise_equal(w.grad, grad_w, "autograd grad_weights vs the op")
    else:
        assert w.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
def test_backward_flags_skip_work_not_change_results(dtype, device):
    """weights_grad=False zeroes grad_weights, x_grad=False empties grad_x; the rest is the same."""
    shape, pf = (2, 3, 9, 10), [CODE[MAX], CODE[SKIP], CODE[AVG]]
    x = randn(shape, dtype, device)
    ys = [randn(shape, dtype, device) for _ in range(2)]
    w = torch.rand(5, device=device)
    g = randn(shape, dtype, device)
    full = torch.ops.gaea.mixed_op_pf_backward(g, x, ys, w, pf, [True, True], True, True)
    no_w = torch.ops.gaea.mixed_op_pf_backward(g, x, ys, w, pf, [True, True], True, False)
    no_x = torch.ops.gaea.mixed_op_pf_backward(g, x, ys, w, pf, [True, False], False, True)
    assert torch.count_nonzero(full[2]) == 5 and torch.count_nonzero(no_w[2]) == 0
    assert_bitwise_equal(full[1], no_w[1], "grad_x with and without weight grads")
    for a, b in zip(full[0], no_w[0]):
        assert_bitwise_equal(a, b, "grad_ys with and without weight grads")
    assert no_x[1].numel() == 0 and len(no_x[0]) == 1
    assert_bitwise_equal(full[0][0], no_x[0][0], "grad_ys[0] with and without x_grad")
    assert_bitwise_equal(full[2], no_x[2], "grad_weights with and without x_grad")


# --------------------------------------------------------------------------------------
# Non-finite x: the max pool's NaN rule, inf in both pools
# --------------------------------------------------------------------------------------

NONFINITE_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _nonfinite_x(dtype, device, layout):
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    nan, inf = float("nan"), float("inf")
    x[0, 0, 2, 2] = nan  # two NaNs sharing windows: the later one (scan order) gets the grads
    x[0, 0, 3, 3] = nan
    x[0, 1, 0, 0] = nan  # corner
    x[0, 2, 4, 4] = inf
    x[0, 2, 4, 6] = -inf  # windows holding both: avg NaN, max inf
    x[1, 0, :3, :3] = -inf  # all -inf windows: max -inf, gradient to the window's first element
    x[1, 1, 6, 7] = inf  # corner
    x[1, 2, 3, :] = nan  # a NaN row
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nonfinite_x_matches_pytorch_pools(layout, dtype, device):
    x = _nonfinite_x(dtype, device, layout).requires_grad_()
    ys = [randn(x.shape, dtype, device, layout).requires_grad_()]
    w = torch.tensor([0.3, -0.7, 1.1, 0.9], device=device).to(dtype).requires_grad_()
    pf = (MAX, AVG, SKIP)
    g = randn(x.shape, dtype, device)
    out = gaea_ext.mixed_op_pf(x, ys, w, pf)
    out.backward(g)
    # float64 reference from the same values: its NaN/inf pattern and gradient routing are
    # PyTorch's pooling kernels'.
    x64 = x.detach().double().requires_grad_()
    y64 = ys[0].detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref = reference.mixed_op_pf(x64, [y64], w64, pf)
    ref.backward(g.double())
    tol = NONFINITE_TOL[dtype]
    for got, want, what in ((out, ref, "forward"), (x.grad, x64.grad, "grad_x"),
                            (ys[0].grad, y64.grad, "grad_ys[0]"), (w.grad, w64.grad, "grad_weights")):
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN pattern differs"
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 10, equal_nan=True,
                                   msg=lambda m: f"{what}: {m}")
    assert bool(torch.isfinite(x.grad).all()), "the pools' gradients do not depend on x's values"


# --------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------

DET_CASES = [
    ((8, 16, 33, 17), "contiguous"),  # many chunks of several images
    ((2, 3, 70, 65), "contiguous"),  # one image per chunk
    ((4, 16, 20, 12), "channels_last"),
]


def _run_all(x, ys, w, pf, g):
    for t in (x, *ys, w):
        t.grad = None
    out = gaea_ext.mixed_op_pf(x, ys, w, pf)
    out.backward(g)
    return [out.detach(), x.grad.clone(), w.grad.clone(), *(y.grad.clone() for y in ys)]


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape,layout", DET_CASES, ids=str)
def test_deterministic_across_cpu_thread_counts(shape, layout, dtype, restore_num_threads):
    x = randn(shape, dtype, "cpu", layout).requires_grad_()
    ys = [randn(shape, dtype, "cpu", layout).requires_grad_() for _ in range(2)]
    w = torch.randn(5).requires_grad_()
    g = randn(shape, dtype, "cpu", layout)
    pf = (SKIP, AVG, MAX)
    results = {}
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        results[n] = _run_all(x, ys, w, pf, g)
    names = ["forward", "grad_x", "grad_weights", "grad_ys[0]", "grad_ys[1]"]
    for n in (2, 3):
        for a, b, what in zip(results[1], results[n], names):
            assert_bitwise_equal(a, b, f"{what} with 1 vs {n} threads")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
def test_deterministic_run_to_run(dtype, device):
    shape = (8, 16, 33, 17)
    x = randn(shape, dtype, device).requires_grad_()
    ys = [randn(shape, dtype, device).requires_grad_() for _ in range(2)]
    w = torch.randn(5, device=device).requires_grad_()
    g = randn(shape, dtype, device)
    pf = (SKIP, AVG, MAX)
    first, second = _run_all(x, ys, w, pf, g), _run_all(x, ys, w, pf, g)
    for a, b in zip(first, second):
        assert_bitwise_equal(a, b, "run 1 vs run 2")


# --------------------------------------------------------------------------------------
# gradcheck / gradgradcheck (float64)
# --------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    ((2, 3, 4, 5), 2, (SKIP, AVG, MAX), "contiguous"),
    ((2, 3, 4, 5), 0, (AVG, MAX), "channels_last"),
    ((3, 1, 3), 1, (MAX, AVG), "contiguous"),
    ((1, 2, 2, 3), 1, (AVG,), "transposed"),
    ((2, 2, 5, 1), 2, (MAX, SKIP), "contiguous"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,K,pf,layout", GRADCHECK_CASES, ids=str)
def test_gradcheck(shape, K, pf, layout, device):
    x = randn(shape, torch.float64, device, layout).requires_grad_()
    ys = [randn(shape, torch.float64, device, layout).requires_grad_() for _ in range(K)]
    w = torch.randn(K + len(pf), dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda x, w, *ys: gaea_ext.mixed_op_pf(x, ys, w, pf)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, *ys), eps=1e-6, atol=1e-8, rtol=1e-7)
    x.requires_grad_(False)
    assert torch.autograd.gradcheck(fn, (x, w, *ys), eps=1e-6, atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pf", [(SKIP, AVG, MAX), (AVG,), (MAX, SKIP)], ids=str)
def test_gradgradcheck(pf, device):
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    ys = [torch.randn(2, 2, 4, 5, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2)]
    w = torch.rand(2 + len(pf), dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda x, a, b, w: gaea_ext.mixed_op_pf(x, [a, b], w, pf)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x, *ys, w))


# --------------------------------------------------------------------------------------
# opcheck, registration
# --------------------------------------------------------------------------------------


def _opcheck_samples(device):
    f32, f64, f16, bf16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
    # (shape, dtype, weight dtype, x layout, ys layouts, K, pf codes, requires_grad)
    specs = [
        ((2, 3, 5, 7), f32, f32, "contiguous", ("contiguous",), 2, [1, 2], True),
        ((2, 8, 5, 7), f16, f32, CL, (CL,), 2, [3, 2, 1], True),
        ((2, 4, 3, 5), bf16, bf16, "contiguous", (CL,), 1, [2, 3], False),
        ((3, 4, 6), f64, f64, "transposed", ("sliced",), 2, [3], True),
        ((2, 3, 4, 4), f32, f32, "offset", ("expanded",), 0, [1, 2, 3], True),
        ((2, 3, 4, 4), f64, f32, "contiguous", ("contiguous",), 3, [], True),
        ((0, 3, 4, 4), f32, f32, "contiguous", ("contiguous",), 1, [2], False),
    ]
    samples = []
    for shape, dt, wdt, xl, yls, K, pf, rg in specs:
        x = randn(shape, dt, device, xl).requires_grad_(rg)
        ys = [randn(shape, dt, device, yls[k % len(yls)]).requires_grad_(rg) for k in range(K)]
        w = torch.randn(K + len(pf), device=device).to(wdt).requires_grad_(rg)
        samples.append((x, ys, w, pf))
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_mixed_op_pf(device):
    for x, ys, w, pf in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.gaea.mixed_op_pf, (x, ys, w, pf))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_mixed_op_pf_backward(device):
    for i, (x, ys, w, pf) in enumerate(_opcheck_samples(device)):
        x, ys, w = x.detach(), [y.detach() for y in ys], w.detach()
        K = len(ys)
        g = randn(x.shape, x.dtype, device, "transposed" if i % 2 else "contiguous")
        for mask in ([True] * K, [k % 2 == 1 for k in range(K)]):
            for x_grad, weights_grad in ((True, True), (False, True), (True, False)):
                torch.library.opcheck(torch.ops.gaea.mixed_op_pf_backward,
                                      (g, x, ys, w, pf, mask, x_grad, weights_grad))


@pytest.mark.parametrize("op", ["gaea::mixed_op_pf", "gaea::mixed_op_pf_backward"])
def test_registered_kernels(op):
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has(op, "CPU") and has(op, "Meta")
    assert has(op, "CUDA") == gaea_ext.build_info()["cuda"]


# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------


def _edge(x, y0, y1, alpha):
    # An NB201-style edge: two conv outputs, skip, avg pool and max pool, softmaxed weights.
    out = gaea_ext.mixed_op_pf(x, [y0, y1 * 2], torch.softmax(alpha, -1), [SKIP, AVG, MAX])
    return torch.tanh(out) + x


def _run(fn, inputs, g):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(g)
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_aot_eager_fullgraph(dynamic, device):
    torch._dynamo.reset()
    compiled = torch.compile(_edge, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for shape, dtype, layout in (
        ((2, 4, 6, 7), torch.float32, "contiguous"),
        ((2, 4, 5, 5), torch.float16, CL),
        ((3, 4, 9, 6), torch.float32, "contiguous"),
    ):
        inputs = [randn(shape, dtype, device, layout) for _ in range(3)] + [torch.randn(5, device=device)]
        g = randn(shape, dtype, device)
        out_e, grads_e = _run(_edge, inputs, g)
        out_c, grads_c = _run(compiled, inputs, g)
        torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
        tol = 1e-6 if dtype == torch.float32 else 2e-3
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------
# Saved activations: x, ys, weights and nothing else
# --------------------------------------------------------------------------------------


def test_saves_only_inputs():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    ys = [torch.randn(2, 4, 8, 8, requires_grad=True) for _ in range(2)]
    w = torch.rand(5, requires_grad=True)
    _, fused = saved_storages(lambda: gaea_ext.mixed_op_pf(x, ys, w, [SKIP, AVG, MAX]))
    assert set(fused) == {t.untyped_storage().data_ptr() for t in (x, *ys, w)}
    _, plain = saved_storages(lambda: reference.mixed_op_pf(x, ys, w, [SKIP, AVG, MAX]))
    assert sum(plain.values()) > sum(fused.values())


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def _t(device, shape=(2, 3, 4, 5), dtype=torch.float32):
    return torch.randn(shape, device=device, dtype=dtype)


BAD_INPUTS = [
    ("no_candidates", lambda d: (_t(d), [], torch.randn(0, device=d), []), r"no candidates"),
    ("bad_code_0", lambda d: (_t(d), [], torch.randn(1, device=d), [0]), r"pf\[0\] = 0 is not a parameter-free"),
    ("bad_code_4", lambda d: (_t(d), [_t(d)], torch.randn(2, device=d), [4]), r"pf\[0\] = 4 is not"),
    ("duplicate", lambda d: (_t(d), [], torch.randn(2, device=d), [2, 2]), r"pf code 2 appears twice"),
    ("x_2d", lambda d: (_t(d, (4, 5)), [], torch.randn(1, device=d), [2]), r"x must be 3-D .* or 4-D"),
    ("empty_plane", lambda d: (_t(d, (2, 3, 0, 4)), [], torch.randn(1, device=d), [2]), r"x has an empty plane"),
    ("x_5d", lambda d: (_t(d, (1, 2, 3, 4, 5)), [], torch.randn(1, device=d), [2]), r"x must be 3-D"),
    ("int_x", lambda d: (torch.ones(2, 3, 4, 5, dtype=torch.int32, device=d), [], torch.randn(1, device=d), [1]),
     r"x must be float32, float64, float16 or bfloat16"),
    ("stride2_y", lambda d: (_t(d), [_t(d, (2, 3, 2, 3))], torch.randn(2, device=d), [2]),
     r"ys\[0\] has shape .*only stride-1"),
    ("y_dtype", lambda d: (_t(d), [_t(d, dtype=torch.float64)], torch.randn(2, device=d), [2]), r"ys\[0\] has dtype"),
    ("weights_short", lambda d: (_t(d), [_t(d)], torch.randn(2, device=d), [1, 2]),
     r"weights has length 2 but there are 1 candidate outputs in ys and 2 parameter-free"),
    ("weights_2d", lambda d: (_t(d), [_t(d)], torch.randn(1, 2, device=d), [1]), r"weights must be 1-D"),
    ("weights_f64", lambda d: (_t(d), [_t(d)], torch.randn(2, device=d, dtype=torch.float64), [1]),
     r"weights must be float32 or the x dtype"),
    ("k65", lambda d: (_t(d, (1, 1, 2, 2)), [_t(d, (1, 1, 2, 2))] * 65, torch.randn(66, device=d), [1]),
     r"at most 64 candidate outputs"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,build,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises(name, build, match, device):
    x, ys, w, pf = build(device)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.gaea.mixed_op_pf(x, ys, w, pf)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.gaea.mixed_op_pf_backward(torch.zeros_like(x), x, ys, w, pf, [True] * len(ys), True, True)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_backward_input_raises(device):
    x, ys, w = _t(device), [_t(device)], torch.randn(2, device=device)
    with pytest.raises(RuntimeError, match=r"ys_mask has 2 entries for 1 inputs"):
        torch.ops.gaea.mixed_op_pf_backward(x, x, ys, w, [2], [True, True], True, True)
    with pytest.raises(RuntimeError, match=r"grad must match x"):
        torch.ops.gaea.mixed_op_pf_backward(x.double(), x, ys, w, [2], [True], True, True)
    with pytest.raises(RuntimeError, match=r"grad must match x"):
        torch.ops.gaea.mixed_op_pf_backward(x[:1], x, ys, w, [2], [True], True, True)


def test_bad_names_in_python_wrapper():
    x = _t("cpu")
    with pytest.raises(ValueError, match=r"'sep_conv_3x3' is not a parameter-free op"):
        gaea_ext.mixed_op_pf(x, [], torch.ones(1), ["sep_conv_3x3"])
    with pytest.raises(ValueError, match=r"names an op twice"):
        reference.mixed_op_pf(x, [], torch.ones(2), [AVG, "avg_pool_3x3"])


@cuda_only
def test_bad_input_mixed_devices():
    x = _t("cuda")
    with pytest.raises(RuntimeError, match=r"ys\[0\] is on"):
        torch.ops.gaea.mixed_op_pf(x, [_t("cpu")], torch.randn(2, device="cuda"), [1])
    with pytest.raises(RuntimeError, match=r"weights are on"):
        torch.ops.gaea.mixed_op_pf(x, [], torch.randn(1), [1])
    with pytest.raises(RuntimeError, match=r"grad must match x"):
        torch.ops.gaea.mixed_op_pf_backward(_t("cpu"), x, [], torch.randn(1, device="cuda"), [1], [], True, True)


@cuda_only
def test_bad_input_cpu_x_cuda():
    """x on the CPU with CUDA ys or weights reaches the CUDA kernel: validated before its
    device guard (set from x), so the message names the devices."""
    x = _t("cpu")
    with pytest.raises(RuntimeError, match=r"ys\[0\] is on cuda.* but x is on cpu"):
        torch.ops.gaea.mixed_op_pf(x, [_t("cuda")], torch.randn(2, device="cuda"), [1])
    with pytest.raises(RuntimeError, match=r"weights are on cuda.* but x is on cpu"):
        gaea_ext.mixed_op_pf(x, [], torch.randn(1, device="cuda"), ["skip_connect"])
    with pytest.raises(RuntimeError, match=r"weights are on cuda.* but x is on cpu"):
        torch.ops.gaea.mixed_op_pf_backward(_t("cuda"), x, [], torch.randn(1, device="cuda"), [1], [], True, True)


# --------------------------------------------------------------------------------------
# MixedOp: NB201 edges take mixed_op_pf, DARTS edges do not, and the results agree
# --------------------------------------------------------------------------------------


def _mixed_ops(model):
    from gaea_ext.spaces.mixed import MixedOp

    return [m for m in model.modules() if isinstance(m, MixedOp)]


def test_nb201_edges_use_pf_path_and_darts_edges_do_not():
    from gaea_ext.spaces import NB201Network, build_network

    fused = _mixed_ops(NB201Network(4, 1, 10, 3, exclude_none=True, fused=True))
    assert fused and all(list(m.pf_slots.values()) == [CODE[SKIP], CODE[AVG]] for m in fused)
    assert all(not m.pf_slots for m in _mixed_ops(NB201Network(4, 1, 10, 3, fused=False)))
    darts = build_network("darts", channels=8, cells=3, num_classes=10, in_channels=3, exclude_none=False,
                          fused=True, partial=1, stem="cifar")
    # DARTS' pools are followed by BatchNorm, and skip alone saves nothing: plain mixed_op.
    assert all(not m.pf_slots for m in _mixed_ops(darts))


def test_pf_code_recognizes_only_bare_stride1_pools():
    from torch import nn

    from gaea_ext.spaces.darts_ops import OPS, search_candidate
    from gaea_ext.spaces.mixed import pf_code

    assert pf_code(nn.Identity()) == 1
    assert pf_code(nn.AvgPool2d(3, 1, 1, count_include_pad=False)) == 2
    assert pf_code(OPS["max_pool_3x3"](4, 1, False)) == 3
    for m in (nn.AvgPool2d(3, 1, 1), nn.AvgPool2d(3, 2, 1, count_include_pad=False), nn.MaxPool2d(3),
              nn.MaxPool2d(3, 1, 1, ceil_mode=True), nn.MaxPool2d(3, 1, 1, dilation=2), nn.Conv2d(4, 4, 3, 1, 1),
              search_candidate("avg_pool_3x3", 4, 1), search_candidate("max_pool_3x3", 4, 1), nn.ReLU()):
        assert pf_code(m) is None, m


@pytest.mark.parametrize("layout", ["contiguous", CL])
@pytest.mark.parametrize("names", [("skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"),
                                   ("avg_pool_3x3", "none", "nor_conv_3x3", "max_pool_3x3", "skip_connect")],
                         ids=["nb201", "with_none_and_max"])
def test_mixed_op_fused_matches_reference_path(names, layout):
    """Same candidate modules and weights: output and every gradient agree in float64."""
    from torch import nn

    from gaea_ext.spaces.mixed import MixedOp
    from gaea_ext.spaces.nb201 import candidate_builders

    build = dict(candidate_builders(4), max_pool_3x3=lambda: nn.MaxPool2d(3, 1, 1))
    torch.manual_seed(0)
    fused = MixedOp(names, build, fused=True).double()
    plain = MixedOp(names, build, fused=False).double()
    plain.load_state_dict(fused.state_dict())
    assert fused.pf_slots and not plain.pf_slots
    assert list(fused.state_dict()) == list(plain.state_dict())
    x = torch.randn(3, 4, 6, 7, dtype=torch.float64)
    fmt = torch.channels_last if layout == CL else torch.contiguous_format
    fused.to(memory_format=fmt), plain.to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    w = torch.softmax(torch.randn(len(names), dtype=torch.float64), 0)
    g = torch.randn(3, 4, 6, 7, dtype=torch.float64)
    results = []
    for m in (fused, plain):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = m(xi, wi)
        out.backward(g)
        results.append([out, xi.grad, wi.grad, *(p.grad for p in m.parameters())])
        m.zero_grad()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if layout == CL:
        assert results[0][0].is_contiguous(memory_format=torch.channels_last)
