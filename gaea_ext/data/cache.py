"""On-disk cache of decoded datasets (``$GAEA_CACHE``, default ``~/.cache/gaea_ext``).

Decoding tens of thousands of JPEGs takes seconds to minutes; the result is stored once as a
torch file under ``<cache>/decoded/<sha256 of key>.pt``. Keys name everything the decoded
tensors depend on (source path + size + mtime or a digest of every file, split, resolution,
format version), so a changed source is never served stale. Files are written to a temporary
name and moved into place with ``os.replace``, so concurrent processes (e.g. DDP ranks) and
interrupted runs never see a partial file. An unreadable or unwritable cache only costs time:
it is reported with a warning and the data is decoded again.
"""
from __future__ import annotations

import hashlib
import os
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

FORMAT_VERSION = 1


def cache_dir() -> Path:
    """``$GAEA_CACHE`` if set, else ``~/.cache/gaea_ext``."""
    return Path(os.environ.get("GAEA_CACHE") or Path.home() / ".cache" / "gaea_ext").expanduser()


def cache_path(key: tuple) -> Path:
    digest = hashlib.sha256(repr((FORMAT_VERSION, *key)).encode()).hexdigest()[:40]
    return cache_dir() / "decoded" / f"{digest}.pt"


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:  # unlike mkstemp, honours the umask (shared caches)
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cached(key: tuple, build: Callable[[], dict]) -> dict:
    """``build()``'s result for ``key``, from the cache when present, else built and stored.

    ``build`` must return a dict of tensors and plain Python values (torch.load runs with
    ``weights_only=True``).
    """
    path = cache_path(key)
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or foreign file: rebuild it
            warnings.warn(f"gaea_ext.data: ignoring unreadable cache file {path}: {e}", stacklevel=2)
    value = build()
    try:
        save_atomic(value, path)
    except OSError as e:
        warnings.warn(f"gaea_ext.data: cannot write cache file {path}: {e}", stacklevel=2)
    return value
