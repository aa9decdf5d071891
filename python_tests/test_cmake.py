"""The CMake build produces the same operator library, loadable with torch.ops.load_library."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")

CHECK = textwrap.dedent(
    """
    import sys, torch
    torch.ops.load_library(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    ys = [torch.randn(3, 1025, generator=g) for _ in range(5)]
    w = torch.rand(5, generator=g)
    out = torch.ops.gaea.mixed_op(ys, w)
    ref = sum(wk * yk for wk, yk in zip(w, ys))
    torch.testing.assert_close(out, ref)
    p = torch.full((14, 8), 1 / 8)
    n = torch.ops.gaea.eg_update_([p], [torch.randn(14, 8, generator=g)], 0.1, None, 1e-5)
    assert int(n) == 0 and torch.allclose(p.sum(-1), torch.ones(14))
    print("ok")
    """
)


def test_cmake_cpu_library(tmp_path):
    build = tmp_path / "build"
    cfg = [
        "cmake", "-S", ROOT, "-B", str(build),
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        "-DGAEA_WITH_CUDA=OFF",
    ]
    ninja = shutil.which("ninja") or shutil.which("ninja", path=os.path.dirname(sys.executable))
    if ninja:
        cfg += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    subprocess.run(cfg, check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True, text=True)
    lib = build / "libgaea_ops.so"
    assert lib.exists()
    # A fresh interpreter: this one already registered the gaea ops through gaea_ext._C.
    res = subprocess.run([sys.executable, "-c", CHECK, str(lib)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
