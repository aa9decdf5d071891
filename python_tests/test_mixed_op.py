"""gaea_ext.mixed_op: forward, backward, determinism, gradcheck, opcheck, torch.compile, errors.

Every numeric case is (case x dtype x device); see conftest.py for the tables, the poisoning
of outputs and the tolerance model (float64 recomputation + flash-attention-style comparison
with gaea_ext.reference).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import pytest
import torch

import gaea_ext
from gaea_ext import reference
from conftest import (
    DEVICES,
    K_CHUNK,
    K_TILE,
    MAX_K,
    acc_dtype,
    assert_accurate,
    assert_bitwise_equal,
    cuda_only,
    dtype_params,
    expected_format,
    poison,
    randn,
)

# --------------------------------------------------------------------------------------
# Case table
# --------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    shape: Tuple[int, ...]
    K: int
    layouts: Tuple[str, ...] = ("contiguous",)  # cycled over the distinct inputs
    idx: Optional[Tuple[int, ...]] = None  # position k -> distinct input (aliasing); default k
    wdtype: str = "same"  # "same": weights in the ys dtype; "f32": float32 weights (AMP)
    wstrided: bool = False  # weights as a stride-2 view
    mask: str = "all"  # who requires grad: all | alt | w_only | ys_only | first_last
    glayout: str = "contiguous"  # layout of the incoming gradient

    def __str__(self):
        return self.name


C = Case
CASES: List[Case] = [
    # tiny and odd sizes
    C("n1_k1", (1,), 1),
    C("n1_k2_f32w", (1,), 2, wdtype="f32"),
    C("n3_k2", (3,), 2, mask="alt"),
    C("n7_k3_f32w", (7,), 3, wdtype="f32", mask="w_only"),
    # 0-size tensors
    C("n0_k3", (0,), 3),
    C("empty2d_k2", (4, 0), 2, wdtype="f32"),
    # around 16-byte vector widths (2 doubles, 4 floats, 8 halves)
    C("n4_k5", (4,), 5),
    C("n5_k8_f32w", (5,), 8, wdtype="f32"),
    C("n8_k9", (8,), 9, mask="first_last"),
    C("n9_k16", (9,), 16, wdtype="f32"),
    C("n15_k2", (15,), 2),
    C("n16_k3", (16,), 3, mask="ys_only"),
    C("n17_k5_f32w", (17,), 5, wdtype="f32"),
    C("n31_k8", (31,), 8),
    C("n33_k64", (33,), 64, wdtype="f32", mask="alt"),
    # around CUDA blocks (256 threads x vector) and CPU tiles/chunks
    C("n255_k3", (255,), 3),
    C("n511_k3", (511,), 3, mask="alt"),  # 256 threads x 2 doubles = 512
    C("n513_k2_f32w", (513,), 2, wdtype="f32"),
    C("n2047_k3", (2047,), 3),  # 256 threads x 8 halves = 2048
    C("n2048_k5_f32w", (2048,), 5, wdtype="f32", mask="first_last"),
    C("n2049_k2", (2049,), 2, wdtype="f32"),
    C("n1023_k8", (K_TILE - 1,), 8),
    C("n1024_k9_f32w", (K_TILE,), 9, wdtype="f32"),
    C("n1025_k16", (K_TILE + 1,), 16, mask="alt"),
    C("n16383_k2", (K_CHUNK - 1,), 2, wdtype="f32"),
    C("n16384_k3", (K_CHUNK,), 3),
    C("n16385_k5", (K_CHUNK + 1,), 5, wdtype="f32", mask="first_last"),
    C("n2chunks+5_k64", (2 * K_CHUNK + 5,), 64, mask="alt"),
    C("n1000003_k2", (1000003,), 2, wdtype="f32"),
    # non-contiguous views
    C("transposed_k3", (33, 65), 3, layouts=("transposed",), glayout="transposed"),
    C("sliced_k5_f32w", (17, 31), 5, layouts=("sliced",), wdtype="f32", wstrided=True),
    C("offset_k3", (K_TILE + 1,), 3, layouts=("offset",), glayout="offset"),
    C("offset2d_k4", (7, 33), 4, layouts=("offset",), wstrided=True, mask="alt"),
    C("expanded_k3", (16, 33), 3, layouts=("expanded",), glayout="expanded"),
    C("expanded1d_k2", (257,), 2, layouts=("expanded",), wdtype="f32"),
    C("channels_last_k3", (2, 8, 5, 7), 3, layouts=("channels_last",), glayout="channels_last"),
    C("channels_last_big_k2", (2, 16, 33, 31), 2, layouts=("channels_last",), wdtype="f32"),
    C("channels_last_grad_contig_k5", (3, 6, 9, 4), 5, layouts=("channels_last",), mask="alt"),
    C("channels_last_3d_k2", (2, 4, 3, 5, 6), 2, layouts=("channels_last_3d",), glayout="channels_last_3d"),
    C(
        "mixed_layouts_k5",
        (2, 8, 5, 7),
        5,
        layouts=("channels_last", "contiguous", "transposed", "offset", "expanded"),
        wdtype="f32",
        mask="first_last",
        glayout="channels_last",
    ),
    C("cl_and_sliced_k3", (3, 6, 9, 4), 3, layouts=("channels_last", "sliced"), glayout="transposed"),
    C("k16_4d_contig", (3, 5, 7, 9), 16, wstrided=True),
    # the same tensor passed several times: gradients must add up
    C("aliased_k4", (5, 33), 4, idx=(0, 1, 0, 0), layouts=("contiguous", "transposed")),
]


def make_case(case: Case, dtype, device, requires_grad: bool):
    """(leaves, ys, weights) for a case; leaves are the distinct inputs, ys index into them."""
    idx = case.idx if case.idx is not None else tuple(range(case.K))
    assert len(idx) == case.K
    n_leaves = max(idx) + 1
    leaves = [randn(case.shape, dtype, device, case.layouts[i % len(case.layouts)]) for i in range(n_leaves)]
    wdt = torch.float32 if case.wdtype == "f32" else dtype
    if case.wstrided:
        w = torch.randn(2 * case.K, dtype=torch.float64, device=device)[::2].to(wdt)
    else:
        w = torch.randn(case.K, dtype=torch.float64, device=device).to(wdt)
    if requires_grad:
        leaf_rg = {
            "all": lambda i: True,
            "ys_only": lambda i: True,
            "w_only": lambda i: False,
            "alt": lambda i: i % 2 == 0,
            "first_last": lambda i: i in (0, n_leaves - 1),
        }[case.mask]
        for i, leaf in enumerate(leaves):
            leaf.requires_grad_(leaf_rg(i))
        w.requires_grad_(case.mask != "ys_only")
    ys = [leaves[i] for i in idx]
    return leaves, idx, ys, w


def exact_forward(ys, w):
    """float64 result and magnitude scale sum_k |w_k| |y_k|."""
    w64 = w.detach().double()
    Y = torch.stack([y.detach().double() for y in ys])
    out = torch.tensordot(w64, Y, dims=1)
    scale = torch.tensordot(w64.abs(), Y.abs(), dims=1)
    return out, scale


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward(case, dtype, device):
    _, _, ys, w = make_case(case, dtype, device, requires_grad=False)
    numel = ys[0].numel()
    # K + 2 blocks: the op may first make dense copies of strided inputs
    poison(numel, dtype, device, count=case.K + 2)
    out = gaea_ext.mixed_op(ys, w)

    assert out.dtype == dtype and out.device == ys[0].device and out.shape == ys[0].shape
    fmt = expected_format(ys)
    assert out.is_contiguous(memory_format=fmt), f"output strides {out.stride()} are not dense in {fmt}"
    for y in ys:
        assert not y.requires_grad

    ref = reference.mixed_op(ys, w)
    exact, scale = exact_forward(ys, w)
    assert_accurate(out, ref, exact, scale, acc_dtype(dtype), f"{case.name} forward")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
def test_forward_k_values_and_weights_on_simplex(dtype, device):
    """Every K from the issue (1..64) at a vector-unfriendly size, softmaxed weights."""
    for K in (1, 2, 3, 5, 8, 9, 16, 64):
        ys = [randn((3, 37), dtype, device) for _ in range(K)]
        w = torch.softmax(torch.randn(K, device=device), 0)  # float32 weights
        poison(ys[0].numel(), dtype, device)
        out = gaea_ext.mixed_op(ys, w)
        exact, scale = exact_forward(ys, w)
        assert_accurate(out, reference.mixed_op(ys, w), exact, scale, acc_dtype(dtype), f"K={K}")


@pytest.mark.parametrize("device", DEVICES)
def test_forward_output_is_fresh_and_inputs_untouched(device):
    ys = [randn((5, 7), torch.float32, device) for _ in range(3)]
    before = [y.clone() for y in ys]
    w = torch.randn(3, device=device)
    out = gaea_ext.mixed_op(ys, w)
    for y, b in zip(ys, before):
        assert torch.equal(y, b)
        assert out.data_ptr() != y.data_ptr()
    # K = 1 with weight 1 must still be a new tensor, not an alias of the input
    one = gaea_ext.mixed_op(ys[:1], torch.ones(1, device=device))
    assert one.data_ptr() != ys[0].data_ptr()
    torch.testing.assert_close(one, ys[0], rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------


def exact_backward(ys, w, g):
    """Per position k: float64 grad_y (w_k g) with scale |w_k||g|, grad_w_k = sum(g y_k)
    with scale sum |g||y_k|."""
    g64 = g.detach().double()
    w64 = w.detach().double()
    gy = [(w64[k] * g64, w64[k].abs() * g64.abs()) for k in range(len(ys))]
    Y = torch.stack([y.detach().double() for y in ys]).reshape(len(ys), -1)
    gw = Y @ g64.reshape(-1)
    gw_scale = Y.abs() @ g64.abs().reshape(-1)
    return gy, (gw, gw_scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward(case, dtype, device):
    leaves, idx, ys, w = make_case(case, dtype, device, requires_grad=True)
    acc = acc_dtype(dtype)
    g = randn(case.shape, dtype, device, case.glayout)
    numel = g.numel()
    gy_exact, (gw_exact, gw_scale) = exact_backward(ys, w, g)

    # --- the backward op itself: only the requested grads, in the ys layout -------------
    mask = [bool(y.requires_grad) for y in ys]
    poison(numel, dtype, device, count=case.K + 2)
    grad_ys, grad_w = torch.ops.gaea.mixed_op_backward(g, [y.detach() for y in ys], w.detach(), mask)
    assert len(grad_ys) == sum(mask), f"got {len(grad_ys)} grads for mask {mask}"
    assert grad_w.dtype == w.dtype and grad_w.shape == (case.K,)
    fmt = expected_format(ys)
    got = iter(grad_ys)
    for k, needed in enumerate(mask):
        if not needed:
            continue
        gk = next(got)
        assert gk.dtype == dtype and gk.shape == ys[0].shape
        assert gk.is_contiguous(memory_format=fmt), f"grad_ys strides {gk.stride()} not dense in {fmt}"
        assert_accurate(gk, None, gy_exact[k][0], gy_exact[k][1], acc, f"{case.name} op grad_ys[{k}]")
    assert_accurate(grad_w, None, gw_exact, gw_scale, acc, f"{case.name} op grad_weights")

    # --- through autograd, against gaea_ext.reference ------------------------------------
    ref_leaves = [l.detach().clone().requires_grad_(l.requires_grad) for l in leaves]
    ref_w = w.detach().clone().requires_grad_(w.requires_grad)
    ref_out = reference.mixed_op([ref_leaves[i] for i in idx], ref_w)
    poison(numel, dtype, device, count=case.K + 2)
    out = gaea_ext.mixed_op(ys, w)
    assert out.requires_grad
    out.backward(g)
    ref_out.backward(g)

    for i, (leaf, ref_leaf) in enumerate(zip(leaves, ref_leaves)):
        if not leaf.requires_grad:
            assert leaf.grad is None, f"leaf {i} does not require grad but got one"
            continue
        assert leaf.grad is not None and leaf.grad.dtype == dtype
        positions = [k for k, j in enumerate(idx) if j == i]
        exact = sum(gy_exact[k][0] for k in positions)
        scale = sum(gy_exact[k][1] for k in positions)
        # autograd rounds each position's grad to the dtype and sums them in the dtype
        assert_accurate(leaf.grad, ref_leaf.grad, exact, scale, acc, f"{case.name} grad of input {i}",
                        roundings=2 * len(positions) - 1)
    if w.requires_grad:
        assert w.grad is not None and w.grad.dtype == w.dtype
        assert_accurate(w.grad, ref_w.grad, gw_exact, gw_scale, acc, f"{case.name} grad_weights")
        # autograd returns exactly what the op computes
        assert_bitwise_equal(w.grad, grad_w, "autograd grad_weights vs mixed_op_backward")
    else:
        assert w.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
def test_backward_masks_through_autograd_grad(dtype, device):
    """torch.autograd.grad over every requires_grad pattern of K=3 inputs + weights."""
    shape = (7, 9)
    for bits in range(1, 16):
        ys = [randn(shape, dtype, device) for _ in range(3)]
        w = torch.randn(3, device=device)  # float32 weights: the AMP case
        for k in range(3):
            ys[k].requires_grad_(bool(bits >> k & 1))
        w.requires_grad_(bool(bits >> 3 & 1))
        inputs = [t for t in (*ys, w) if t.requires_grad]
        if not inputs:
            continue
        g = randn(shape, dtype, device)
        got = torch.autograd.grad(gaea_ext.mixed_op(ys, w), inputs, g)
        want = torch.autograd.grad(reference.mixed_op(ys, w), inputs, g)
        gy_exact, (gw_exact, gw_scale) = exact_backward(ys, w, g)
        exacts = [gy_exact[k] for k in range(3) if ys[k].requires_grad]
        if w.requires_grad:
            exacts.append((gw_exact, gw_scale))
        for a, r, (e, s), t in zip(got, want, exacts, inputs):
            assert a.dtype == t.dtype and a.shape == t.shape
            assert_accurate(a, r, e, s, acc_dtype(dtype), f"mask {bits:04b}")


@pytest.mark.parametrize("device", DEVICES)
def test_backward_op_all_masks_false_and_ys_mask_length(device):
    ys = [randn((4, 5), torch.float32, device) for _ in range(3)]
    w = torch.randn(3, device=device)
    g = randn((4, 5), torch.float32, device)
    grad_ys, grad_w = torch.ops.gaea.mixed_op_backward(g, ys, w, [False, False, False])
    assert len(grad_ys) == 0
    exact = torch.stack([(g.double() * y.double()).sum() for y in ys])
    torch.testing.assert_close(grad_w.double(), exact, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="ys_mask has 2 entries for 3 inputs"):
        torch.ops.gaea.mixed_op_backward(g, ys, w, [True, False])
    with pytest.raises(RuntimeError, match="grad must match ys in shape"):
        torch.ops.gaea.mixed_op_backward(g.double(), ys, w, [True, True, True])
    with pytest.raises(RuntimeError, match="grad must match ys in shape"):
        torch.ops.gaea.mixed_op_backward(g[:3], ys, w, [True, True, True])


# --------------------------------------------------------------------------------------
# Determinism of the weight gradient
# --------------------------------------------------------------------------------------

DET_SHAPE = (5 * K_CHUNK + 7,)  # several CPU chunks, many CUDA blocks


def _grads(ys, w, g):
    for t in (*ys, w):
        t.grad = None
    gaea_ext.mixed_op(ys, w).backward(g)
    return [y.grad.clone() for y in ys], w.grad.clone()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
def test_backward_deterministic(dtype, device):
    K = 5
    ys = [randn(DET_SHAPE, dtype, device).requires_grad_() for _ in range(K)]
    w = torch.randn(K, device=device).to(dtype).requires_grad_()
    g = randn(DET_SHAPE, dtype, device)
    gys1, gw1 = _grads(ys, w, g)
    gys2, gw2 = _grads(ys, w, g)
    assert_bitwise_equal(gw1, gw2, "grad_weights, run 1 vs run 2")
    for a, b in zip(gys1, gys2):
        assert_bitwise_equal(a, b, "grad_ys, run 1 vs run 2")
    # and the value is right
    _, (gw_exact, gw_scale) = exact_backward(ys, w, g)
    assert_accurate(gw1, None, gw_exact, gw_scale, acc_dtype(dtype), "grad_weights")


@pytest.mark.parametrize("dtype", dtype_params())
def test_backward_deterministic_across_cpu_thread_counts(dtype, restore_num_threads):
    K = 3
    ys = [randn(DET_SHAPE, dtype, "cpu").requires_grad_() for _ in range(K)]
    w = torch.randn(K).requires_grad_()
    g = randn(DET_SHAPE, dtype, "cpu")
    results = {}
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        results[n] = (_grads(ys, w, g), gaea_ext.mixed_op(ys, w).detach())
    (gys1, gw1), out1 = results[1]
    for n in (2, 3):
        (gysn, gwn), outn = results[n]
        assert_bitwise_equal(gw1, gwn, f"grad_weights with 1 vs {n} threads")
        assert_bitwise_equal(out1, outn, f"forward with 1 vs {n} threads")
        for a, b in zip(gys1, gysn):
            assert_bitwise_equal(a, b, f"grad_ys with 1 vs {n} threads")


# --------------------------------------------------------------------------------------
# gradcheck (float64)
# --------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    ((7,), 1, ("contiguous",)),
    ((3, 5), 3, ("contiguous", "transposed", "sliced")),
    ((2, 3, 4, 3), 2, ("channels_last",)),
    ((2, 3, 4, 3), 3, ("channels_last", "offset")),
    ((4, 5), 2, ("offset", "sliced")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,K,layouts", GRADCHECK_CASES, ids=lambda v: str(v))
def test_gradcheck(shape, K, layouts, device):
    ys = [randn(shape, torch.float64, device, layouts[k % len(layouts)]).requires_grad_() for k in range(K)]
    w = torch.randn(K, dtype=torch.float64, device=device, requires_grad=True)
    n = len(ys)
    fn = lambda *args: gaea_ext.mixed_op(args[:n], args[n])  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*ys, w), eps=1e-6, atol=1e-8, rtol=1e-7)
    # some inputs without grad
    ys[0].requires_grad_(False)
    assert torch.autograd.gradcheck(fn, (*ys, w), eps=1e-6, atol=1e-8, rtol=1e-7)


# --------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------


def _opcheck_samples(device):
    f32, f64, f16, bf16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
    samples = []
    # (shape, dtype, weight dtype, layouts, requires_grad)
    specs = [
        ((5, 7), f32, f32, ("contiguous",), True),
        ((2, 8, 5, 7), f16, f32, ("channels_last",), True),
        ((2, 4, 3, 5, 6), bf16, bf16, ("channels_last_3d",), False),
        ((9, 6), f64, f64, ("transposed", "sliced"), True),
        ((33,), f32, f32, ("offset", "expanded", "contiguous"), False),
        ((2, 6, 3, 4), f64, f32, ("channels_last", "contiguous"), True),
        ((0, 3), f32, f32, ("contiguous",), False),
    ]
    for shape, dt, wdt, layouts, rg in specs:
        K = max(2, len(layouts))
        ys = [randn(shape, dt, device, layouts[k % len(layouts)]).requires_grad_(rg) for k in range(K)]
        w = torch.randn(K, device=device).to(wdt).requires_grad_(rg)
        samples.append((ys, w))
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_mixed_op(device):
    for ys, w in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.gaea.mixed_op, (ys, w))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_mixed_op_backward(device):
    for i, (ys, w) in enumerate(_opcheck_samples(device)):
        ys = [y.detach() for y in ys]
        w = w.detach()
        K = len(ys)
        g = randn(ys[0].shape, ys[0].dtype, device, "transposed" if ys[0].dim() >= 2 and i % 2 else "contiguous")
        for mask in ([True] * K, [k % 2 == 1 for k in range(K)], [False] * K):
            for weights_grad in (True, False):
                torch.library.opcheck(torch.ops.gaea.mixed_op_backward, (g, ys, w, mask, weights_grad))


# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------


def _model(y0, y1, y2, alpha):
    # a NAS-style edge: three candidate outputs mixed with softmaxed architecture weights
    out = gaea_ext.mixed_op([y0, y1, y2 * 2], torch.softmax(alpha, -1))
    return torch.tanh(out) + y0


def _run(fn, inputs, g):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(g)
    return out.detach(), [l.grad for l in leaves]


def _compile_inputs(shape, dtype, device, layout="contiguous"):
    ys = [randn(shape, dtype, device, layout) for _ in range(3)]
    alpha = torch.randn(3, device=device)
    return [*ys, alpha]


@pytest.mark.parametrize("device", DEVICES)
def test_compile_aot_eager_fullgraph(device):
    torch._dynamo.reset()
    compiled = torch.compile(_model, backend="aot_eager", fullgraph=True)
    for shape, dtype, layout in (
        ((6, 10), torch.float32, "contiguous"),
        ((2, 4, 3, 5), torch.float16, "channels_last"),
    ):
        inputs = _compile_inputs(shape, dtype, device, layout)
        g = randn(shape, dtype, device)
        out_e, grads_e = _run(_model, inputs, g)
        out_c, grads_c = _run(compiled, inputs, g)
        # aot_eager runs the same kernels: forward must be identical, grads nearly so
        torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
        tol = 1e-6 if dtype == torch.float32 else 2e-3
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_dynamic_shapes(device):
    torch._dynamo.reset()
    compiled = torch.compile(_model, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (17, 1025):
        inputs = _compile_inputs((3, n), torch.float32, device)
        g = randn((3, n), torch.float32, device)
        out_e, grads_e = _run(_model, inputs, g)
        out_c, grads_c = _run(compiled, inputs, g)
        torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_inductor_fullgraph(device):
    """The default backend once (generates and compiles C++/Triton code around the op)."""
    torch._dynamo.reset()
    compiled = torch.compile(_model, fullgraph=True)
    inputs = _compile_inputs((4, 33), torch.float32, device)
    g = randn((4, 33), torch.float32, device)
    out_e, grads_e = _run(_model, inputs, g)
    out_c, grads_c = _run(compiled, inputs, g)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def _y(device, shape=(3, 4), dtype=torch.float32):
    return torch.randn(shape, device=device, dtype=dtype)


BAD_INPUTS = [
    ("empty_ys", lambda d: ([], torch.randn(0, device=d)), r"ys is an empty list"),
    (
        "k65",
        lambda d: ([_y(d) for _ in range(MAX_K + 1)], torch.randn(MAX_K + 1, device=d)),
        r"at most 64 candidates are supported, got 65",
    ),
    ("shape_mismatch", lambda d: ([_y(d), _y(d, (4, 3))], torch.randn(2, device=d)), r"ys\[1\] has shape"),
    (
        "dtype_mismatch",
        lambda d: ([_y(d), _y(d, dtype=torch.float64)], torch.randn(2, device=d)),
        r"ys\[1\] has dtype",
    ),
    ("weights_too_short", lambda d: ([_y(d)] * 3, torch.randn(2, device=d)), r"weights has length 2 but there are 3"),
    ("weights_too_long", lambda d: ([_y(d)] * 3, torch.randn(4, device=d)), r"weights has length 4 but there are 3"),
    ("weights_2d", lambda d: ([_y(d)] * 3, torch.randn(1, 3, device=d)), r"weights must be 1-D"),
    ("weights_0d", lambda d: ([_y(d)], torch.randn((), device=d)), r"weights must be 1-D"),
    (
        "weights_f64_ys_f32",
        lambda d: ([_y(d)] * 2, torch.randn(2, device=d, dtype=torch.float64)),
        r"weights must be float32 or the ys dtype",
    ),
    (
        "weights_f16_ys_bf16",
        lambda d: ([_y(d, dtype=torch.bfloat16)] * 2, torch.randn(2, device=d, dtype=torch.float16)),
        r"weights must be float32 or the ys dtype",
    ),
    (
        "int_ys",
        lambda d: ([torch.ones(3, 4, device=d, dtype=torch.int32)] * 2, torch.randn(2, device=d)),
        r"ys must be float32, float64, float16 or bfloat16",
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,build,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises(name, build, match, device):
    ys, w = build(device)
    with pytest.raises(RuntimeError, match=match):
        gaea_ext.mixed_op(ys, w)
    # the backward op validates the same way
    if ys:
        g = torch.randn(ys[0].shape, device=device).to(ys[0].dtype)
        with pytest.raises(RuntimeError, match=match):
            torch.ops.gaea.mixed_op_backward(g, ys, w, [True] * len(ys))


@cuda_only
def test_bad_input_mixed_devices():
    a, b = _y("cuda"), _y("cpu")
    with pytest.raises(RuntimeError, match=r"ys\[1\] is on"):
        gaea_ext.mixed_op([a, b], torch.randn(2, device="cuda"))
    with pytest.raises(RuntimeError, match=r"weights are on"):
        gaea_ext.mixed_op([a, a], torch.randn(2))
    with pytest.raises(RuntimeError, match=r"grad must match ys"):
        torch.ops.gaea.mixed_op_backward(torch.randn(3, 4), [a, a], torch.randn(2, device="cuda"), [True, True])


@cuda_only
def test_bad_input_cpu_tensor_first_cuda():
    """ys[0] on the CPU and another input on CUDA dispatch to the CUDA kernel, which must
    validate before it sets a device guard from ys[0] (a CPU device there is an internal error)."""
    a, b = _y("cuda"), _y("cpu")
    with pytest.raises(RuntimeError, match=r"ys\[1\] is on cuda.* but ys\[0\] is on cpu"):
        gaea_ext.mixed_op([b, a], torch.randn(2, device="cuda"))
    with pytest.raises(RuntimeError, match=r"weights are on cuda.* but ys are on cpu"):
        gaea_ext.mixed_op([b, b], torch.randn(2, device="cuda"))
    with pytest.raises(RuntimeError, match=r"ys\[1\] is on cuda.* but ys\[0\] is on cpu"):
        torch.ops.gaea.mixed_op_backward(torch.randn(3, 4, device="cuda"), [b, a], torch.randn(2, device="cuda"),
                                         [True, True])


# --------------------------------------------------------------------------------------
# weights_grad=False and second derivatives
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
def test_backward_without_weight_grad_skips_dots(dtype, device):
    """A weight step (architecture detached) needs only grad_ys; grad_weights comes back zero."""
    K, shape = 5, (2, 3, 33, 17)
    ys = [randn(shape, dtype, device) for _ in range(K)]
    w = torch.rand(K, device=device)
    g = randn(shape, dtype, device)
    full_ys, full_w = torch.ops.gaea.mixed_op_backward(g, ys, w, [True] * K, True)
    part_ys, part_w = torch.ops.gaea.mixed_op_backward(g, ys, w, [True] * K, False)
    for a, b in zip(full_ys, part_ys):
        assert_bitwise_equal(a, b, "grad_ys with and without weight grads")
    assert torch.count_nonzero(full_w) == K
    assert torch.count_nonzero(part_w) == 0
    # Through autograd: weights that do not require grad take this path.
    yr = [y.clone().requires_grad_() for y in ys]
    got = torch.autograd.grad(gaea_ext.mixed_op(yr, w), yr, g)
    for a, b in zip(full_ys, got):
        assert_bitwise_equal(a, b, "autograd grad_ys with frozen weights")


@pytest.mark.parametrize("device", DEVICES)
def test_gradgradcheck(device):
    ys = [torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True) for _ in range(3)]
    w = torch.rand(3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b, c, ww: gaea_ext.mixed_op([a, b, c], ww), (*ys, w))
