"""The `gaea` command tunes glibc malloc at start-up (gaea_ext/allocator.py); importing gaea_ext
does not. Observed in fresh processes: a 24 MiB malloc is served by mmap under glibc's default
(its dynamic threshold starts at 128 KiB and has not reached 24 MiB right after start-up) and
from the heap once the command set M_MMAP_THRESHOLD to 32 MiB."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from gaea_ext import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc malloc only")

# Prints 'mmapped=<0|1> state=<allocator.state>' after running the given lines.
PROBE = textwrap.dedent("""
    import ctypes, sys
    {setup}
    class MI2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MI2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    before = libc.mallinfo2().hblks
    p = libc.malloc(24 << 20)
    mmapped = libc.mallinfo2().hblks - before
    libc.free(p)
    a = sys.modules.get("gaea_ext.allocator")
    print(f"mmapped={{mmapped}} state={{a.state if a else 'not imported'}}")
""")

CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("GLIBC_TUNABLES", "GAEA_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}


def probe(setup: str, **env) -> str:
    res = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env=dict(CLEAN_ENV, **env))
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().splitlines()[-1]


# `gaea` with no subcommand prints its help and returns 2: main() ran as the command.
AS_COMMAND = "import sys; sys.argv = ['gaea']; from gaea_ext.cli import main; assert main() == 2"
AS_MODULE = ("import runpy, sys; sys.argv = ['gaea_ext']\n"
             "try:\n    runpy.run_module('gaea_ext', run_name='__main__')\n"
             "except SystemExit as e:\n    assert e.code == 2, e.code")


@glibc_only
def test_import_leaves_malloc_alone():
    # The library (and the CLI module, and an in-process main(argv) call) change nothing.
    out = probe("import torch, gaea_ext, gaea_ext.cli")
    assert out == "mmapped=1 state=not imported", out
    out = probe("from gaea_ext.cli import main; assert main([]) == 2")
    assert out == "mmapped=1 state=not imported", out


@glibc_only
@pytest.mark.parametrize("setup", [AS_COMMAND, AS_MODULE], ids=["gaea", "python-m"])
def test_command_tunes_malloc(setup):
    out = probe(setup)
    assert out == f"mmapped=0 state=tuned: mmap_threshold {32 << 20}, trim_threshold {2**31 - 1}", out


@glibc_only
def test_command_opt_outs():
    assert probe(AS_COMMAND, GAEA_MALLOC="default") == "mmapped=1 state=default: GAEA_MALLOC=default"
    # The user's own tunables win (and are what glibc applies).
    out = probe(AS_COMMAND, GLIBC_TUNABLES="glibc.malloc.mmap_threshold=33554432")
    assert out == "mmapped=0 state=default: GLIBC_TUNABLES sets malloc", out


def test_skip_reason():
    assert allocator.skip_reason({}) is None
    assert allocator.skip_reason({"GAEA_MALLOC": "tuned"}) is None
    assert allocator.skip_reason({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}) is None  # not a malloc tunable
    assert allocator.skip_reason({"GAEA_MALLOC": "default"}) == "GAEA_MALLOC=default"
    assert allocator.skip_reason({"GAEA_MALLOC": "Off"}) == "GAEA_MALLOC=Off"
    assert "not understood" in allocator.skip_reason({"GAEA_MALLOC": "jemalloc"})
    assert allocator.skip_reason({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}) == "GLIBC_TUNABLES sets malloc"
    assert allocator.skip_reason({"MALLOC_MMAP_THRESHOLD_": "1"}) == "MALLOC_MMAP_THRESHOLD_ is set"


def test_not_glibc_is_a_no_op(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    monkeypatch.setattr(allocator, "state", None)
    assert allocator.configure({}) == "default: not glibc"
    assert allocator.state == "default: not glibc"
