"""Pickled image batches: CIFAR-10/100 (torchvision's ``cifar-*-python`` files) and
NAS-Bench-201's ImageNet16 (``train_data_batch_*``, ``val_data``).

Both are dicts with ``data`` (N x 3*H*W uint8, channel-major: all R, then G, then B, each row
by row) and integer labels. Files written by Python 2 have str keys, by Python 3 often bytes
keys; both are accepted. Unpickling is restricted to the few numpy globals an array needs, so
a malicious or corrupt file cannot run code -- it raises DataError instead.
"""
from __future__ import annotations

import importlib
import io
import pickle

import numpy as np

from .errors import DataError

_ALLOWED_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        canonical = module.replace("numpy.core.", "numpy._core.", 1)  # numpy 1.x names
        if (canonical, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        for mod in (canonical, module):
            try:
                return getattr(importlib.import_module(mod), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"cannot resolve {module}.{name}")


def load_dict(blob: bytes, what: str) -> dict:
    """Unpickle a dict of arrays/lists from ``blob`` (``what`` names the file in errors)."""
    try:
        obj = _ArrayUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except Exception as e:
        raise DataError(f"malformed pickle file {what}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise DataError(f"malformed pickle file {what}: expected a dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def parse_batch(blob: bytes, what: str, label_key: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 3, size, size], labels int64 [N]) from one pickled batch."""
    entry = load_dict(blob, what)
    missing = [k for k in ("data", label_key) if k not in entry]
    if missing:
        raise DataError(f"malformed batch file {what}: no {' or '.join(repr(k) for k in missing)} entry "
                        f"(has {sorted(map(str, entry))})")
    data, labels = np.asarray(entry["data"]), np.asarray(entry[label_key])
    if labels.size == 0:
        labels = labels.astype(np.int64)  # np.asarray([]) is float64
    pixels = 3 * size * size
    if data.ndim != 2 or data.shape[1] != pixels or data.dtype.kind not in "ui":
        raise DataError(f"malformed batch file {what}: 'data' must be integer N x {pixels}, "
                        f"got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "ui":
        raise DataError(f"malformed batch file {what}: {label_key!r} must hold {data.shape[0]} integers, "
                        f"got {labels.dtype} {labels.shape}")
    if data.dtype != np.uint8:
        if data.size and (data.min() < 0 or data.max() > 255):
            raise DataError(f"malformed batch file {what}: pixel values outside 0..255")
        data = data.astype(np.uint8)
    return data.reshape(-1, 3, size, size), labels.astype(np.int64)
