"""One run's life in RUN_DIR, the same for `gaea search` and `gaea train`.

- One writer: rank 0 holds RUN_DIR's lock (rundir.lock) from before the checkpoint is read
  until the process ends; a second process on the same RUN_DIR exits 2.
- Elastic restarts: under torchrun, a restarted worker group (TORCHELASTIC_RESTART_COUNT > 0)
  whose --out already holds a checkpoint resumes it, as if --resume RUN_DIR had been given.
- Exit statuses: 0 done, 2 user error or refused checkpoint or RUN_DIR in use, 3 too many
  non-finite steps in a row, 4 a checkpoint or log could not be written (disk full,
  unwritable), 128 + signal when stopped by SIGTERM (143) or SIGINT (130) after checkpointing.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Optional

from gaea_ext.search import faults, rundir


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0 outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def elastic_resume(args) -> None:
    """A torchrun restart of `... --out D` continues D's checkpoint instead of refusing D."""
    if (not args.resume and args.out and restart_count() > 0
            and os.path.exists(os.path.join(args.out, "checkpoint.pt"))):
        args.resume = args.out


def add_fault_args(p) -> None:
    """Options of long runs, shared by search and train (may change on --resume)."""
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="also checkpoint every N steps inside an epoch (default 200; 0: epoch ends only)")
    p.add_argument("--max-nonfinite", type=int, metavar="K",
                   help="stop with status 3 after K non-finite weight steps in a row (default 20)")


def runtime_overrides(cfg, args) -> None:
    """What may change on --resume: where and how long to run, how often to checkpoint."""
    cfg.stop_after = args.stop_after
    cfg.device = args.device or cfg.device
    cfg.workers = cfg.workers if args.workers is None else args.workers
    for key in ("checkpoint_every", "max_nonfinite"):
        if getattr(args, key, None) is not None:
            setattr(cfg, key, getattr(args, key))


@contextlib.contextmanager
def owned(out: Optional[str], resuming: bool):
    """The block runs as RUN_DIR's only writer (rank 0; other ranks never write)."""
    if not out or not is_rank0():
        yield
        return
    with rundir.lock(out):
        if not resuming:
            rundir.ensure_fresh(out)  # again, now that no other process can be writing
        yield


@contextlib.contextmanager
def guarded(guard: faults.Guard, cmd: str, out: Optional[str]):
    """Stop signals handled by ``guard`` in the block; a Preempted run says how to resume."""
    guard.install()
    try:
        yield
    except faults.Preempted as e:
        how = f"checkpoint saved; resume with: gaea {cmd} --resume {out}" if out else "nothing saved (no --out)"
        e.args = (f"{e.args[0]}; {how}",)
        raise
    finally:
        guard.uninstall()


def report(e: BaseException) -> int:
    """One line on stderr (rank 0 only under torchrun) and the exit status of a fault."""
    code = getattr(e, "code", 2)
    if is_rank0():
        prefix = "gaea: " if isinstance(e, faults.Preempted) else "gaea: error: "
        sys.stderr.write(f"{prefix}{e}\n")
        sys.stderr.flush()
    return code
