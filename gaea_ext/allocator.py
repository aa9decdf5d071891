"""The `gaea` command's CPU allocator settings (glibc malloc), applied by the command only.

A search step frees and reallocates the same multi-megabyte activation tensors every step.
glibc's malloc serves blocks above its mmap threshold (128 KiB at start, raised dynamically up
to 32 MiB) with a fresh mmap, and hands freed memory above the trim threshold back to the
kernel, so those tensors are page-faulted in again on every step. The `gaea` command (and
`python -m gaea_ext`) therefore sets, at start-up:

    M_MMAP_THRESHOLD = 32 MiB   (the largest value glibc accepts on 64-bit; fixed, not dynamic)
    M_TRIM_THRESHOLD = 2 GiB - 1 (mallopt takes an int; GLIBC_TUNABLES can say 4 GiB)

the same policy as GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296
(up to the trim threshold's int limit). It is skipped, leaving malloc as it is, when:

- the C library is not glibc (musl, macOS, Windows): nothing to do;
- GLIBC_TUNABLES already sets a glibc.malloc.* tunable, or MALLOC_MMAP_THRESHOLD_ /
  MALLOC_TRIM_THRESHOLD_ is set: the user chose;
- GAEA_MALLOC=default (or off, 0, no, system): the opt-out.

Importing gaea_ext (or gaea_ext.cli) never calls this: a library must not change a process-wide
allocator. Only `gaea_ext.cli.main()` run as the process's command does.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Mapping, Optional

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**31 - 1  # mallopt's value is a C int
OPT_OUT = ("default", "off", "0", "no", "false", "system")
ENV = "GAEA_MALLOC"

# What configure() did in this process (None: it never ran); for logs and tests.
state: Optional[str] = None


def _glibc() -> Optional[ctypes.CDLL]:
    """The process's C library when it is glibc, else None."""
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # musl, macOS, Windows: no glibc malloc to tune
    return libc


def skip_reason(environ: Mapping[str, str]) -> Optional[str]:
    """Why the settings must not be applied under this environment, or None."""
    choice = environ.get(ENV, "").strip().lower()
    if choice in OPT_OUT:
        return f"{ENV}={environ[ENV]}"
    if choice not in ("", "tuned", "1", "on", "yes"):
        return f"{ENV}={environ[ENV]} is not understood (use tuned or default); left as is"
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc"
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        if var in environ:
            return f"{var} is set"
    return None


def configure(environ: Optional[Mapping[str, str]] = None) -> str:
    """Apply the command's malloc settings unless skipped; return (and record in `state`) one
    line saying what happened: 'tuned: ...' or 'default: <why>'."""
    global state
    why = skip_reason(os.environ if environ is None else environ)
    if why is None:
        libc = _glibc()
        if libc is None:
            why = "not glibc"
        else:
            libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
            libc.mallopt.restype = ctypes.c_int
            ok_mmap = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            ok_trim = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            if ok_mmap and ok_trim:
                state = f"tuned: mmap_threshold {MMAP_THRESHOLD}, trim_threshold {TRIM_THRESHOLD}"
                return state
            why = f"mallopt refused (mmap {ok_mmap}, trim {ok_trim})"
    state = f"default: {why}"
    return state
