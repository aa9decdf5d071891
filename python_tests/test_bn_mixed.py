"""gaea_ext.mixed_op_bn (BatchNorm(affine=False) folded into the mixed op) and MixedOp's fused
plans (shared ReLU, folded BN), against the pure-PyTorch twin.

Numeric cases are (case x dtype x device): the fused result's error against a float64
evaluation must stay within twice the reference's own error in the same dtype, plus the
accumulation allowance of conftest.ACC_TOL (flash-attention style).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import pytest
import torch
from torch import nn

import gaea_ext
from gaea_ext import reference
from conftest import ACC_TOL, DEVICES, acc_dtype, dtype_params, randn, rounding_eps, saved_storages

SKIP, AVG, MAX = "skip_connect", "avg_pool_3x3", "max_pool_3x3"
CL = "channels_last"


@dataclass
class Case:
    name: str
    shape: Tuple[int, ...]  # of the ys and zs
    K: int  # plain ys
    Z: int  # BN inputs
    pf: Tuple[str, ...] = ()
    layout: str = "contiguous"
    running: bool = True
    momentum: float = 0.1
    x_shape: Tuple[int, ...] = ()  # default: shape (pf needs it)

    def __str__(self):
        return self.name


CASES = [
    Case("nb201_edge", (4, 6, 8, 8), 0, 2, (SKIP, AVG)),
    Case("nb201_edge_cl", (4, 6, 8, 8), 0, 2, (SKIP, AVG), layout=CL),
    Case("darts_stride1", (3, 5, 7, 6), 1, 6),
    Case("darts_stride2", (3, 5, 4, 3), 1, 4, x_shape=(3, 5, 8, 6)),
    Case("all_pf_and_plain", (2, 3, 5, 5), 1, 1, (SKIP, AVG, MAX)),
    Case("no_running_stats", (4, 6, 8, 8), 1, 2, (AVG,), running=False),
    Case("momentum_1", (2, 4, 3, 3), 0, 3, momentum=1.0),
    Case("3d_input", (4, 6, 8), 0, 2, (AVG,)),
    Case("one_pixel_planes", (8, 4, 1, 1), 1, 1),
]


def _inputs(case: Case, dtype, device):
    x = randn(case.x_shape or case.shape, dtype, device, case.layout)
    ys = [randn(case.shape, dtype, device, case.layout) for _ in range(case.K)]
    zs = [randn(case.shape, dtype, device, case.layout) * 3 + 1 for _ in range(case.Z)]
    w = torch.rand(case.K + case.Z + len(case.pf), device=device).to(dtype) + 0.1
    return x, ys, zs, w


def _running(case: Case, dtype, device):
    if not case.running:
        return [], []
    c = case.shape[1]
    acc = acc_dtype(dtype)
    return ([torch.randn(c, dtype=acc, device=device) for _ in range(case.Z)],
            [torch.rand(c, dtype=acc, device=device) + 0.5 for _ in range(case.Z)])


def _run(fn, case, x, ys, zs, w, running, g):
    leaves = [t.detach().clone().requires_grad_() for t in (x, *ys, *zs, w)]
    rms, rvs = [r.clone() for r in running[0]], [r.clone() for r in running[1]]
    lx, lys, lzs, lw = leaves[0], leaves[1:1 + case.K], leaves[1 + case.K:1 + case.K + case.Z], leaves[-1]
    out = fn(lx, lys, lzs, lw, list(case.pf), rms, rvs, case.momentum, 1e-5)
    out.backward(g)
    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
    return out.detach(), grads, rms + rvs


def _assert_like_reference(fused, ref, exact, dtype, what):
    assert fused.shape == exact.shape and fused.dtype == ref.dtype, what
    scale = exact.abs().max().item() + 1.0
    ref_err = (ref.double() - exact).abs().max().item()
    err = (fused.double() - exact).abs().max().item()
    allowed = 2 * ref_err + (ACC_TOL[acc_dtype(dtype)] + rounding_eps(dtype)) * scale
    assert err <= allowed, f"{what}: fused error {err:.3g} > allowed {allowed:.3g} (reference {ref_err:.3g})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case, dtype, device):
    x, ys, zs, w = _inputs(case, dtype, device)
    running = _running(case, dtype, device)
    g = randn(case.shape, dtype, device)
    fused = _run(gaea_ext.mixed_op_bn, case, x, ys, zs, w, running, g)
    ref = _run(reference.mixed_op_bn, case, x, ys, zs, w, running, g)
    d64 = lambda ts: [t.double() for t in ts]  # noqa: E731
    run64 = (d64([x])[0], d64(ys), d64(zs), w.double())
    exact = _run(reference.mixed_op_bn, case, *run64, (d64(running[0]), d64(running[1])), g.double())
    _assert_like_reference(fused[0], ref[0], exact[0], dtype, "out")
    if case.layout == CL and case.pf:
        assert fused[0].is_contiguous(memory_format=torch.channels_last)
    names = ["grad_x"] + [f"grad_ys[{k}]" for k in range(case.K)] + [f"grad_zs[{k}]" for k in range(case.Z)] + ["grad_w"]
    for a, b, e, name in zip(fused[1], ref[1], exact[1], names):
        _assert_like_reference(a, b, e, dtype, name)
    # Running statistics come from the same aten batch norm on the same z: identical.
    for a, b in zip(fused[2], ref[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_running_stats_follow_nn_batchnorm():
    bn = nn.BatchNorm2d(5, affine=False, momentum=0.3)
    z = torch.randn(4, 5, 6, 6) * 2 + 3
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    out = gaea_ext.mixed_op_bn(z, [], [z], torch.ones(1), (), [rm], [rv], 0.3, bn.eps)
    torch.testing.assert_close(out, bn(z))
    torch.testing.assert_close(rm, bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(rv, bn.running_var, rtol=0, atol=0)


def _saved_bytes(fn):
    return saved_storages(fn)[1]


def test_saves_inputs_and_statistics_not_normalized_outputs():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    zs = [torch.randn(2, 4, 8, 8, requires_grad=True) for _ in range(2)]
    w = torch.rand(4, requires_grad=True)
    fused = _saved_bytes(lambda: gaea_ext.mixed_op_bn(x, [], zs, w, (SKIP, AVG)))
    big = {p for p, n in fused.items() if n >= x.untyped_storage().nbytes()}
    assert big == {t.untyped_storage().data_ptr() for t in (x, *zs)}
    plain = _saved_bytes(lambda: reference.mixed_op_bn(x, [], zs, w, (SKIP, AVG)))
    # The reference keeps each normalized output (for the weight gradient) and each pooled
    # candidate on top: at least three more tensors of x's size.
    assert sum(plain.values()) - sum(fused.values()) >= 3 * x.untyped_storage().nbytes()


def test_double_backward_raises():
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    w = torch.rand(1, requires_grad=True)
    out = gaea_ext.mixed_op_bn(z, [], [z], w)
    (gz,) = torch.autograd.grad(out.pow(2).sum(), [z], create_graph=False)
    assert gz.shape == z.shape
    out = gaea_ext.mixed_op_bn(z, [], [z], w)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(out.pow(2).sum(), [z], create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for case in (CASES[0], CASES[2], CASES[3], CASES[5]):
        x, ys, zs, w = _inputs(case, torch.float32, device)
        rms, rvs = _running(case, torch.float32, device)
        for t in (x, *ys, *zs, w):
            t.requires_grad_()
        nbt = [torch.zeros((), dtype=torch.long, device=device) for _ in rms]
        torch.library.opcheck(torch.ops.gaea.mixed_op_bn, (x, ys, zs, w, [reference.pf_code(p) for p in case.pf],
                                                            rms, rvs, nbt, case.momentum, 1e-5))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_aot_eager_fullgraph(device):
    torch._dynamo.reset()

    def edge(x, z1, z2, w, rm, rv):
        return gaea_ext.mixed_op_bn(x, [], [z1, z2], w, (SKIP, AVG), [rm, rm * 0 + 1], [rv, rv * 0 + 2])

    compiled = torch.compile(edge, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (edge, compiled):
        torch.manual_seed(0)
        leaves = [torch.randn(2, 4, 6, 6, device=device, requires_grad=True) for _ in range(3)]
        w = torch.rand(4, device=device, requires_grad=True)
        rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
        out = fn(*leaves, w, rm, rv)
        out.sum().backward()
        results.append([out, *(t.grad for t in leaves), w.grad, rm, rv])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_bad_input():
    z = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="zs is empty"):
        gaea_ext.mixed_op_bn(z, [z], [], torch.ones(1))
    with pytest.raises(RuntimeError, match="running_means and running_vars for every z"):
        gaea_ext.mixed_op_bn(z, [], [z, z], torch.ones(2), (), [torch.zeros(3)], [torch.ones(3)])
    with pytest.raises(RuntimeError, match="weights"):
        gaea_ext.mixed_op_bn(z, [], [z, z], torch.ones(3))


# --------------------------------------------------------------------------------------
# MixedOp's fused plans
# --------------------------------------------------------------------------------------


def _mixed(model):
    from gaea_ext.spaces.mixed import MixedOp

    return [m for m in model.modules() if isinstance(m, MixedOp)]


def _darts(fused):
    from gaea_ext.spaces import build_network

    return build_network("darts", channels=8, cells=3, num_classes=10, in_channels=3, exclude_none=False,
                         fused=fused, partial=1, stem="cifar")


def test_plans_share_relu_and_fold_trailing_batchnorm():
    from gaea_ext.spaces import NB201Network

    for m in _mixed(NB201Network(4, 1, 10, 3, fused=True)):
        assert [(p.relu, len(p.body), p.bn is not None) for p in m.plans.values()] == [(True, 1, True)] * 2
    edge = _mixed(_darts(True))[0]
    plans = {edge.names[edge.live[s]]: (p.relu, len(p.body), p.bn is not None) for s, p in edge.plans.items()}
    assert plans == {"max_pool_3x3": (False, 1, True), "avg_pool_3x3": (False, 1, True),
                     "skip_connect": (False, 1, False), "sep_conv_3x3": (True, 6, True),
                     "sep_conv_5x5": (True, 6, True), "dil_conv_3x3": (True, 2, True),
                     "dil_conv_5x5": (True, 2, True)}
    assert all(not m.plans for m in _mixed(_darts(False)))


@pytest.mark.parametrize("space", ["nb201", "darts"])
def test_fused_network_matches_plain_over_steps(space):
    """Same weights and inputs, three train-mode forwards/backwards and one eval forward: the
    outputs, all gradients, running statistics and num_batches_tracked agree in float64."""
    from gaea_ext.spaces import NB201Network
    from gaea_ext.spaces.arch import ArchWeights

    torch.manual_seed(0)
    make = (lambda f: NB201Network(4, 1, 10, 3, fused=f)) if space == "nb201" else _darts
    nets = [make(True).double(), make(False).double()]
    nets[1].load_state_dict(nets[0].state_dict())
    if space == "nb201":  # exercise momentum=None (cumulative average) as well
        for net in nets:
            for bn in net.modules():
                if isinstance(bn, nn.BatchNorm2d) and bn.weight is None:
                    bn.momentum = None
    arch = {p.name: torch.softmax(torch.randn(p.shape, dtype=torch.float64), -1) for p in nets[0].arch_spec()}
    for step in range(4):
        x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
        results = []
        for net in nets:
            net.train(step < 3)
            w = {k: v.clone().requires_grad_() for k, v in arch.items()}
            out = net(x, ArchWeights(w))
            out.sum().backward()
            results.append([out, *(w[k].grad for k in w), *(p.grad for p in net.parameters()),
                            *net.state_dict().values()])
            net.zero_grad()
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_nb201_fused_saves_at_most_0_6x_of_plain():
    """The fused path's activation memory (NB201: 0.48x at the paper's sizes, bench/RESULTS.md)
    at toy sizes, so a change that saves a normalized output or a second ReLU again fails."""
    from gaea_ext.spaces import NB201Network

    torch.manual_seed(0)
    nets = [NB201Network(8, 1, 10, 3, fused=f) for f in (True, False)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(4, 3, 16, 16)
    arch = torch.full((6, 4), 0.25, requires_grad=True)
    saved = []
    for net in nets:
        params = {p.untyped_storage().data_ptr() for p in net.parameters()}
        seen = _saved_bytes(lambda: net(x, arch))
        saved.append(sum(n for p, n in seen.items() if p not in params))
    assert saved[0] <= 0.6 * saved[1], saved


# --------------------------------------------------------------------------------------
# The native op's extras: num_batches_tracked / momentum=None, w_index, partial grads
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.3, None])
def test_batches_tracked_and_cumulative_momentum_follow_nn_batchnorm(device, momentum):
    """Three calls: the op increments num_batches_tracked and, with momentum=None, averages
    cumulatively, exactly as two nn.BatchNorm2d modules in train mode do."""
    torch.manual_seed(0)
    bns = [nn.BatchNorm2d(5, affine=False, momentum=momentum).to(device) for _ in range(2)]
    rms = [torch.zeros(5, device=device) for _ in bns]
    rvs = [torch.ones(5, device=device) for _ in bns]
    nbts = [torch.zeros((), dtype=torch.long, device=device) for _ in bns]
    for _ in range(3):
        zs = [torch.randn(4, 5, 6, 6, device=device) * 2 + 3 for _ in bns]
        w = torch.tensor([0.25, 0.75], device=device)
        out = gaea_ext.mixed_op_bn(zs[0], [], zs, w, (), rms, rvs, momentum, 1e-5, nbts)
        expect = 0.25 * bns[0](zs[0]) + 0.75 * bns[1](zs[1])
        torch.testing.assert_close(out, expect)
    exact = (0, 0) if device == "cpu" else (1e-6, 1e-5)  # CPU: aten's own statistics routine
    for bn, rm, rv, n in zip(bns, rms, rvs, nbts):
        assert int(n) == int(bn.num_batches_tracked) == 3
        torch.testing.assert_close(rm, bn.running_mean, rtol=exact[1], atol=exact[0])
        torch.testing.assert_close(rv, bn.running_var, rtol=exact[1], atol=exact[0])


@pytest.mark.parametrize("device", DEVICES)
def test_w_index_reads_a_whole_row(device):
    """w_index lets an edge pass its whole weight row (`none` included): same values and
    gradients as gathering the row first; entries no candidate reads get zero gradient."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5, device=device, dtype=torch.float64)
    ys = [torch.randn_like(x)]
    zs = [torch.randn_like(x) * 2 + 1 for _ in range(2)]
    row = torch.rand(6, device=device, dtype=torch.float64)
    idx = [4, 1, 3, 0, 5]  # y, z0, z1, skip, avg; entry 2 (say `none`) unused
    g = torch.randn_like(x)
    results = []
    for use_index in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, *ys, *zs, row)]
        lx, ly, lz0, lz1, lrow = leaves
        w = lrow if use_index else lrow[idx]
        out = gaea_ext.mixed_op_bn(lx, [ly], [lz0, lz1], w, (SKIP, AVG), w_index=idx if use_index else ())
        out.backward(g)
        results.append([out, *(leaf.grad for leaf in leaves)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert results[0][-1][2] == 0
    with pytest.raises(RuntimeError, match="w_index"):
        gaea_ext.mixed_op_bn(x, ys, zs, row, (SKIP, AVG), w_index=[4, 1, 3, 0])
    with pytest.raises(RuntimeError, match="outside weights"):
        gaea_ext.mixed_op_bn(x, ys, zs, row, (SKIP, AVG), w_index=[4, 1, 3, 0, 6])


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_only_where_wanted(device):
    """Inputs that do not require grad get none, the others are unchanged (zs_mask, ys_mask,
    x_grad, weights_grad of the backward op)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, device=device, dtype=torch.float64)
    y = torch.randn_like(x)
    z0, z1 = torch.randn_like(x), torch.randn_like(x)
    w = torch.rand(5, device=device, dtype=torch.float64)
    g = torch.randn_like(x)
    full = [t.clone().requires_grad_() for t in (x, y, z0, z1, w)]
    gaea_ext.mixed_op_bn(full[0], [full[1]], full[2:4], full[4], (SKIP, MAX)).backward(g)
    part = [t.clone().requires_grad_(i in (2, 4)) for i, t in enumerate((x, y, z0, z1, w))]
    gaea_ext.mixed_op_bn(part[0], [part[1]], part[2:4], part[4], (SKIP, MAX)).backward(g)
    assert [t.grad is None for t in part] == [True, True, False, True, False]
    torch.testing.assert_close(part[2].grad, full[2].grad, rtol=0, atol=0)
    torch.testing.assert_close(part[4].grad, full[4].grad, rtol=0, atol=0)


def _dispatched(fn):
    """Aten/gaea ops that reach a backend while fn runs (views and empty allocations aside)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            schema = func._schema
            view = any(a.alias_info is not None and not a.alias_info.is_write for a in schema.returns)
            if not view and func.__name__.split(".")[0] not in ("empty", "empty_strided", "empty_like"):
                seen.append(str(func.overloadpacket))
            return out

    with Count():
        fn()
    return seen


def test_nb201_edge_dispatches_few_ops():
    """One NB201 edge, forward + backward, fused: the shared ReLU, the two convs, one
    mixed_op_bn each way and autograd's own adds; no per-call glue (index_select, stacks,
    copies of running stats, zero grads). The eager twin needs about three times as many."""
    from gaea_ext.spaces.mixed import MixedOp
    from gaea_ext.spaces.nb201 import candidate_builders

    names = ["skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3", "none"]
    counts = {}
    for fused in (True, False):
        torch.manual_seed(0)
        edge = MixedOp(names, candidate_builders(4), fused)
        x = torch.randn(2, 4, 6, 6, requires_grad=True)
        row = torch.full((5,), 0.2, requires_grad=True)

        def step():
            edge(x, row).sum().backward()

        step()  # plans cached, lazy state built
        counts[fused] = _dispatched(step)
    fused = sorted(counts[True])
    assert fused.count("gaea.mixed_op_bn") == 1 and fused.count("gaea.mixed_op_bn_backward") == 1, fused
    assert not {"aten.index_select", "aten.stack", "aten.clone", "aten.copy_", "aten.zeros",
                "aten.native_batch_norm", "aten.select_backward"} & set(fused), fused
    # relu, 2 conv, op, sum | seed, op, 2 conv bwd, relu bwd, 2 adds, 4 leaf-grad add_ (16 seen)
    assert len(fused) <= 16, fused
    assert len(fused) <= 0.35 * len(counts[False]), (len(fused), len(counts[False]))  # 16 vs 54 seen
