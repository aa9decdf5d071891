"""examples/custom_space.py in a reduced form: GAEA on a user-built MobileNet-like space
sparsifies the choices, and the fused and eager (--no-fused) paths reach the same ones."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytest.importorskip("sklearn")  # the embedded digits

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "custom_space.py")
# float64 so that the A/B comparison is about the kernels, not float32 rounding amplified
# by SGD; a high EG rate so that a few dozen steps visibly sparsify.
REDUCED = ["--epochs", "4", "--steps", "8", "--batch", "32", "--channels", "4", "--arch-lr", "10", "--double"]


def _example():
    spec = importlib.util.spec_from_file_location("custom_space", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reduced_example_sparsifies_and_fused_matches_eager(capsys):
    mod = _example()
    fused = mod.main(REDUCED)
    printed = capsys.readouterr().out
    eager = mod.main([*REDUCED, "--no-fused"])
    h = fused["entropy"]
    assert h[0] == pytest.approx(sum(torch.log(torch.tensor(float(len(w)))) for w in fused["weights"].values()) / 4)
    assert all(b < a for a, b in zip(h, h[1:])) and h[-1] < 0.75 * h[0]  # falls epoch by epoch
    assert max(float(w.max()) for w in fused["weights"].values()) > 0.5
    assert fused["choices"] == eager["choices"]
    for k, w in fused["weights"].items():
        torch.testing.assert_close(w, eager["weights"][k], rtol=0, atol=1e-9)
    assert "entropy" in printed and all(f"{k}: {v}" in printed for k, v in fused["choices"].items())
    assert set(fused["choices"]) == {f"blocks.{i}" for i in range(4)}
