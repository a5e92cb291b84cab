"""The device worker: one thread that owns the device and runs micro-batches on it.

``DeviceWorker`` takes batches from the ``Batcher``, runs them on their meta-model's
``ModelRunner`` and completes their futures. Predictions whose params were read after a
cache miss are moved to the device and cached here, under the ticket their miss took.
After each batch it tells its ``EngineObserver`` how long the batch ran and its jobs waited.

The worker holds ``device_lock`` while it runs a batch. ``predict_now`` runs predictions
in the caller's thread instead, under the same lock taken without waiting, when the
device is free: a forward pass of a small net costs less than two thread hand-offs, so a
prediction that finds the engine idle answers at the speed of a plain forward loop.

A supervisor keeps the device served: an exception that escapes the worker's loop (a bug, a
device error outside a batch's own ``try``) fails the batch it was running with
``Unavailable`` (503, retry), is logged and counted (``WorkerStats.restarts``), and a new
thread takes over the queue, so later jobs run as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures._base import FINISHED
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from service.engine.batcher import Batcher, Job
from service.engine.cache import ParamsCache
from service.engine.device import configure_threads
from service.engine.observer import EngineObserver
from service.engine.runner import ModelRunner, PredictWork
from service.engine.texts import EncodeWork, TextStage
from service.errors import Unavailable

log = logging.getLogger(__name__)
RESTART_BACKOFF_S = (0.01, 1.0)  # pause before a restart: doubles per failure in a row, capped


_DONE = threading.Condition()  # every DoneFuture's: re-entrant, and nobody waits on it


class DoneFuture(Future[Any]):
    """A future born done, with its result: a prediction run at once in the caller's
    thread answers one per client (a plain Future's condition, set_result and notify
    cost more than the forward pass of a small net). It behaves as any done Future
    (``result``, callbacks, ``asyncio.wrap_future``, ``concurrent.futures.wait``)."""

    def __init__(self, result: Any) -> None:  # no super().__init__: nothing to set up
        self._condition = _DONE
        self._state = FINISHED
        self._result = result
        self._exception = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []

    def result(self, timeout: float | None = None) -> Any:
        return self._result


@dataclass
class WorkerStats:
    adapt_batches: int = 0
    adapt_jobs: int = 0
    predict_batches: int = 0
    predict_jobs: int = 0
    failed_jobs: int = 0  # jobs whose run raised (after a retry alone)
    largest_batch: int = 0
    restarts: int = 0  # times the worker's thread died and a new one took over
    # kind ("adapt", "predict", "encode") -> size (jobs) -> batches of that size
    batch_sizes: dict[str, dict[int, int]] = field(default_factory=dict)


class DeviceWorker:
    """The thread that owns the device: takes batches, runs them, completes futures."""

    def __init__(
        self,
        batcher: Batcher,
        runners: dict[str, ModelRunner],
        cache: ParamsCache,
        *,
        threads: int,
        observer: EngineObserver | None = None,
        texts: TextStage | None = None,
    ) -> None:
        self.batcher = batcher
        self.runners = runners
        self.cache = cache
        self.threads = threads
        self.texts = texts  # text meta-models' encoders (their "encode" batches)
        self.observer = observer or EngineObserver()
        self._observed = type(self.observer) is not EngineObserver  # not the do-nothing one
        self.stats = WorkerStats()
        self.names: dict[str, str] = {}  # meta-model version -> name, of batches run
        self.ready = threading.Event()
        self.device_lock = threading.Lock()  # held while a batch runs, here or inline
        self._thread = threading.Thread()  # replaced by start(), and by every restart
        self._error: BaseException | None = None
        self._running: list[Job] = []  # the batch being run: failed if the thread dies
        self._failures = 0  # deaths since the last batch that ran to its end

    def start(self) -> None:
        """Start the thread and wait for it to warm up every meta-model."""
        self._spawn(self._warm_up_and_serve)
        self.ready.wait()
        if self._error is not None:
            raise RuntimeError("the device worker failed to start") from self._error

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker (and any thread that replaced it) to stop; at most ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            thread = self._thread
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread is self._thread or thread.is_alive():  # not replaced, or out of time
                return

    def _spawn(self, target: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=target, name="fastadapt-device", daemon=True)
        self._thread.start()

    def _warm_up_and_serve(self) -> None:
        try:
            configure_threads(self.threads)
            for runner in list(self.runners.values()):  # the versions loaded at start-up
                runner.warm_up()
            if self.texts is not None:
                self.texts.warm_up()
        except BaseException as exc:  # reported by start()
            self._error = exc
            self.ready.set()
            return
        self.ready.set()
        self._serve()

    def _serve(self) -> None:
        """The loop: batches until the batcher is closed and drained. Whatever escapes it
        is the supervisor's (``_restart``)."""
        try:
            configure_threads(self.threads)
            while (batch := self.batcher.next_batch()) is not None:
                self._running = batch
                self._run_batch(batch)
                self._running = []
                self._failures = 0
        except BaseException as exc:
            self._restart(exc)

    def _restart(self, exc: BaseException) -> None:
        """Fail the batch that was running (503: the caller may retry), then hand the queue
        to a new thread, after a pause that grows while the failures repeat."""
        jobs, self._running = self._running, []
        self.stats.restarts += 1
        self._failures += 1
        log.error(
            "the device worker died (%s), failing %d running job(s); restart %d",
            type(exc).__name__,
            len(jobs),
            self.stats.restarts,
            exc_info=exc,
        )
        error = Unavailable("the engine's worker failed and was restarted; retry", 1.0)
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)
        first, most = RESTART_BACKOFF_S
        time.sleep(min(most, first * 2 ** (self._failures - 1)))
        self._spawn(self._serve)

    def predict_now(self, runner: ModelRunner, works: Sequence[PredictWork]) -> list[Any] | None:
        """Run ``works`` (one batch of ``runner``'s) in the calling thread if the device is
        free now: a done future per work. None if the worker holds the device (queue them)."""
        if not self.device_lock.acquire(blocking=False):
            return None
        start = time.perf_counter()
        try:
            futures = self._predict_now(runner, works)
            seconds = time.perf_counter() - start
            self._count("predict", len(works), seconds)  # stats change under the lock
            self.names[runner.version] = runner.name
        finally:
            self.device_lock.release()
        if self._observed:
            self._observe(runner.version, "predict", [0.0] * len(works), seconds)
        return futures

    def encode_now(self, works: Sequence[EncodeWork]) -> list[Tensor] | None:
        """Encode ``works``' texts in the calling thread if the device is free now (an idle
        engine: no hand-off to the worker and back). None if the worker holds the device,
        or the pass failed (queue them: the worker's run reports the error)."""
        if self.texts is None or not self.device_lock.acquire(blocking=False):
            return None
        start = time.perf_counter()
        try:
            out = self.texts.encode(works)
            self._count("encode", len(works), time.perf_counter() - start)
        except Exception:
            return None
        finally:
            self.device_lock.release()
        return out

    def _predict_now(self, runner: ModelRunner, works: Sequence[PredictWork]) -> list[Any]:
        try:
            if len(works) == 1 and works[0].ticket is None and works[0].fast.layers:
                return [DoneFuture(runner.predict_one(works[0]))]  # the common case, lean
            results = runner.predict(self._cached(runner, works))
        except Exception as exc:
            if len(works) > 1:  # one bad job must not fail the others: run each alone
                return [f for work in works for f in self._predict_now(runner, [work])]
            self.stats.failed_jobs += 1
            failed: Future[Any] = Future()
            failed.set_exception(exc)
            return [failed]
        return [DoneFuture(result) for result in results]

    def _run_batch(self, batch: list[Job]) -> None:
        started = time.monotonic()  # the clock of Job.enqueued
        start = time.perf_counter()
        try:
            with self.device_lock:
                results = self._execute(batch)
                seconds = time.perf_counter() - start
                self._count(str(batch[0].group[1]), len(batch), seconds)
        except Exception as exc:
            if len(batch) > 1:  # one bad job must not fail the others: run each alone
                for job in batch:
                    self._run_batch([job])
                return
            with self.device_lock:
                self.stats.failed_jobs += 1
            batch[0].future.set_exception(exc)
            return
        for job, result in zip(batch, results, strict=True):
            job.future.set_result(result)
        waited = [started - job.enqueued for job in batch]
        self._observe(str(batch[0].group[0]), str(batch[0].group[1]), waited, seconds)

    def _observe(self, version: str, kind: str, waited: list[float], seconds: float) -> None:
        name = self.names.get(version, "")
        try:
            self.observer.batch_ran(meta_model=name, kind=str(kind), seconds=seconds, waited=waited)
        except Exception:  # a broken observer must not stop the device
            log.exception("the engine observer failed")

    def _execute(self, batch: list[Job]) -> list[Any]:
        version, kind = batch[0].group[:2]
        if kind == "encode":
            assert self.texts is not None
            return self.texts.encode([job.payload for job in batch])
        runner = self.runners[str(version)]  # loaded while a job of it is queued or running
        self.names[runner.version] = runner.name  # metrics report meta-models by name
        if kind == "adapt":
            return runner.adapt([job.payload for job in batch])
        return runner.predict(self._cached(runner, [job.payload for job in batch]))

    def _cached(self, runner: ModelRunner, works: Sequence[PredictWork]) -> Sequence[PredictWork]:
        """Params loaded after a miss onto the device and into the cache, under their ticket."""
        if all(work.ticket is None for work in works):
            return works
        out: list[PredictWork] = []
        for work in works:
            if work.ticket is not None:
                fast = runner.view(work.fast.flat.to(runner.device))
                self.cache.put(work.key, fast, work.ticket)
                work = PredictWork(work.inputs, fast, work.key, None)
            out.append(work)
        return out

    def _count(self, kind: str, size: int, seconds: float) -> None:
        stats = self.stats
        if kind == "adapt":
            stats.adapt_batches += 1
            stats.adapt_jobs += size
        elif kind == "predict":  # not "encode" (texts' passes: counted by their stage)
            stats.predict_batches += 1
            stats.predict_jobs += size
        if size > stats.largest_batch:
            stats.largest_batch = size
        sizes = stats.batch_sizes.setdefault(kind, {})
        sizes[size] = sizes.get(size, 0) + 1
        per_job = seconds / size
        self.batcher.seconds_per_job = 0.9 * self.batcher.seconds_per_job + 0.1 * per_job
