"""RUN_DIR files: config.json, log.jsonl, result.json, checkpoint.pt, all written atomically.

A file is written to a temporary name in the same directory and renamed over the target, so
a crash mid-write never leaves a truncated checkpoint and a good one is never replaced by a
failed run. A write that fails (disk full, read-only directory) removes its temporary file
and raises CheckpointWriteError; the previous file is untouched.

Checkpoints are read with ``torch.load(weights_only=True)``: only tensors and plain Python
containers/scalars unpickle, so a crafted checkpoint.pt cannot run code; it is refused with
RunDirError. (RNG states are saved as tensors and tuples for this reason.)

``lock(RUN_DIR)`` makes one process the directory's only writer: an flock on RUN_DIR/.lock,
which the kernel drops when the holder exits, however it exits.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import tempfile
from typing import Any, Dict, List, Optional

import torch


class RunDirError(Exception):
    pass


class CheckpointWriteError(RunDirError):
    """A RUN_DIR file could not be written; the previous one is intact (exit status 4)."""
    code = 4


TMP_PREFIX = ".tmp-"


def _atomic_write(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=d, prefix=TMP_PREFIX + os.path.basename(path))
    except OSError as e:
        raise CheckpointWriteError(f"cannot write {path}: {e.strerror or e}; the previous file is intact") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise CheckpointWriteError(f"cannot write {path}: {e.strerror or e}; "
                                       "the previous file is intact") from None
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
    """One line appended; a failed write is cut back off, so the log never ends mid-record."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    try:
        with open(path, "ab") as f:
            size = f.tell()
            try:
                f.write(line)
                f.flush()
            except OSError:
                f.truncate(size)
                raise
    except OSError as e:
        raise CheckpointWriteError(f"cannot append to {path}: {e.strerror or e}") from None


def read_log(path: str) -> List[Dict[str, Any]]:
    """The records; a last line cut short by a kill mid-append is dropped."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise RunDirError(f"malformed {path} line {i + 1}") from None
    return records


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
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refused a global (a class, a function): never in a gaea_ext checkpoint.
        what = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if what:
            raise RunDirError(f"refusing checkpoint {path}: it names {what.group(1)}, not only tensors and "
                              "containers (not written by gaea_ext; nothing in it was run)") from None
        raise RunDirError(f"corrupt checkpoint {path}: {str(e).splitlines()[-1][:200] if str(e) else 'unreadable'}") from None
    except Exception as e:  # torch raises many types for a damaged file
        raise RunDirError(f"corrupt checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(state, dict) or "epoch" not in state:
        raise RunDirError(f"corrupt checkpoint {path}: not a gaea_ext search checkpoint")
    return state


def record_epoch(out: str, record: Dict[str, Any], state: Dict[str, Any]) -> None:
    """An epoch's end in RUN_DIR: its record appended to log.jsonl, then the checkpoint."""
    append_log(os.path.join(out, "log.jsonl"), record)
    save_checkpoint(os.path.join(out, "checkpoint.pt"), state)


def remove_stale_temps(out: str) -> None:
    """Temporary files of a writer that was killed mid-write (call with the lock held)."""
    for name in os.listdir(out):
        if name.startswith(TMP_PREFIX):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out, name))


@contextlib.contextmanager
def lock(out: str):
    """Hold RUN_DIR/.lock for the block; RunDirError when another process holds it."""
    import fcntl

    os.makedirs(out, exist_ok=True)
    fd = os.open(os.path.join(out, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RunDirError(f"{out} is in use by another gaea process (pid {holder}); "
                              "wait for it or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        remove_stale_temps(out)
        yield
    finally:
        os.close(fd)  # releases the flock
