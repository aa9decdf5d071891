"""gaea_ext.ExpGrad: the exponentiated-gradient optimizer built on eg_update_."""
from __future__ import annotations

import io

import pytest
import torch

import gaea_ext
from gaea_ext import ExpGrad, reference
from conftest import (
    DEVICES,
    assert_bitwise_equal,
    assert_close_tol,
    assert_on_simplex,
    cuda_only,
    dtype_params,
    eg_tol,
    simplex,
)

DARTS_SHAPES = [(14, 8), (14, 8)] + [(n,) for n in (2, 3, 4, 5)] * 2


def darts_params(dtype, device):
    return [torch.nn.Parameter(simplex(s, dtype, device)) for s in DARTS_SHAPES]


def set_grads(params, scale=1.0):
    grads = []
    for p in params:
        p.grad = (scale * torch.randn(p.shape, dtype=torch.float64, device=p.device)).to(p.dtype)
        grads.append(p.grad.clone())
    return grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
def test_one_step_matches_formula(dtype, device):
    params = darts_params(dtype, device)
    before = [p.detach().clone() for p in params]
    grads = set_grads(params, 2.0)
    opt = ExpGrad(params, lr=0.3, eps=1e-4)
    opt.step()
    expected = [p.double().clone() for p in before]
    reference.eg_update_formula_(expected, [g.double() for g in grads], 0.3, 1e-4)
    for i, (p, e) in enumerate(zip(params, expected)):
        assert p.dtype == dtype and p.device.type == torch.device(device).type
        assert_close_tol(p.detach(), e, eg_tol(dtype), f"param {i}")
        assert not torch.equal(p.detach(), before[i])
        assert torch.equal(p.grad, grads[i]), "step must not modify .grad"
    assert int(opt.nonfinite_rows) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
def test_many_steps_stay_on_simplex(dtype, device):
    params = darts_params(dtype, device)
    opt = ExpGrad(params, lr=0.5)
    for _ in range(100):
        set_grads(params, 3.0)
        opt.step()
        assert int(opt.nonfinite_rows) == 0
    for i, p in enumerate(params):
        assert_on_simplex(p.detach(), f"param {i} after 100 steps")


