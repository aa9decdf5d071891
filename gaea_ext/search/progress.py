"""A dependency-free progress bar for long loops; silent when stderr is not a terminal.

Stats may be given as callables (e.g. a lambda reading a device tensor): they are evaluated
only when the bar redraws, at most every `every` seconds, not on every update."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, every: float = 0.5):
        self.total, self.desc, self.every = total, desc, every
        self.enabled = enabled and sys.stderr.isatty()
        self.start = self.last = time.perf_counter()
        self.done = 0
        self.redraws = 0

    def update(self, n: int = 1, **stats) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.every and self.done < self.total):
            return
        self.last = now
        self.redraws += 1
        # A callable stat is evaluated only here, at a redraw: reading a device value (a loss
        # sum) syncs with the device, which must not happen on every step.
        stats = {k: v() if callable(v) else v for k, v in stats.items()}
        width = 24
        filled = int(width * self.done / max(1, self.total))
        extra = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())
        sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {extra}\x1b[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
