"""bench/gpu_check.sh's stages on a machine without a GPU (the CPU-meaningful parts)."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpu_check(tmp_path, *stages):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    return subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), *stages], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)


def test_gpu_check_stages_without_a_gpu(tmp_path):
    """bench/gpu_check.sh on a machine without a GPU: the GPU-only stages skip with a summary
    line, an unknown stage is refused, and `tests` (given a CUDA build) collects the CUDA cases
    and skips them, writing its junit file. Building is not repeated here (minutes)."""
    import pytest
    import torch

    import gaea_ext

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: gpu_check.sh's stages would really run")
    res = _gpu_check(tmp_path, "kernels", "steps", "search")
    assert res.returncode == 0, res.stdout + res.stderr
    summaries = [line for line in res.stdout.splitlines() if line.startswith("SUMMARY ")]
    assert [s.split(":")[0] for s in summaries] == ["SUMMARY kernels", "SUMMARY steps", "SUMMARY search"]
    assert all("skipped, no GPU" in s for s in summaries)
    assert _gpu_check(tmp_path, "bogus").returncode == 2
    if not gaea_ext.build_info()["cuda"]:
        res = _gpu_check(tmp_path, "tests")
        assert res.returncode == 1 and "run 'bash bench/gpu_check.sh build' first" in res.stdout.splitlines()[-1]
        return
    res = _gpu_check(tmp_path, "tests")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    last = res.stdout.splitlines()[-1]
    assert last.startswith("SUMMARY tests: rc=0;") and " 0 failed, 0 errors" in last, last
    skipped = int(last.split(" skipped of ")[0].rsplit(" ", 1)[1])
    assert skipped > 500 and (tmp_path / "cuda_tests.xml").exists(), last
