"""The CUDA kernels' machine code, read from a CUDA build without a GPU (cuobjdump)."""
from __future__ import annotations

import os

import pytest

import gaea_ext


def _cuobjdump():
    """cuobjdump from the CUDA toolkit, else the copy triton ships (None when neither exists)."""
    import shutil

    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


@pytest.mark.skipif(not gaea_ext.build_info()["cuda"], reason="gaea_ext was built without its CUDA kernels")
def test_mixed_op_backward_kernels_register_budget():
    """Read from the compiled machine code, no GPU needed: mixed_op's backward has a K=1
    instance (common after --prune-below), and no instance, the generic one for K > 8 and
    unaligned inputs included, needs anywhere near the ~210 registers that a 64-entry
    accumulator array cost (one 256-thread block per SM)."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton) to read the kernels' resource usage")
    import re
    import subprocess

    so = gaea_ext._C.__file__
    dump = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True, check=True).stdout
    regs = {}
    name = None
    for line in dump.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+)", line)
        if m and name and "mixed_op_cuda" in name and "backward_kernel" in name:
            regs[name] = max(regs.get(name, 0), int(m.group(1)))
            name = None
    assert regs, "no mixed_op backward_kernel found in the CUDA build"
    # backward_kernel<scalar_t, K, V>: "...backward_kernelI<type>Li<K>ELi<V>E..."
    ks = {int(m.group(1)) for n in regs for m in [re.search(r"backward_kernelI.*?Li(\d+)ELi\d+E", n)] if m}
    assert 1 in ks, f"no K=1 instance of the templated backward kernel (K values {sorted(ks)})"
    worst = max(regs.values())
    assert worst <= 96, f"a mixed_op backward kernel uses {worst} registers: " + ", ".join(
        f"{n[-60:]}={r}" for n, r in sorted(regs.items(), key=lambda kv: -kv[1])[:3])
