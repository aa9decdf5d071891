"""RUN_DIR files: config.json, log.jsonl, result.json, checkpoint.pt, all written atomically.

A file is written to a temporary name in the same directory and renamed over the target, so
a crash mid-write never leaves a truncated checkpoint and a good one is never replaced by a
failed run.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any, Dict, List, Optional

import torch


class RunDirError(Exception):
    pass


def _atomic_write(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, obj: Any) -> None:
    _atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RunDirError(f"cannot read {path}: {e}") from None


def append_log(path: str, record: Dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_log(path: str) -> List[Dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_log(path: str, epochs: int) -> None:
    """Keep only the first `epochs` records: a resumed run re-logs what its checkpoint lacks."""
    records = [r for r in read_log(path) if r.get("epoch", 0) <= epochs]
    _atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())


def resumed_config(run_dir: str, out: Optional[str], cls):
    """The saved config of the run in ``run_dir`` as a ``cls`` dataclass (search or train)."""
    if out and os.path.abspath(out) != os.path.abspath(run_dir):
        raise RunDirError("--resume continues in its own RUN_DIR; drop --out")
    saved = read_json(os.path.join(run_dir, "config.json"))
    try:
        return cls(**saved)
    except TypeError as e:
        raise RunDirError(f"malformed {run_dir}/config.json: {e}") from None


def ensure_fresh(out: Optional[str]) -> None:
    """A new run never overwrites another run's checkpoint."""
    if out and os.path.exists(os.path.join(out, "checkpoint.pt")):
        raise RunDirError(f"{out} already holds a run; use --resume {out} or another --out")


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    _atomic_write(path, buf.getvalue())


def load_checkpoint(path: str) -> Dict[str, Any]:
    if not os.path.exists(path):
        raise RunDirError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a damaged file
        raise RunDirError(f"corrupt checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(state, dict) or "epoch" not in state:
        raise RunDirError(f"corrupt checkpoint {path}: not a gaea_ext search checkpoint")
    return state


def record_epoch(out: str, record: Dict[str, Any], state: Dict[str, Any]) -> None:
    """An epoch's end in RUN_DIR: its record appended to log.jsonl, then the checkpoint."""
    append_log(os.path.join(out, "log.jsonl"), record)
    save_checkpoint(os.path.join(out, "checkpoint.pt"), state)
