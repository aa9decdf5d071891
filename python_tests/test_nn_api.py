"""gaea_ext.nn: MixedOp on user candidates (strides, other output shapes, zeros, fallback, hooks,
torch.compile), ArchParameters, choices and gaea_step."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gaea_ext.nn import ArchParameters, ExpGrad, MixedOp, choices, gaea_step


def sep(ci, co, k, stride):
    return nn.Sequential(nn.ReLU(), nn.Conv2d(ci, ci, k, stride, k // 2, groups=ci, bias=False),
                         nn.Conv2d(ci, co, 1, bias=False), nn.BatchNorm2d(co, affine=False))


def strided_edge(fused):
    """Stride 2 and twice the channels: no candidate output has x's shape."""
    torch.manual_seed(0)
    return MixedOp({"k3": sep(4, 8, 3, 2), "k5": sep(4, 8, 5, 2),
                    "pool": nn.Sequential(nn.AvgPool2d(3, 2, 1), nn.Conv2d(4, 8, 1)), "zero": None},
                   fused=fused).double()


def run(edge, x, w):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    out = edge(x, w)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = [p.grad for p in edge.parameters()]
    return out, x.grad, w.grad, grads, [b.clone() for b in edge.buffers()]


def test_strided_edge_with_other_output_shape_matches_eager_twin():
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    w = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    fused, plain = strided_edge(True), strided_edge(False)
    out = fused(x, w)
    assert out.shape == (3, 8, 4, 4)
    assert "MixedOpBn" in out.grad_fn.name()  # both BNs folded into the one native op
    how = fused.fusion()
    assert how["k3"] == how["k5"] == "shared ReLU + 2 module(s) + BN folded in training mode"
    assert how["zero"] == "zero, never run" and fused.fallback_reason is None
    a, b = run(strided_edge(True), x, w), run(plain, x, w)
    torch.testing.assert_close(a[0], b[0])
    for ga, gb in zip(a[1:3], b[1:3]):
        torch.testing.assert_close(ga, gb)
    assert a[2][3] == 0  # the zero candidate's weight: no output, zero gradient
    for ga, gb in zip(a[3] + a[4], b[3] + b[4]):  # parameter grads, BN running stats
        torch.testing.assert_close(ga, gb)


def test_list_candidates_parameter_free_in_kernel():
    torch.manual_seed(0)
    cands = [nn.Identity(), nn.MaxPool2d(3, 1, 1), sep(4, 4, 3, 1)]
    edge = MixedOp(cands, fused=True).double()
    assert edge.names == ["0", "1", "2"] and set(edge.pf_slots) == {0, 1}
    assert edge.fusion()["1"] == "in the kernel from x (max_pool_3x3), never stored"
    plain = MixedOp(cands, fused=False).double()
    x, w = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    for ga, gb in zip(run(edge, x, w)[:3], run(plain, x, w)[:3]):
        torch.testing.assert_close(ga, gb)


class ToDouble(nn.Module):
    def forward(self, x):
        return x.double()


def test_outputs_the_kernels_cannot_take_fall_back_to_the_eager_sum():
    x = torch.randn(2, 3, 5, 5)
    w = torch.tensor([0.7, 0.3])
    edge = MixedOp({"conv": nn.Conv2d(3, 3, 1), "cast": ToDouble()})
    with pytest.warns(UserWarning, match="mix dtypes"):
        out = edge(x, w)
    assert "mix dtypes" in edge.fallback_reason
    expected = 0.7 * edge.ops[0](x).double() + 0.3 * x.double()
    torch.testing.assert_close(out.double(), expected)