@pytest.mark.parametrize("device", DEVICES)
def test_converges_to_best_candidate_on_mixed_op(device):
    """End to end: architecture weights trained through mixed_op concentrate on the candidate
    with the lowest loss (the point of GAEA's mirror descent)."""
    K = 5
    target = torch.randn(64, device=device)
    noise = torch.tensor([1.0, 0.5, 0.05, 0.8, 2.0], device=device)  # candidate 2 is best
    ys = [target + noise[k] * torch.randn(64, device=device) for k in range(K)]
    alpha = torch.nn.Parameter(torch.full((K,), 1.0 / K, device=device))
    opt = ExpGrad([alpha], lr=1.0)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = ((gaea_ext.mixed_op(ys, alpha) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert_on_simplex(alpha.detach(), "alpha")
    assert int(alpha.argmax()) == 2, alpha
    assert alpha[2].item() > 0.8, alpha
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_state_dict_round_trip(lr_kind, device):
    params = darts_params(torch.float32, device)
    opt = ExpGrad(params, lr=0.37 if lr_kind == "float" else torch.tensor(0.37, device=device), eps=1e-3)
    for _ in range(3):
        set_grads(params)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)

    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = ExpGrad(clones)  # default lr/eps: must be overwritten by the loaded state
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert float(fresh.param_groups[0]["lr"]) == pytest.approx(0.37)
    assert fresh.param_groups[0]["eps"] == 1e-3
    assert fresh.param_groups[0]["fused"] is True

    for _ in range(3):
        grads = set_grads(params)
        for c, g in zip(clones, grads):
            c.grad = g.clone()
        opt.step()
        fresh.step()
        for i, (a, b) in enumerate(zip(params, clones)):
            assert_bitwise_equal(a.detach(), b.detach(), f"param {i} after reload")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_lr_scheduler_changes_the_step(lr_kind, device):
    params = [torch.nn.Parameter(simplex((6, 5), torch.float32, device))]
    lr0 = 0.8 if lr_kind == "float" else torch.tensor(0.8, device=device)
    opt = ExpGrad(params, lr=lr0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lrs = []
    for step in range(4):
        before = params[0].detach().clone()
        grads = set_grads(params, 2.0)
        lr_now = float(opt.param_groups[0]["lr"])
        lrs.append(lr_now)
        opt.step()
        sched.step()
        expected = [before.double().clone()]
        reference.eg_update_formula_(expected, [grads[0].double()], lr_now, 1e-5)
        assert_close_tol(params[0].detach(), expected[0], eg_tol(torch.float32), f"step {step}")
    assert lrs == pytest.approx([0.8, 0.4, 0.2, 0.1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtype_params())
def test_fused_matches_unfused(dtype, device):
    a = darts_params(dtype, device)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = ExpGrad(a, lr=0.6, fused=True)
    opt_b = ExpGrad(b, lr=0.6, fused=False)
    for step in range(5):
        grads = set_grads(a, 2.0)
        if step == 2:
            grads[0][3, 1] = float("nan")
            a[0].grad[3, 1] = float("nan")
        for q, g in zip(b, grads):
            q.grad = g.clone()
        opt_a.step()
        opt_b.step()
        assert int(opt_a.nonfinite_rows) == int(opt_b.nonfinite_rows) == (1 if step == 2 else 0)
        for i, (p, q) in enumerate(zip(a, b)):
            assert_close_tol(p.detach(), q.detach(), eg_tol(dtype), f"step {step} param {i}")
            with torch.no_grad():  # compare single steps: don't let rounding differences compound
                q.copy_(p)


@pytest.mark.parametrize("device", DEVICES)
def test_lr_as_tensor_equals_float(device):
    a = darts_params(torch.float32, device)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    lr_t = torch.tensor(0.375, device=device)
    opt_a = ExpGrad(a, lr=0.375)
    opt_b = ExpGrad(b, lr=lr_t)
    for _ in range(3):
        grads = set_grads(a)
        for q, g in zip(b, grads):
            q.grad = g.clone()
        opt_a.step()
        opt_b.step()
    for i, (p, q) in enumerate(zip(a, b)):
        assert_bitwise_equal(p.detach(), q.detach(), f"param {i}")
    # changing the tensor in place changes the next step
    lr_t.fill_(0.0)
    grads = set_grads(b)
    expected = [q.detach().clone() for q in b]
    gaea_ext.eg_update_(expected, grads, 0.0)
    opt_b.step()
    for q, e, g in zip(b, expected, grads):
        assert_bitwise_equal(q.detach(), e, "lr tensor set to 0 in place")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
def test_nonfinite_rows_is_set(fused, device):
    params = darts_params(torch.float32, device)
    opt = ExpGrad(params, lr=0.5, fused=fused)
    assert opt.nonfinite_rows is None
    set_grads(params)
    params[0].grad[2, 3] = float("nan")
    params[1].grad[5, 0] = float("inf")
    params[1].grad[6, 7] = -float("inf")
    params[4].grad[1] = float("nan")
    before = [p.detach().clone() for p in params]
    opt.step()
    n = opt.nonfinite_rows
    assert isinstance(n, torch.Tensor) and n.dim() == 0 and n.dtype == torch.int64
    assert int(n) == 4
    assert torch.equal(params[0][2], before[0][2])
    assert torch.equal(params[1][5], before[1][5])
    assert torch.equal(params[1][6], before[1][6])
    assert torch.equal(params[4], before[4])
    assert not torch.equal(params[0][1], before[0][1])
    set_grads(params)
    opt.step()
    assert int(opt.nonfinite_rows) == 0  # reset every step, not accumulated


@pytest.mark.parametrize("device", DEVICES)
def test_params_without_grad_are_skipped_and_groups_have_own_lr(device):
    p1 = torch.nn.Parameter(simplex((4, 3), torch.float32, device))
    p2 = torch.nn.Parameter(simplex((4, 3), torch.float32, device))
    p3 = torch.nn.Parameter(simplex((5,), torch.float32, device))
    opt = ExpGrad([{"params": [p1, p3]}, {"params": [p2], "lr": 2.0}], lr=0.1)
    b1, b2, b3 = (p.detach().clone() for p in (p1, p2, p3))
    g1 = torch.randn(4, 3, device=device)
    g2 = torch.randn(4, 3, device=device)
    p1.grad, p2.grad = g1.clone(), g2.clone()  # p3 has no grad
    opt.step()
    assert torch.equal(p3.detach(), b3)
    e1, e2 = [b1.double().clone()], [b2.double().clone()]
    reference.eg_update_formula_(e1, [g1.double()], 0.1, 1e-5)
    reference.eg_update_formula_(e2, [g2.double()], 2.0, 1e-5)
    assert_close_tol(p1.detach(), e1[0], eg_tol(torch.float32), "group 0")
    assert_close_tol(p2.detach(), e2[0], eg_tol(torch.float32), "group 1")
    # nothing with a grad: no update, no count
    opt.zero_grad()
    opt.step()
    assert opt.nonfinite_rows is None


def test_closure_and_invalid_hyperparameters():
    p = torch.nn.Parameter(simplex((3, 4), torch.float32, "cpu"))
    opt = ExpGrad([p], lr=0.2)

    def closure():
        opt.zero_grad()
        loss = (p * torch.arange(4.0)).sum()
        loss.backward()
        return loss

    before = p.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert bool((p[:, 0] > before[:, 0]).all())  # lowest-cost coordinate gains mass
    with pytest.raises(ValueError, match="invalid learning rate"):
        ExpGrad([p], lr=-0.1)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        ExpGrad([p], eps=-1e-5)


def test_eg_update_on_parameters_outside_no_grad():
    """eg_update_ is an optimizer step: calling it on leaf Parameters that require grad,
    without torch.no_grad(), must work and must not be recorded by autograd."""
    p = torch.nn.Parameter(simplex((4, 6), torch.float32, "cpu"))
    g = torch.randn(4, 6)
    expected = [p.detach().double().clone()]
    reference.eg_update_formula_(expected, [g.double()], 0.5)
    gaea_ext.eg_update_([p], [g], 0.5)
    assert p.grad_fn is None and p.requires_grad
    assert_close_tol(p.detach(), expected[0], eg_tol(torch.float32), "param")


@cuda_only
def test_params_on_two_devices():
    a = torch.nn.Parameter(simplex((4, 3), torch.float32, "cpu"))
    b = torch.nn.Parameter(simplex((4, 3), torch.float32, "cuda"))
    opt = ExpGrad([a, b], lr=0.5)
    a.grad = torch.randn(4, 3)
    b.grad = torch.randn(4, 3, device="cuda")
    a.grad[0, 0] = float("nan")
    b.grad[1, 1] = float("nan")
    ba, bb = a.detach().clone(), b.detach().clone()
    opt.step()
    assert int(opt.nonfinite_rows) == 2
    ea, eb = [ba.double().clone()], [bb.double().clone()]
    reference.eg_update_formula_(ea, [a.grad.double()], 0.5)
    reference.eg_update_formula_(eb, [b.grad.double()], 0.5)
    assert_close_tol(a.detach()[1:], ea[0][1:], eg_tol(torch.float32), "cpu param")
    assert_close_tol(b.detach()[[0, 2, 3]], eb[0][[0, 2, 3]], eg_tol(torch.float32), "cuda param")
