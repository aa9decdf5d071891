"""pytest-benchmark cases: fused gaea_ext kernels vs the PyTorch baselines, side by side.

    python -m pytest bench --benchmark-only

Each benchmark group is one case (op, direction, device, dtype, K); its members are the
contenders (see bench_cases.py). Inputs are allocated once per benchmark and reused by every
round; torch.compile contenders are compiled and warmed up before timing, and skipped, with
the compiler's error as the reason, when inductor cannot compile here. On CUDA the timed
function ends with torch.cuda.synchronize(). extra_info["bytes"] holds the bytes that must
move, so GB/s = bytes / time (conftest.py prints it after the run).
"""
from __future__ import annotations

import pytest
import torch

import bench_cases as cases


def _timed(fn, device):
    if device != "cuda":
        return fn

    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out

    return synced


def _mixed_params(backward):
    return [
        pytest.param(device, dtype, K, id=f"{device}-{cases.DTYPE_NAMES[dtype]}-K{K}",
                     marks=pytest.mark.benchmark(group=cases.mixed_group(device, dtype, K, backward)))
        for device in cases.devices()
        for dtype in cases.mixed_dtypes(device)
        for K in cases.KS
    ]


EG_PARAMS = [pytest.param(device, id=device, marks=pytest.mark.benchmark(group=cases.eg_group(device)))
             for device in cases.devices()]


def _bench_mixed(benchmark, device, dtype, K, backward, contender):
    meta = cases.mixed_meta(device, dtype, K, backward)
    inputs = cases.MixedInputs(device, dtype, K, backward)
    c = cases.make_mixed_contender(contender, inputs)
    if c.skip:
        pytest.skip(c.skip)
    # Sanity before timing: a contender that computes something else is not a baseline.
    problems = cases.check_mixed(device, dtype, K, backward, {contender: c.fn})
    assert not problems, problems
    benchmark.extra_info.update(meta.extra_info(contender))
    benchmark(_timed(c.fn, device))


@pytest.mark.parametrize("contender", cases.MIXED_CONTENDERS)
@pytest.mark.parametrize(("device", "dtype", "K"), _mixed_params(backward=False))
def test_mixed_op_fwd(benchmark, device, dtype, K, contender):
    _bench_mixed(benchmark, device, dtype, K, False, contender)


@pytest.mark.parametrize("contender", cases.MIXED_CONTENDERS)
@pytest.mark.parametrize(("device", "dtype", "K"), _mixed_params(backward=True))
def test_mixed_op_fwd_bwd(benchmark, device, dtype, K, contender):
    _bench_mixed(benchmark, device, dtype, K, True, contender)


@pytest.mark.parametrize("contender", cases.EG_CONTENDERS)
@pytest.mark.parametrize("device", EG_PARAMS)
def test_eg_update_darts(benchmark, device, contender):
    meta = cases.eg_meta(device)
    c = cases.make_eg_contender(contender, device)
    if c.skip:
        pytest.skip(c.skip)
    benchmark.extra_info.update(meta.extra_info(contender))
    benchmark(_timed(c.fn, device))


EDGE_PARAMS = [pytest.param(device, dtype, id=f"{device}-{cases.DTYPE_NAMES[dtype]}",
                            marks=pytest.mark.benchmark(group=cases.edge_group(device, dtype)))
               for device in cases.devices() for dtype in cases.mixed_dtypes(device)]


@pytest.mark.parametrize("contender", cases.EDGE_CONTENDERS)
@pytest.mark.parametrize(("device", "dtype"), EDGE_PARAMS)
def test_nb201_edge_fwd_bwd(benchmark, device, dtype, contender):
    meta = cases.edge_meta(device, dtype)
    c = cases.edge_case(device, dtype, contenders=(contender,)).contenders[contender]
    if c.skip:
        pytest.skip(c.skip)
    problems = cases.check_edge(device, dtype, {contender: c.fn})
    assert not problems, problems
    benchmark.extra_info.update(meta.extra_info(contender))
    benchmark(_timed(c.fn, device))
