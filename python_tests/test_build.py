"""gaea_ext.build_info(): how the extension was compiled, and that it matches what is registered.

(The CMake build is tested elsewhere.)
"""
from __future__ import annotations

import pytest
import torch

import gaea_ext

OPS = ["gaea::mixed_op", "gaea::mixed_op_backward", "gaea::mixed_op_pf", "gaea::mixed_op_pf_backward", "gaea::eg_update_"]


def test_build_info_keys_and_types():
    info = gaea_ext.build_info()
    assert isinstance(info, dict)
    assert set(info) == {"cuda", "torch", "cuda_version", "archs"}
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["torch"], str) and info["torch"]
    # built against the torch that is running (local version suffix like +cu130 dropped)
    assert torch.__version__.startswith(info["torch"]), (info["torch"], torch.__version__)
    assert torch.__version__.split("+")[0] == info["torch"].split("+")[0]
    if info["cuda"]:
        assert isinstance(info["cuda_version"], str) and info["cuda_version"]
        assert isinstance(info["archs"], str) and info["archs"]
        assert torch.version.cuda is not None, "extension built with CUDA but torch has none"
    else:
        assert info["cuda_version"] is None
        assert info["archs"] is None


def test_build_info_returns_a_fresh_dict():
    a = gaea_ext.build_info()
    a["cuda"] = "tampered"
    assert gaea_ext.build_info()["cuda"] in (True, False)


@pytest.mark.parametrize("op", OPS)
def test_registered_kernels_match_build_info(op):
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has(op, "CPU"), f"{op} has no CPU kernel"
    assert has(op, "Meta"), f"{op} has no fake/meta kernel"
    assert has(op, "CUDA") == gaea_ext.build_info()["cuda"], (
        f"{op}: CUDA kernel registered = {has(op, 'CUDA')} but build_info()['cuda'] = "
        f"{gaea_ext.build_info()['cuda']}"
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available (torch.cuda.is_available() is False)")
def test_gpu_machine_has_cuda_build():
    """On a GPU machine the cuda test cases need the CUDA kernels: fail loudly, don't skip."""
    assert gaea_ext.build_info()["cuda"], "a GPU is visible but gaea_ext was built without CUDA"
