"""Progress and metrics of a training run, written one way for every stage and family.

``Progress`` is a dependency-free line on stderr (``it 1200/70000 [ 2%] 35.1 it/s loss
0.412``); ``MetricsLog`` appends one CSV row per report to ``OUT/metrics.csv``, so a
resumed run extends the file it left.
"""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Mapping
from pathlib import Path
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
        percent = 100 * done / max(self.total, 1)
        line = f"it {done}/{self.total} [{percent:3.0f}%] {rate:.1f} it/s {shown}"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own (e.g. learned rates at a validation), not overwritten."""
        self.stream.write(("\n" if self.tty else "") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()


class MetricsLog:
    """CSV rows appended to ``path``. The header is fixed by the first row ever written
    (a resumed run keeps the file's header); keys a row lacks are left empty."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, row: Mapping[str, float | int | str]) -> None:
        shown = {k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()}
        fresh = not self.path.exists()
        if fresh:
            fields = list(shown)
        else:
            with self.path.open(newline="") as f:
                fields = next(csv.reader(f), list(shown))
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if fresh:
                writer.writeheader()
            writer.writerow(shown)
