"""The micro-batcher: grouping, limits, filling, deadlines, backpressure. No timings."""

from __future__ import annotations

import threading
import time

import pytest

from service.engine.batcher import Batcher, DeadlineExceeded, Job
from service.errors import Unavailable

FAR = time.monotonic() + 3600.0


def job(group: str, deadline: float = FAR) -> Job:
    return Job((group, "adapt"), None, deadline)


def in_thread(batcher: Batcher) -> list[list[Job] | None]:
    """next_batch() in a thread; the test fails (not hangs) if it never returns."""
    out: list[list[Job] | None] = []
    thread = threading.Thread(target=lambda: out.append(batcher.next_batch()), daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "next_batch() did not return"
    return out


def test_a_lone_job_starts_at_once_whatever_the_delay() -> None:
    batcher = Batcher(max_batch_size=8, max_batch_delay_s=3600.0, queue_size=8)
    lone = job("a")
    batcher.put(lone)
    assert in_thread(batcher) == [[lone]]


def test_batches_keep_groups_apart_oldest_group_first_and_respect_the_size() -> None:
    batcher = Batcher(max_batch_size=2, max_batch_delay_s=0.0, queue_size=16)
    jobs = [job(g) for g in "abaab"]
    for j in jobs:
        batcher.put(j)
    assert batcher.next_batch() == [jobs[0], jobs[2]]
    assert batcher.next_batch() == [jobs[1], jobs[4]]
    assert batcher.next_batch() == [jobs[3]]
    assert len(batcher) == 0
    assert all(j.future.running() for j in jobs)


def test_concurrent_jobs_wait_to_fill_the_batch() -> None:
    batcher = Batcher(max_batch_size=3, max_batch_delay_s=3600.0, queue_size=8)
    first = [job("a"), job("a")]
    for j in first:
        batcher.put(j)
    late = job("a")
    threading.Timer(0.05, batcher.put, args=(late,)).start()
    assert in_thread(batcher) == [[*first, late]]  # returned once full, not after the delay


def test_jobs_that_do_not_wait_batch_what_is_queued() -> None:
    """wait=False (predictions): the queued jobs go at once, however long the delay."""
    batcher = Batcher(max_batch_size=8, max_batch_delay_s=3600.0, queue_size=8)
    queued = [Job(("a", "predict"), None, FAR, wait=False) for _ in range(3)]
    for j in queued:
        batcher.put(j)
    assert in_thread(batcher) == [queued]


def test_expired_and_cancelled_jobs_are_not_run() -> None:
    batcher = Batcher(max_batch_size=8, max_batch_delay_s=0.0, queue_size=8)
    expired, cancelled, live = job("a", deadline=time.monotonic() - 1.0), job("a"), job("a")
    for j in (expired, cancelled, live):
        batcher.put(j)
    cancelled.future.cancel()
    assert batcher.next_batch() == [live]
    with pytest.raises(DeadlineExceeded):
        expired.future.result(timeout=0)
    assert batcher.expired == 1


def test_a_batch_of_only_expired_jobs_does_not_stall_the_consumer() -> None:
    batcher = Batcher(max_batch_size=8, max_batch_delay_s=0.0, queue_size=8)
    dead = job("a", deadline=time.monotonic() - 1.0)
    batcher.put(dead)
    threading.Timer(0.05, batcher.close).start()
    assert in_thread(batcher) == [None]
    assert isinstance(dead.future.exception(timeout=0), DeadlineExceeded)


def test_the_queue_is_bounded_and_admit_asks_ahead() -> None:
    batcher = Batcher(max_batch_size=8, max_batch_delay_s=0.0, queue_size=2)
    batcher.put(job("a"))
    batcher.admit()  # a slot is free: no refusal, nothing held
    batcher.put(job("a"))
    with pytest.raises(Unavailable) as full:
        batcher.put(job("a"))
    with pytest.raises(Unavailable):
        batcher.admit()
    assert full.value.retry_after is not None and full.value.retry_after >= 1.0
    assert batcher.rejected == 2
    assert len(batcher) == 2
    assert batcher.next_batch() is not None
    batcher.put(job("a"))  # drained: room again


def test_close_drains_then_ends() -> None:
    batcher = Batcher(max_batch_size=8, max_batch_delay_s=0.0, queue_size=8)
    queued = job("a")
    batcher.put(queued)
    batcher.close()
    with pytest.raises(Unavailable):
        batcher.put(job("a"))
    with pytest.raises(Unavailable):
        batcher.admit()
    assert batcher.next_batch() == [queued]
    assert batcher.next_batch() is None


def test_fail_all_fails_what_is_queued() -> None:
    batcher = Batcher(max_batch_size=8, max_batch_delay_s=0.0, queue_size=8)
    queued = job("a")
    batcher.put(queued)
    batcher.fail_all(Unavailable("stopped", 1.0))
    assert isinstance(queued.future.exception(timeout=0), Unavailable)
    assert len(batcher) == 0