def test_more_candidates_than_the_kernels_take_fall_back_for_good():
    torch.manual_seed(0)
    cands = [nn.Conv2d(2, 2, 1) for _ in range(65)]
    edge = MixedOp(cands)
    assert "65 computed candidates" in edge.fallback_reason
    assert all("eager sum" in how for how in edge.fusion().values())
    x, w = torch.randn(2, 2, 3, 3), torch.full((65,), 1 / 65)
    torch.testing.assert_close(edge(x, w), sum(wk * c(x) for wk, c in zip(w, cands)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_outputs_of_different_shapes_name_the_candidates(fused):
    edge = MixedOp({"same": nn.Conv2d(3, 3, 3, padding=1), "wide": nn.Conv2d(3, 6, 1)}, fused=fused)
    with pytest.raises(ValueError, match="differ in shape.*'wide': \\(2, 6, 4, 4\\)"):
        edge(torch.randn(2, 3, 4, 4), torch.tensor([0.5, 0.5]))


def test_hooked_modules_are_run_whole():
    """A hook on a candidate (or its BN) must fire: the fused path then runs that module."""
    seen = []
    cand = sep(3, 3, 3, 1)
    cand.register_forward_hook(lambda m, i, o: seen.append("seq"))
    other = sep(3, 3, 3, 1)
    other[-1].register_forward_hook(lambda m, i, o: seen.append("bn"))
    edge = MixedOp({"hooked": cand, "hooked_bn": other, "pool": nn.AvgPool2d(3, 1, 1, count_include_pad=False)})
    how = edge.fusion()
    assert how["hooked"] == "1 module(s)" and "folded" not in how["hooked_bn"]
    edge(torch.randn(2, 3, 4, 4), torch.full((3,), 1 / 3))
    assert seen == ["seq", "bn"]


class Net(nn.Module):
    def __init__(self, fused=True, shared=False):
        super().__init__()
        key = "shared" if shared else None
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.a = MixedOp({"k3": sep(4, 4, 3, 1), "k5": sep(4, 4, 5, 1), "skip": nn.Identity()}, fused, key=key)
        self.b = MixedOp({"k3": sep(4, 4, 3, 1), "k5": sep(4, 4, 5, 1), "skip": nn.Identity()}, fused, key=key)
        self.down = MixedOp({"k3": sep(4, 8, 3, 2), "k5": sep(4, 8, 5, 2)}, fused)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.down(self.b(self.a(self.stem(x)))).mean((2, 3)))


def test_arch_parameters_rows_keys_and_choices():
    net = Net()
    arch = ArchParameters(net)
    assert arch.keys == ["a", "b", "down"] and [tuple(r.shape) for r in arch.rows] == [(3,), (3,), (2,)]
    assert all(torch.allclose(r, torch.full_like(r, 1 / len(r))) for r in arch.rows)
    ids = {id(p) for p in net.parameters()}
    assert not any(id(r) in ids for r in arch.rows)  # the rows stay out of the weight optimizer
    with torch.no_grad():
        arch.row("a").copy_(torch.tensor([0.1, 0.2, 0.7]))
        arch.row("down").copy_(torch.tensor([0.9, 0.1]))
    assert choices(net) == arch.choices() == {"a": "skip", "b": "k3", "down": "k3"}
    shared = ArchParameters(Net(shared=True))
    assert shared.keys == ["shared", "down"] and shared.edges == {"a": 0, "b": 0, "down": 1}
    bad = Net(shared=True)
    bad.b = MixedOp({"x": nn.Identity(), "y": nn.Identity()}, key="shared")
    with pytest.raises(ValueError, match="different candidates"):
        ArchParameters(bad)
    with pytest.raises(RuntimeError, match="no weights given"):
        Net()(torch.randn(1, 1, 4, 4))


def test_compiled_model_matches_eager_in_one_graph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = Net()
    arch = ArchParameters(net)
    with torch.no_grad():
        for r, v in zip(arch.rows, ([0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.6, 0.4])):
            r.copy_(torch.tensor(v))
    x = torch.randn(4, 1, 8, 8)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (net, compiled):
        net.zero_grad()
        arch.zero_grad()
        loss = fn(x).square().mean()
        loss.backward()
        results.append([loss, *(r.grad.clone() for r in arch.rows), net.stem.weight.grad.clone()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gaea_step_moves_rows_on_the_simplex_and_weights_with_rows_fixed():
    torch.manual_seed(0)
    net = Net()
    arch = ArchParameters(net)
    w_opt = torch.optim.SGD(net.parameters(), lr=0.1)
    a_opt = ExpGrad(arch.parameters(), lr=1.0)
    batch = (torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    other = (torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    rows0 = [r.detach().clone() for r in arch.rows]
    stem0 = net.stem.weight.detach().clone()
    gaea_step(net, F.cross_entropy, batch, None, w_opt, a_opt)  # warm-up: weights only
    assert all(torch.equal(r, r0) for r, r0 in zip(arch.rows, rows0))
    assert not torch.equal(net.stem.weight, stem0)
    assert all(r.requires_grad for r in arch.rows)
    loss = gaea_step(net, F.cross_entropy, batch, other, w_opt, a_opt)
    assert torch.isfinite(loss)
    for r, r0 in zip(arch.rows, rows0):
        assert not torch.equal(r, r0)
        torch.testing.assert_close(r.sum(), torch.tensor(1.0))


def test_builtin_spaces_use_the_public_mixed_op():
    from gaea_ext.spaces import NB201Network
    from gaea_ext.spaces.mixed import MixedOp as SpaceMixedOp

    edges = [m for m in NB201Network(4, 1, 10, 3).modules() if isinstance(m, MixedOp)]
    assert edges and all(type(m) is SpaceMixedOp for m in edges)
    assert SpaceMixedOp.forward is MixedOp.forward and SpaceMixedOp._fused is MixedOp._fused


def test_readme_snippet_searches():
    """README "Your own search space": the snippet a user copies runs and moves the rows."""
    import os
    import re

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    section = readme.split("## Your own search space", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(0)
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
    scope = {"train_loader": data, "arch_loader": data[::-1]}
    exec(compile(code, "README.md", "exec"), scope)
    arch = scope["arch"]
    assert set(scope["choices"](scope["model"])) == {"blocks.0", "blocks.1", "blocks.2"}
    assert arch.entropy() < arch.max_entropy()


def test_switching_fused_replans():
    torch.manual_seed(0)
    edge = MixedOp({"a": sep(3, 3, 3, 1), "pool": nn.AvgPool2d(3, 1, 1, count_include_pad=False)}, fused=False)
    x, w = torch.randn(2, 3, 4, 4), torch.tensor([0.6, 0.4])
    eager = edge(x, w)
    assert not edge.plans
    edge.fused = True
    assert set(edge.pf_slots) == {1} and edge.fusion()["a"].endswith("BN folded in training mode")
    torch.testing.assert_close(edge(x, w), eager, rtol=1e-5, atol=1e-6)
