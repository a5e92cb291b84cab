"""A dependency-free progress line: ``it 1200/70000 [ 2%] 35.1 it/s meta-loss 0.412``."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(
        self, total: int, start: int = 0, stream: TextIO = sys.stderr, every_s: float = 0.5
    ) -> None:
        self.total = total
        self.done = start
        self.stream = stream
        self.every_s = every_s
        self.t0 = time.perf_counter()
        self.start = start
        self.last = 0.0
        self.tty = stream.isatty()

    def update(self, done: int, **metrics: float) -> None:
        self.done = done
        now = time.perf_counter()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        line = f"it {done}/{self.total} [{100 * done / self.total:3.0f}%] {rate:.1f} it/s {shown}"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()
