"""A bounded job queue that hands the device worker micro-batches.

Semantics follow Triton's dynamic batcher (``max_batch_size``, ``max_batch_delay``
measured from the oldest job's arrival), with two changes that only ever start a batch
sooner: a lone job starts at once (a quiet service adds no latency), and a filling batch
stops waiting once its group's arrivals pause for a quarter of the delay (16 clients in
a closed loop do not wait for a 17th that never comes; a burst still gets merged). A job
made with ``wait=False`` never waits: its batch is what is queued when the worker is free
(predictions, whose forward pass costs less than any wait would save).
Jobs carry a group key (meta-model, kind, and whatever the kernel cannot mix); a batch
never mixes groups, and the group whose oldest job has waited longest goes first.

Backpressure: ``put`` raises ``service.errors.Unavailable`` at once when ``queue_size``
jobs are queued; ``admit`` asks the same before a caller does work for a job (a
prediction whose params must first be read) that a full queue would refuse anyway.
Deadlines: a job taken from the queue after its deadline fails with ``DeadlineExceeded``;
a job whose future was cancelled is dropped.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from service.errors import Unavailable


class DeadlineExceeded(Unavailable):
    """The job waited in the queue past its deadline and was not run (a 503: overloaded)."""


_seq = count()


Group = tuple[Hashable, ...]  # (meta-model, kind, whatever a batch cannot mix)


@dataclass(eq=False)
class Job:
    group: Group  # jobs batch together only within one group
    payload: Any  # what the worker needs to run it
    deadline: float  # time.monotonic() after which it is not started
    wait: bool = True  # its batch may wait (max_batch_delay) for more jobs of its group
    future: Future[Any] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    seq: int = field(default_factory=lambda: next(_seq))


class Batcher:
    def __init__(self, *, max_batch_size: int, max_batch_delay_s: float, queue_size: int) -> None:
        if max_batch_size < 1 or queue_size < 1 or max_batch_delay_s < 0:
            raise ValueError("max_batch_size and queue_size must be >= 1, the delay >= 0")
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.queue_size = queue_size
        self._groups: dict[Group, deque[Job]] = {}
        self._last_put: dict[Group, float] = {}  # each group's latest arrival
        self._queued = 0
        self._closed = False
        self._cond = threading.Condition()
        self.expired = 0  # jobs failed with DeadlineExceeded
        self.rejected = 0  # puts refused with Unavailable
        self.seconds_per_job = 0.0  # recent service time per job, kept by the worker

    # -- producers ---------------------------------------------------------------------------
    def admit(self) -> None:
        """Raise ``Unavailable`` now if a ``put`` would be refused now (counted as a
        refusal); a later ``put`` may still be refused."""
        with self._cond:
            self._admit()

    def put(self, job: Job) -> None:
        with self._cond:
            self._admit()
            self._groups.setdefault(job.group, deque()).append(job)
            self._last_put[job.group] = job.enqueued
            self._queued += 1
            self._cond.notify_all()

    def put_many(self, jobs: list[Job]) -> None:
        """``put`` for many jobs in one operation: all queued, or none (``Unavailable``
        when the queue has no room for all of them)."""
        with self._cond:
            self._admit(len(jobs))
            for job in jobs:
                self._groups.setdefault(job.group, deque()).append(job)
                self._last_put[job.group] = job.enqueued
            self._queued += len(jobs)
            self._cond.notify_all()

    def _admit(self, count: int = 1) -> None:
        if self._closed:
            raise Unavailable("the engine is stopping", 1.0)
        if self._queued + count > self.queue_size:
            self.rejected += 1
            raise Unavailable(
                f"the engine queue is full ({self.queue_size} jobs)", self.retry_after()
            )

    def retry_after(self) -> float:
        """Seconds until the queue has likely drained: what a refused caller is told."""
        return min(30.0, max(1.0, float(math.ceil(self.queue_size * self.seconds_per_job))))

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called: every put is refused."""
        return self._closed

    def __len__(self) -> int:
        return self._queued

    def close(self) -> None:
        """Refuse new jobs; ``next_batch`` drains what is queued, then returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def fail_all(self, error: BaseException) -> None:
        """Fail every queued job (the engine stopped without a worker to drain them)."""
        with self._cond:
            jobs = [job for group in self._groups.values() for job in group]
            self._groups.clear()
            self._queued = 0
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)

    # -- the consumer ------------------------------------------------------------------------
    def next_batch(self) -> list[Job] | None:
        """Block for the next batch of one group; None once closed and drained.

        Every returned job's future is already running (no longer cancellable).
        """
        while True:
            expired: list[Job] = []
            with self._cond:
                while self._queued == 0:
                    if self._closed:
                        return None
                    self._cond.wait()
                group = min(self._groups, key=lambda g: self._groups[g][0].seq)
                batch = self._take(group, self.max_batch_size, expired)
                if len(batch) > 1 and batch[0].wait:  # concurrent jobs: let the batch fill
                    self._fill(batch, group, expired)
            for job in expired:  # outside the lock: futures run their callbacks
                job.future.set_exception(
                    DeadlineExceeded("the job waited past its deadline", self.retry_after())
                )
            if batch:
                return batch

    def _fill(self, batch: list[Job], group: Group, expired: list[Job]) -> None:
        oldest = min(job.enqueued for job in batch)
        pause = self.max_batch_delay_s / 4
        while len(batch) < self.max_batch_size and not self._closed:
            now = time.monotonic()
            left = oldest + self.max_batch_delay_s - now
            quiet = now - self._last_put.get(group, oldest)
            if left <= 0 or quiet >= pause:
                return
            if group not in self._groups:
                self._cond.wait(min(left, pause - quiet))
            batch += self._take(group, self.max_batch_size - len(batch), expired)

    def _take(self, group: Group, limit: int, expired: list[Job]) -> list[Job]:
        """Pop up to ``limit`` live jobs of ``group``; expire or drop the rest on the way."""
        queue = self._groups.get(group)
        batch: list[Job] = []
        now = time.monotonic()
        while queue and len(batch) < limit:
            job = queue.popleft()
            self._queued -= 1
            if not job.future.set_running_or_notify_cancel():
                continue  # cancelled by its caller
            if now > job.deadline:
                self.expired += 1
                expired.append(job)
                continue
            batch.append(job)
        if queue is not None and not queue:
            del self._groups[group]
        return batch
