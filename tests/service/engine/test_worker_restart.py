"""The device worker's supervisor: when an exception escapes the worker's loop, the batch it
was running fails with ``Unavailable`` (a 503), a new thread takes over, later jobs succeed."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from models.checkpoint import MetaModel
from service.engine import Engine, EngineConfig
from service.engine.batcher import Job
from service.errors import Unavailable
from tests.service.engine.helpers import adapt_job
from tests.service.engine.test_engine_core import assert_matches_alone, support


@pytest.fixture
def engine(meta_models: dict[str, MetaModel]) -> Iterator[Engine]:
    engine = Engine({"sinusoid": meta_models["sinusoid"]}, EngineConfig(device="cpu"))
    engine.start()
    yield engine
    engine.stop(timeout=10)
    assert not engine.worker._thread.is_alive()  # stop() joined the replacement too


def test_a_dead_worker_fails_its_batch_with_503_and_a_new_thread_runs_the_rest(
    engine: Engine, meta_models: dict[str, MetaModel], caplog: pytest.LogCaptureFixture
) -> None:
    worker, meta = engine.worker, meta_models["sinusoid"]
    first = worker._thread
    run_batch = worker._run_batch
    entered, release = threading.Event(), threading.Event()
    calls = 0

    def dying(batch: list[Job]) -> None:  # the first batch's run escapes the loop
        nonlocal calls
        calls += 1
        if calls == 1:
            entered.set()
            release.wait(10)
            raise RuntimeError("injected: the device worker's loop failed")
        run_batch(batch)

    worker._run_batch = dying  # type: ignore[method-assign]
    jobs = [adapt_job(meta_models, "sinusoid", *support(5, seed)) for seed in range(4)]
    with caplog.at_level(logging.ERROR, logger="service.engine.worker"):
        doomed = engine.submit_adapt(jobs[0])
        assert entered.wait(10)
        later = [engine.submit_adapt(job) for job in jobs[1:]]  # queued behind it
        release.set()
        with pytest.raises(Unavailable) as failed:
            doomed.result(timeout=30)
        assert failed.value.retry_after is not None  # a 503 with Retry-After
        for job, future in zip(jobs[1:], later, strict=True):
            assert_matches_alone(meta, job, future.result(timeout=30))
    first.join(10)
    assert not first.is_alive()
    assert worker._thread is not first and worker._thread.is_alive()
    assert engine.stats().worker.restarts == 1
    assert [r.exc_info is not None for r in caplog.records] == [True]
    assert "device worker died (RuntimeError)" in caplog.records[0].getMessage()


def test_failures_between_batches_lose_nothing_and_the_restarts_back_off(
    meta_models: dict[str, MetaModel],
) -> None:
    engine = Engine({"sinusoid": meta_models["sinusoid"]}, EngineConfig(device="cpu"))
    batcher, failures = engine.batcher, 3
    next_batch = batcher.next_batch

    def flaky() -> Any:  # fails before taking a batch, three times in a row
        nonlocal failures
        if failures:
            failures -= 1
            raise RuntimeError("injected: next_batch failed")
        return next_batch()

    batcher.next_batch = flaky  # type: ignore[method-assign]
    job = adapt_job(meta_models, "sinusoid", *support(5, 7))
    future = engine.submit_adapt(job)  # queued before the worker starts
    engine.start()
    try:
        assert_matches_alone(meta_models["sinusoid"], job, future.result(timeout=30))
        assert engine.stats().worker.restarts == 3
    finally:
        engine.stop(timeout=10)


def test_stop_waits_at_most_its_timeout_and_fails_what_is_still_queued(
    meta_models: dict[str, MetaModel],
) -> None:
    engine = Engine({"sinusoid": meta_models["sinusoid"]}, EngineConfig(device="cpu"))
    engine.start()
    runner = engine.runners[meta_models["sinusoid"].version]
    adapt, entered, release = runner.adapt, threading.Event(), threading.Event()

    def stuck(works: Any) -> Any:  # the running batch outlives the shutdown timeout
        entered.set()
        release.wait(30)
        return adapt(works)

    runner.adapt = stuck  # type: ignore[method-assign]
    jobs = [adapt_job(meta_models, "sinusoid", *support(5, seed)) for seed in range(2)]
    running = engine.submit_adapt(jobs[0])
    assert entered.wait(10)
    queued = engine.submit_adapt(jobs[1])
    engine.stop(timeout=0.2)  # returns with the batch still running
    with pytest.raises(Unavailable):
        queued.result(timeout=0)
    with pytest.raises(Unavailable):  # refused: stopping
        engine.submit_adapt(jobs[1])
    release.set()
    assert_matches_alone(meta_models["sinusoid"], jobs[0], running.result(timeout=30))
    engine.worker.join(10)
