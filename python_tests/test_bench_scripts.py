"""The benchmark scripts keep working as the code they drive changes (they call the real search
and train steps): each runs end to end at toy sizes. Timings are not checked here."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_search_speed_smoke_runs_every_case(tmp_path):
    out = tmp_path / "speed.md"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "search_speed.py"), "--smoke", "--device", "cpu",
                          "--markdown-out", str(out)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    table = out.read_text()
    for case in ("nb201", "darts", "pcdarts", "gdas", "train"):
        assert f"| {case} |" in table, case
