"""gaea_ext.eg_update_: the in-place exponentiated-gradient step on every row of every param.

Oracles: gaea_ext.reference.eg_update_formula_ (the literal formula, evaluated in float64 for
moderate values) and gaea_ext.reference.eg_update_ (the overflow-safe log-domain twin, in the
params' dtype) for extreme values and non-finite rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import pytest
import torch

import gaea_ext
from gaea_ext import reference
from conftest import (
    DEVICES,
    Tol,
    assert_bitwise_equal,
    assert_close_tol,
    assert_on_simplex,
    cuda_only,
    dtype_params,
    eg_tol,
    simplex,
)

# --------------------------------------------------------------------------------------
# Params laid out as views into a larger buffer whose other elements must stay untouched
# --------------------------------------------------------------------------------------


def _view_spec(shape: Tuple[int, ...], layout: str):
    """(base shape, view function) so that view(base) has `shape` in the given layout."""
    if layout == "contiguous":
        return shape, lambda b: b
    if layout == "transposed":  # rows are columns of the buffer
        return shape[:-2] + (shape[-1], shape[-2]), lambda b: b.transpose(-1, -2)
    if layout == "sliced":  # every second element of each row
        return shape[:-1] + (2 * shape[-1],), lambda b: b[..., ::2]
    if layout == "offset":  # storage offset of one element: breaks 16-byte alignment
        n = math.prod(shape)
        return (n + 1,), lambda b: b[1:].view(shape)
    if layout == "rows_strided":  # every second row
        return (2 * shape[0],) + shape[1:], lambda b: b[::2]
    if layout == "expanded":  # stride-0 leading dim (grads only: overlapping memory)
        return (1,) + shape[1:], lambda b: b.expand(shape)
    if layout == "channels_last":  # 4-D NCHW view of an NHWC buffer: last dim (W) strided
        n, c, h, w = shape
        return (n, h, w, c), lambda b: b.permute(0, 3, 1, 2)
    raise ValueError(layout)


@dataclass
class Param:
    p: torch.Tensor  # the view passed to the op
    base: torch.Tensor  # its whole buffer
    outside: torch.Tensor  # bool mask over base: elements not in the view
    base_before: torch.Tensor

    def assert_outside_untouched(self, what):
        assert torch.equal(self.base[self.outside], self.base_before[self.outside]), (
            f"{what}: elements outside the param view were written"
        )


def make_param(shape, dtype, device, layout="contiguous", spread=1.0) -> Param:
    shape = tuple(shape)
    base_shape, view = _view_spec(shape, layout)
    base = torch.full(base_shape, -3.0, dtype=dtype, device=device)  # sentinel, not on any simplex
    p = view(base)
    assert p.shape == shape
    p.copy_(simplex(shape, dtype, device, spread))
    inside = torch.zeros(base_shape, dtype=torch.bool, device=device)
    view(inside).fill_(True)
    return Param(p, base, ~inside, base.clone())


def make_grad(shape, dtype, device, layout="contiguous", scale=2.0) -> torch.Tensor:
    shape = tuple(shape)
    base_shape, view = _view_spec(shape, layout)
    return view((scale * torch.randn(base_shape, dtype=torch.float64, device=device)).to(dtype))


def formula64(ps: Sequence[torch.Tensor], gs: Sequence[torch.Tensor], lr: float, eps: float) -> List[torch.Tensor]:
    out = [p.detach().double().clone() for p in ps]
    reference.eg_update_formula_(out, [g.double() for g in gs], lr, eps)
    return out


# --------------------------------------------------------------------------------------
# Case table
# --------------------------------------------------------------------------------------

DARTS = [((14, 8), "contiguous"), ((14, 8), "contiguous")] + [((n,), "contiguous") for n in (2, 3, 4, 5)] * 2


@dataclass
class ECase:
    name: str
    params: List[Tuple[Tuple[int, ...], str]]  # (shape, layout) per param
    glayout: str = "contiguous"
    lr: float = 0.5
    eps: float = 1e-5
    gscale: float = 2.0

    def __str__(self):
        return self.name


E = ECase
EG_CASES = [
    E("single_row1", [((1,), "contiguous")]),
    E("rows_of_length1", [((5, 1), "contiguous")]),
    E("vec3", [((3,), "contiguous")], lr=1.5),
    E("vec7", [((7,), "contiguous")]),
    E("vec9_vec17", [((9,), "contiguous"), ((17,), "contiguous")]),
    E("darts", DARTS),
    E("darts_big_lr_eps_active", DARTS, lr=3.0, gscale=5.0, eps=1e-3),
    E("3d", [((2, 3, 4), "contiguous")], glayout="transposed"),
    E("many_rows", [((1000, 33), "contiguous")]),
    E("many_short_rows_parallel", [((40000, 2), "contiguous")]),
    E("long_rows", [((3, 16385), "contiguous"), ((2, 1025), "contiguous"), ((4, 257), "contiguous")], lr=0.05),
    E("transposed", [((9, 14), "transposed"), ((8,), "contiguous")]),
    E("transposed_grads_too", [((14, 8), "transposed")], glayout="transposed"),
    E("sliced", [((14, 8), "sliced")], glayout="sliced"),
    E("offset", [((7, 9), "offset"), ((5,), "offset")], glayout="offset"),
    E("rows_strided", [((6, 5), "rows_strided")]),
    E("expanded_grads", [((6, 5), "contiguous"), ((3, 2, 7), "sliced")], glayout="expanded"),
    E("channels_last_4d", [((2, 3, 4, 5), "channels_last")], glayout="channels_last"),
    E("with_empty", [((0, 5), "contiguous"), ((3, 4), "contiguous")]),
    E("eps0", [((6, 7), "contiguous"), ((4,), "contiguous")], eps=0.0),
    E("lr0", [((6, 7), "contiguous")], lr=0.0),
]


def _fits(shape, layout):
    return {"transposed": len(shape) >= 2, "channels_last": len(shape) == 4}.get(layout, True)


def build(case: ECase, dtype, device):
    params = [make_param(s, dtype, device, lay) for s, lay in case.params]
    grads = [
        make_grad(s, dtype, device, case.glayout if _fits(s, case.glayout) else "contiguous", case.gscale)
        for s, _ in case.params
    ]
    return params, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", EG_CASES, ids=str)
def test_matches_formula_and_reference(case, dtype, device):
    params, grads = build(case, dtype, device)
    ps = [q.p for q in params]
    p0 = [p.clone() for p in ps]
    g0 = [g.clone() for g in grads]
    ptrs = [p.data_ptr() for p in ps]

    expected = formula64(p0, grads, case.lr, case.eps)
    ref = [p.clone() for p in p0]
    ref_count = reference.eg_update_(ref, grads, case.lr, case.eps)

    count = gaea_ext.eg_update_(ps, grads, case.lr, case.eps)

    assert isinstance(count, torch.Tensor) and count.dtype == torch.int64 and count.dim() == 0
    assert count.device == ps[0].device
    assert int(count) == 0 == int(ref_count)
    tol = eg_tol(dtype)
    for i, (q, e, r) in enumerate(zip(params, expected, ref)):
        assert q.p.data_ptr() == ptrs[i], "param was replaced, not updated in place"
        assert q.p.dtype == dtype
        assert_close_tol(q.p, e, tol, f"{case.name} param {i} vs formula")
        assert_close_tol(q.p, r, tol, f"{case.name} param {i} vs reference.eg_update_")
        assert_on_simplex(q.p, f"{case.name} param {i}")
        q.assert_outside_untouched(f"{case.name} param {i}")
        if case.lr != 0 and q.p.numel() and q.p.shape[-1] > 1:
            assert not torch.equal(q.p, p0[i]), f"{case.name} param {i} was not updated"
    for g, g_ in zip(grads, g0):
        assert torch.equal(g, g_), "grads were modified"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
def test_eps_clamp_is_applied_before_normalization(dtype, device):
    """Large steps drive entries below eps; they must come out as eps / row sum."""
    eps = 1e-2
    p = simplex((8, 6), dtype, device)
    g = torch.zeros(8, 6, dtype=dtype, device=device)
    g[:, 1:] = 50.0  # all but entry 0 get multiplied by exp(-50): clamped to eps
    g += 0.01 * torch.randn(8, 6, device=device).to(dtype)  # fresh noise, never a zero grad
    expected = formula64([p], [g], 1.0, eps)[0]
    gaea_ext.eg_update_([p], [g], 1.0, eps)
    assert_close_tol(p, expected, eg_tol(dtype), "clamped step")
    # entries 1..5 were all clamped to eps, so they are equal: eps / (max(p0, eps) + 5 eps)
    assert bool((p[:, 1:] == p[:, 1:2]).all()), "clamped entries differ within a row"
    assert_on_simplex(p, "clamped step")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
def test_all_zero_row(dtype, device):
    """eps > 0: a row of zeros becomes uniform (clamp then normalize). eps == 0: undefined,
    so the row is left as is and counted."""
    p = simplex((3, 4), dtype, device)
    p[1] = 0
    g = torch.randn(3, 4, device=device).to(dtype)
    expected = formula64([p], [g], 0.5, 1e-5)[0]
    n = gaea_ext.eg_update_([p], [g], 0.5, 1e-5)
    assert int(n) == 0
    assert_close_tol(p, expected, eg_tol(dtype), "eps>0")
    assert_close_tol(p[1], torch.full((4,), 0.25, dtype=torch.float64, device=device), eg_tol(dtype), "uniform row")

    p = simplex((3, 4), dtype, device)
    p[1] = 0
    before = p.clone()
    ref = p.clone()
    n_ref = reference.eg_update_([ref], [g], 0.5, 0.0)
    n = gaea_ext.eg_update_([p], [g], 0.5, 0.0)
    assert int(n) == 1 == int(n_ref)
    assert torch.equal(p[1], before[1])
    assert_close_tol(p, ref, eg_tol(dtype), "eps=0 vs reference")


# --------------------------------------------------------------------------------------
# Extreme steps: |lr * g| up to 1e4 overflows the literal formula, not the op
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_huge_steps_are_stable(eps, dtype, device):
    lr = 1.0
    shapes = [(14, 8), (5,), (64, 3)]
    ps = [simplex(s, dtype, device) for s in shapes]
    gs = []
    for s in shapes:
        g = 1e4 * (2 * torch.rand(s, dtype=torch.float64, device=device) - 1)
        g.view(-1)[0] = 1e4
        g.view(-1)[-1] = -1e4
        gs.append(g.to(dtype))
    # the literal formula really overflows here (otherwise this test would prove nothing)
    lit = [p.clone() for p in ps]
    reference.eg_update_formula_(lit, gs, lr, eps)
    assert not all(bool(torch.isfinite(t).all()) for t in lit), "test inputs do not overflow the formula"

    ref = [p.clone() for p in ps]
    n_ref = reference.eg_update_(ref, gs, lr, eps)
    n = gaea_ext.eg_update_(ps, gs, lr, eps)
    assert int(n) == 0 == int(n_ref)
    # the log-domain results are essentially one-hot: the few entries left of order one see
    # the same rounding as the reference; allow a little more for float32 exp/log differences
    # Logits near 1e4 are rounded to ulp(1e4) in the acc dtype (1e-3 in float32), so the
    # few entries that survive next to the row max may differ by a few such ulps in relative
    # terms between two correct log-domain implementations (e.g. with or without FMA).
    base = eg_tol(dtype)
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    tol = Tol(base.rtol + 4 * 1e4 * acc_eps, base.atol)
    for i, (p, r) in enumerate(zip(ps, ref)):
        assert bool(torch.isfinite(p).all()), f"param {i} has inf/NaN"
        assert_on_simplex(p, f"param {i}")
        assert_close_tol(p, r, tol, f"param {i} vs reference.eg_update_")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_huge_steps_match_formula_where_formula_is_finite(dtype, device):
    """exp(-lr g) with lr g = -80 is 5e34: fine in float64, and log-domain agrees."""
    p = simplex((16, 6), dtype, device)
    g = (80 * (2 * torch.rand(16, 6, device=device, dtype=torch.float64) - 1)).to(dtype)
    expected = formula64([p], [g], 1.0, 1e-5)[0]
    gaea_ext.eg_update_([p], [g], 1.0, 1e-5)
    tol = Tol(1e-10, 1e-300) if dtype == torch.float64 else Tol(1e-4, 1e-30)
    assert_close_tol(p, expected, tol, "lr*g in [-80, 80]")


# --------------------------------------------------------------------------------------
# Non-finite rows are skipped and counted
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
def test_nonfinite_rows_skipped_and_counted(dtype, device):
    nan, inf = float("nan"), float("inf")
    a = simplex((6, 5), dtype, device)
    b = simplex((4, 7), dtype, device)
    c = simplex((9,), dtype, device)
    ga = torch.randn(6, 5, device=device).to(dtype)
    gb = torch.randn(4, 7, device=device).to(dtype)
    gc = torch.randn(9, device=device).to(dtype)
    ga[1, 2] = nan
    ga[3, 0] = inf
    ga[4, 4] = -inf
    gb[2, 6] = nan
    gb[2, 0] = inf
    b[0, 3] = nan  # a non-finite param also makes its row undefined
    b[3, 1] = inf
    a[5, 2] = -0.1  # so does a negative one (log undefined), as in reference.eg_update_
    gc[5] = nan  # a whole 1-D param is one row
    bad = {0: [1, 3, 4, 5], 1: [0, 2, 3], 2: [0]}
    ps, gs = [a, b, c], [ga, gb, gc]
    before = [p.clone() for p in ps]
    ref = [p.clone() for p in ps]
    n_ref = reference.eg_update_(ref, gs, 0.7)
    n = gaea_ext.eg_update_(ps, gs, 0.7)
    assert int(n) == 8 == int(n_ref)
    for i, p in enumerate(ps):
        rows = p.view(-1, p.shape[-1])
        rows_before = before[i].view(-1, p.shape[-1])
        for r in range(rows.shape[0]):
            if r in bad[i]:
                assert_bitwise_equal(rows[r], rows_before[r], f"param {i} skipped row {r}")
            else:
                assert not torch.equal(rows[r], rows_before[r]), f"param {i} good row {r} not updated"
                assert_on_simplex(rows[r], f"param {i} row {r}")
        good = torch.tensor([r not in bad[i] for r in range(rows.shape[0])], device=device)
        good_rows = rows[good]
        expected = formula64([rows_before[good]], [gs[i].view(-1, p.shape[-1])[good]], 0.7, 1e-5)[0]
        assert_close_tol(good_rows, expected, eg_tol(dtype), f"param {i} good rows")
        assert_close_tol(good_rows, ref[i].view(-1, p.shape[-1])[good], eg_tol(dtype), f"param {i} vs reference")


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_count_over_many_rows(device):
    """Rows are processed in parallel; the count must still be exact."""
    p = simplex((40000, 2), torch.float32, device)
    g = torch.randn(40000, 2, device=device)
    g[::7, 1] = float("nan")
    g[3::11, 0] = float("inf")
    bad = torch.zeros(40000, dtype=torch.bool, device=device)
    bad[::7] = True
    bad[3::11] = True
    before = p.clone()
    n = gaea_ext.eg_update_([p], [g], 0.3)
    assert int(n) == int(bad.sum())
    assert torch.equal(p[bad], before[bad])
    assert bool((p[~bad] != before[~bad]).any(-1).all())


# --------------------------------------------------------------------------------------
# lr as float / 0-d tensor, eps, mixed dtypes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
def test_lr_float_and_tensor_agree(dtype, device):
    lr = 0.375  # exact in every float type, so all paths must agree bitwise
    shapes = [(14, 8), (3,), (5, 33)]
    p0 = [simplex(s, dtype, device) for s in shapes]
    gs = [torch.randn(s, device=device).to(dtype) for s in shapes]
    expected = [p.clone() for p in p0]
    n_exp = gaea_ext.eg_update_(expected, gs, lr)
    lrs = {
        "0-d f32 on device": torch.tensor(lr, device=device),
        "0-d f64 on device": torch.tensor(lr, device=device, dtype=torch.float64),
        "0-d param dtype": torch.tensor(lr, device=device, dtype=dtype),
        "1-element 1-D": torch.tensor([lr], device=device),
    }
    if torch.device(device).type != "cpu":
        lrs["0-d f32 on cpu"] = torch.tensor(lr)
    for name, lr_t in lrs.items():
        ps = [p.clone() for p in p0]
        n = gaea_ext.eg_update_(ps, gs, lr_t)
        assert int(n) == int(n_exp)
        for i, (a, b) in enumerate(zip(ps, expected)):
            assert_bitwise_equal(a, b, f"lr {name}: param {i}")
    # the lr tensor is read at call time, not captured
    lr_t = torch.tensor(0.0, device=device)
    ps = [p.clone() for p in p0]
    lr_t.fill_(lr)
    gaea_ext.eg_update_(ps, gs, lr_t)
    for a, b in zip(ps, expected):
        assert_bitwise_equal(a, b, "lr tensor filled after creation")
    # and it is not the same as some other lr
    ps = [p.clone() for p in p0]
    gaea_ext.eg_update_(ps, gs, torch.tensor(0.5, device=device))
    assert not torch.equal(ps[0], expected[0])


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_in_one_call(device):
    specs = [((14, 8), torch.float32), ((14, 8), torch.float16), ((3,), torch.float64), ((5,), torch.bfloat16)]
    ps = [simplex(s, d, device) for s, d in specs]
    gs = [torch.randn(s, device=device).to(d) for s, d in specs]
    expected = [formula64([p], [g], 0.5, 1e-5)[0] for p, g in zip(ps, gs)]
    n = gaea_ext.eg_update_(ps, gs, 0.5)
    assert int(n) == 0
    for (s, d), p, e in zip(specs, ps, expected):
        assert p.dtype == d
        assert_close_tol(p, e, eg_tol(d), f"{d} param")


@pytest.mark.parametrize("device", DEVICES)
def test_degenerate_shapes(device):
    """Empty rows, empty tensors and 1-D zero-size params are no-ops next to real ones."""
    ps = [
        torch.empty(5, 0, device=device),
        torch.empty(0, device=device),
        torch.empty(0, 3, device=device),
        simplex((4, 3), torch.float32, device),
    ]
    gs = [torch.randn(p.shape, device=device) for p in ps]
    expected = formula64(ps[3:], gs[3:], 0.5, 1e-5)[0]
    n = gaea_ext.eg_update_(ps, gs, 0.5)
    assert int(n) == 0
    assert_close_tol(ps[3], expected, eg_tol(torch.float32), "the real param")


@pytest.mark.parametrize("device", DEVICES)
def test_many_steps_stay_on_simplex(device):
    ps = [simplex(s, torch.float16, device) for s, _ in DARTS]
    for _ in range(50):
        gs = [(3 * torch.randn(p.shape, device=device)).to(p.dtype) for p in ps]
        assert int(gaea_ext.eg_update_(ps, gs, 1.0)) == 0
    for i, p in enumerate(ps):
        assert_on_simplex(p, f"param {i}")


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def _pg(device, shape=(3, 4), dtype=torch.float32):
    return simplex(shape, dtype, device), torch.randn(shape, device=device).to(dtype)


BAD = [
    ("empty_params", lambda d: ([], [], 0.1, 1e-5), r"params is an empty list"),
    ("empty_params_lr_tensor", lambda d: ([], [], torch.tensor(0.1, device=d), 1e-5), r"params is an empty list"),
    ("length_mismatch", lambda d: ([_pg(d)[0], _pg(d)[0]], [_pg(d)[1]], 0.1, 1e-5), r"got 2 params but 1 grads"),
    (
        "shape_mismatch",
        lambda d: ([_pg(d)[0]], [torch.randn(4, 3, device=d)], 0.1, 1e-5),
        r"grads\[0\] has shape \[4, 3\] but params\[0\] has shape \[3, 4\]",
    ),
    (
        "dtype_mismatch",
        lambda d: ([_pg(d)[0]], [torch.randn(3, 4, device=d, dtype=torch.float64)], 0.1, 1e-5),
        r"grads\[0\] has dtype",
    ),
    (
        "int_params",
        lambda d: ([torch.ones(3, 4, dtype=torch.int64, device=d)], [torch.ones(3, 4, dtype=torch.int64, device=d)], 0.1, 1e-5),
        r"params\[0\] must be a float tensor",
    ),
    (
        "0d_param",
        lambda d: ([_pg(d)[0], torch.tensor(1.0, device=d)], [_pg(d)[1], torch.tensor(0.5, device=d)], 0.1, 1e-5),
        r"params\[1\] is 0-d",
    ),
    ("negative_eps", lambda d: ([_pg(d)[0]], [_pg(d)[1]], 0.1, -1e-5), r"eps must be >= 0"),
    (
        "lr_tensor_two_values",
        lambda d: ([_pg(d)[0]], [_pg(d)[1]], torch.tensor([0.1, 0.2], device=d), 1e-5),
        r"lr tensor must hold one value",
    ),
    (
        "lr_tensor_int",
        lambda d: ([_pg(d)[0]], [_pg(d)[1]], torch.tensor(1, device=d), 1e-5),
        r"lr tensor must be a float tensor",
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,build_args,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(name, build_args, match, device):
    ps, gs, lr, eps = build_args(device)
    before = [p.clone() for p in ps]
    with pytest.raises(RuntimeError, match=match):
        gaea_ext.eg_update_(ps, gs, lr, eps)
    for p, b in zip(ps, before):  # validation happens before anything is written
        assert torch.equal(p, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lr", [float("nan"), float("inf")])
def test_bad_input_nonfinite_float_lr(lr, device):
    # checked by each backend (csrc/cpu/eg_update_cpu.cpp, csrc/cuda/eg_update_cuda.cu)
    p, g = _pg(device)
    before = p.clone()
    with pytest.raises(RuntimeError, match=r"lr must be finite"):
        gaea_ext.eg_update_([p], [g], lr)
    assert torch.equal(p, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lr_device", ["params", "cpu"])
@pytest.mark.parametrize("lr", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_lr_tensor_skips_every_row(lr, lr_device, device):
    """A non-finite lr tensor is not checked on the host (a device value would need a sync):
    on every device, and in the reference twin, it leaves every row as it was and counts it.
    (inf with a zero grad would otherwise give NaN, and -inf a uniform row.)"""
    ps = [simplex((6, 5), torch.float32, device), simplex((7,), torch.float64, device),
          simplex((2, 3, 4), torch.float16, device), torch.empty(0, 3, device=device)]
    gs = [torch.randn(p.shape, device=device).to(p.dtype) for p in ps]
    gs[0][0].zero_()
    before = [p.clone() for p in ps]
    lr_t = torch.tensor(lr, device=device if lr_device == "params" else "cpu")
    n = gaea_ext.eg_update_(ps, gs, lr_t)
    assert n.device == ps[0].device and int(n) == 6 + 1 + 6
    for p, b in zip(ps, before):
        assert_bitwise_equal(p, b, "rows under a non-finite lr")
    ref = [p.clone() for p in before]
    assert int(reference.eg_update_(ref, gs, lr_t)) == 13
    for p, b in zip(ref, before):
        assert_bitwise_equal(p, b, "reference rows under a non-finite lr")
    with pytest.raises(RuntimeError, match=r"lr must be finite"):  # a float is checked, as before
        reference.eg_update_(ref, gs, lr)


@cuda_only
def test_bad_input_devices():
    p, g = _pg("cuda")
    pc, gc = _pg("cpu")
    with pytest.raises(RuntimeError, match=r"must be on the same device"):
        gaea_ext.eg_update_([p, pc], [g, gc], 0.1)
    with pytest.raises(RuntimeError, match=r"must be on the same device"):
        gaea_ext.eg_update_([p], [gc], 0.1)
    with pytest.raises(RuntimeError, match=r"lr tensor is on"):
        gaea_ext.eg_update_([pc], [gc], torch.tensor(0.1, device="cuda"))


# --------------------------------------------------------------------------------------
# opcheck, torch.compile, CUDA graphs
# --------------------------------------------------------------------------------------


def _opcheck_samples(device):
    f32, f64, f16, bf16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
    samples = []
    ps = [make_param((14, 8), f32, device).p, make_param((4,), f32, device).p]
    samples.append((ps, [make_grad(p.shape, f32, device) for p in ps], 0.3, None, 1e-5))
    ps = [make_param((9, 14), f32, device, "transposed").p, make_param((2, 3, 4, 5), f32, device, "channels_last").p]
    samples.append((ps, [make_grad(p.shape, f32, device) for p in ps], 0.0, torch.tensor(0.3, device=device), 1e-5))
    ps = [make_param((7, 9), f16, device, "offset").p, make_param((6, 5), f16, device, "rows_strided").p]
    samples.append((ps, [make_grad(p.shape, f16, device, "sliced") for p in ps], 0.3, None, 0.0))
    ps = [make_param((3, 33), f64, device).p, make_param((5,), bf16, device).p]
    gs = [make_grad(p.shape, p.dtype, device) for p in ps]
    gs[0][1, 2] = float("nan")
    samples.append((ps, gs, 0.0, torch.tensor(1.5, device="cpu"), 1e-4))
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_eg_update(device):
    for args in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.gaea.eg_update_, args)


def _step(ps, gs, lr):
    return gaea_ext.eg_update_(ps, gs, lr, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_compile_fullgraph(lr_kind, device):
    torch._dynamo.reset()
    compiled = torch.compile(_step, backend="aot_eager", fullgraph=True)
    shapes_layouts = [((14, 8), "contiguous"), ((9, 14), "transposed"), ((5,), "contiguous")]
    p0 = [make_param(s, torch.float32, device, lay).p for s, lay in shapes_layouts]
    gs = [make_grad(p.shape, torch.float32, device) for p in p0]
    gs[0][3, 1] = float("inf")
    lr = 0.7 if lr_kind == "float" else torch.tensor(0.7, device=device)
    eager = [p.clone() for p in p0]
    n_e = _step(eager, gs, lr)
    comp = [p.clone() for p in p0]
    assert not comp[1].is_contiguous()  # clone keeps the transposed layout
    n_c = compiled(comp, gs, lr)
    assert int(n_c) == int(n_e) == 1
    for a, b in zip(comp, eager):
        assert_bitwise_equal(a, b, "compiled vs eager")


@cuda_only
def test_cuda_graph_capture_with_lr_tensor():
    """lr as a device tensor keeps the step free of host syncs: it can be captured."""
    device = "cuda"
    p0 = [simplex(s, torch.float32, device) for s, _ in DARTS]
    gs = [torch.randn(p.shape, device=device) for p in p0]
    gs[0][2, 3] = float("nan")
    lr = torch.tensor(0.5, device=device)
    ps = [p.clone() for p in p0]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside the capture
        gaea_ext.eg_update_(ps, gs, lr)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        count = gaea_ext.eg_update_(ps, gs, lr)
    for p, q in zip(ps, p0):
        p.copy_(q)
    lr.fill_(0.25)
    graph.replay()
    torch.cuda.synchronize()
    expected = [p.clone() for p in p0]
    n_exp = gaea_ext.eg_update_(expected, gs, 0.25)
    assert int(count) == int(n_exp) == 1
    for a, b in zip(ps, expected):
        assert_bitwise_equal(a, b, "graph replay vs eager")


@cuda_only
def test_cuda_lr_tensor_does_not_sync():
    p, g = _pg("cuda", (14, 8))
    lr = torch.tensor(0.5, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gaea_ext.eg_update_([p], [g], lr)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda_only
def test_cuda_graph_capture_refuses_cpu_lr_tensor():
    """A CPU lr tensor is read on the host once per call: a capture would freeze its value."""
    ps = [simplex((14, 8), torch.float32, "cuda")]
    gs = [torch.randn(14, 8, device="cuda")]
    lr = torch.tensor(0.5)
    gaea_ext.eg_update_(ps, gs, lr)  # uncaptured: fine
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        gaea_ext.eg_update_(ps, gs, 0.5)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=r"lr tensor is on the CPU while a CUDA graph is being captured"):
        with torch.cuda.graph(graph):
            gaea_ext.eg_update_(ps, gs, lr)


@cuda_only
def test_cuda_graph_nonfinite_lr_tensor_skips_every_row():
    """In a captured step the lr tensor may turn non-finite between replays: every row skips."""
    p0 = [simplex((14, 8), torch.float32, "cuda")]
    gs = [torch.randn(14, 8, device="cuda")]
    lr = torch.tensor(0.5, device="cuda")
    ps = [p.clone() for p in p0]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        gaea_ext.eg_update_(ps, gs, lr)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        count = gaea_ext.eg_update_(ps, gs, lr)
    ps[0].copy_(p0[0])
    lr.fill_(float("inf"))
    graph.replay()
    torch.cuda.synchronize()
    assert int(count) == 14
    assert_bitwise_equal(ps[0], p0[0], "rows under an inf lr")
