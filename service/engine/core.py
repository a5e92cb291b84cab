"""The batched engine behind ``service.engine``'s interface.

Request threads call ``submit_adapt`` / ``submit_predict`` with validated jobs; a full
queue raises ``Unavailable`` at once. The device worker runs queued jobs as
micro-batches and completes their futures, which sync code waits on with ``.result()``
and asyncio with ``asyncio.wrap_future``.

The params cache is keyed by each version's uid, which is never reused: a client deleted
and re-created (version 1 again) has new keys, so no process, whether or not it heard of
the delete, can answer it from an old entry. ``forget`` only frees a deleted client's
bytes early; its tickets keep params computed or read before a ``forget`` from being
cached after it (entries nobody could ask for). An adaptation takes its ticket when it is
submitted, a prediction's miss when it is refused with ``NotCached``; both travel inside
what the caller hands back, so callers never see them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, fields, replace

from models.checkpoint import MetaModel
from models.device import resolve_device
from models.kernels import KernelPath
from service.engine.batcher import Batcher, Job
from service.engine.cache import CacheStats, ParamsCache
from service.engine.jobs import Adapted, AdaptJob, Key, NotCached, PredictJob
from service.engine.observer import EngineObserver
from service.engine.runner import AdaptWork, ModelRunner, PredictWork
from service.engine.worker import DeviceWorker, WorkerStats
from service.errors import Unavailable

log = logging.getLogger(__name__)
MiB = 1 << 20


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    max_batch_size: int = 256  # most jobs in one batch (Triton's max_batch_size)
    max_batch_delay_ms: float = 2.0  # most a batch of concurrent jobs waits to fill
    queue_size: int = 1024  # jobs pending before submits are refused with Unavailable
    cache_bytes: int = 256 * MiB  # adapted params kept on the device
    job_timeout_s: float = 30.0  # a job not started by then fails with DeadlineExceeded
    threads: int = 1  # torch intra-op threads; 1 measured best on a shared 2-core machine
    path: KernelPath = "auto"  # "auto" (bmm for MLPs, else vmap), "vmap", "bmm" (MLPs only)

    @classmethod
    def of(cls, settings: object) -> EngineConfig:
        """The engine's part of any settings object (the service's ``Settings``)."""
        names = [f.name for f in fields(cls)]
        return cls(**{n: getattr(settings, n) for n in names if hasattr(settings, n)})


@dataclass(frozen=True)
class EngineStats:
    worker: WorkerStats  # batches and jobs run, batch sizes
    cache: CacheStats  # hits, misses, evictions, bytes
    queued: int  # jobs waiting now
    rejected: int  # submits refused because the queue was full
    expired: int  # jobs failed with DeadlineExceeded


class Engine:
    def __init__(
        self,
        meta_models: Mapping[str, MetaModel],
        settings: object,
        observer: EngineObserver | None = None,
    ) -> None:
        """``observer`` hears how long each batch ran and its jobs waited (metrics)."""
        config = settings if isinstance(settings, EngineConfig) else EngineConfig.of(settings)
        self.config = config
        self.device = resolve_device(config.device)
        # by meta-model version (sha): any registered version runs, loaded on demand
        self.runners = {
            meta_model.version: ModelRunner(meta_model, self.device, config.path)
            for meta_model in meta_models.values()
        }
        self._lock = threading.Lock()  # runners, _pending, _released
        self._pending: Counter[str] = Counter()  # jobs queued or running, per version
        self._released: set[str] = set()  # to unload once their last job is done
        self.cache = ParamsCache(config.cache_bytes)
        self.batcher = Batcher(
            max_batch_size=config.max_batch_size,
            max_batch_delay_s=config.max_batch_delay_ms / 1000.0,
            queue_size=config.queue_size,
        )
        self.worker = DeviceWorker(
            self.batcher, self.runners, self.cache, threads=config.threads, observer=observer
        )
        self._started = False

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Warm up every meta-model on the device, then serve. Jobs submitted before
        ``start`` wait in the queue."""
        if self._started:
            return
        self.worker.start()
        self._started = True
        paths = {r.name: r.batched.path for r in list(self.runners.values())}
        log.info("engine on %s, %d thread(s), kernels %s", self.device, self.config.threads, paths)

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish the queued ones (for at most ``timeout`` seconds), then
        stop; jobs still queued then fail with ``Unavailable``."""
        self.batcher.close()
        if self._started:
            self.worker.join(timeout)
        self.batcher.fail_all(Unavailable("the engine stopped", 1.0))

    # -- jobs --------------------------------------------------------------------------------
    def submit_adapt(self, job: AdaptJob) -> Future[Adapted]:
        """The adapted params and losses of ``job``. Hand the result to ``stored`` once its
        params are stored, and the engine caches them for the first prediction."""
        runner = self._runner(job.meta_model, job.model)
        queued = Job(runner.adapt_group(job), AdaptWork(job, self.cache.ticket()), self._deadline())
        self._put(queued, job.meta_model)
        return queued.future

    def submit_predict(self, job: PredictJob) -> Future[list[list[float]]]:
        """Outputs (Q, O) of client version ``job.key`` on ``job.inputs``.

        Without ``job.params``, a cache miss raises ``NotCached`` at once: read the stored
        params and submit ``miss.loaded(params)``, which the device worker then caches.
        Params that do not fit the meta-model raise ``ValueError`` here."""
        runner = self._runner(job.meta_model, job.model)
        ticket = job.ticket
        if job.params is None:
            fast = self.cache.get(job.key)
            if fast is None:
                self.batcher.admit()  # a full queue refuses before the database is read
                raise NotCached(job, self.cache.ticket())
        else:
            fast = runner.fast_params(job.params)  # (P,) on the CPU
            if ticket is None:  # params from elsewhere than a miss: never cached
                fast = fast.to(self.device)
        work = PredictWork(job.inputs, fast, job.key, ticket)
        # batched with what is queued, never waiting for more: a forward pass is too cheap
        # for a wait to pay (at 16 connections a 2 ms wait cost 10% of HTTP throughput)
        queued = Job((job.meta_model, "predict"), work, self._deadline(), wait=False)
        if not self._run_now(queued, job.meta_model):
            self._put(queued, job.meta_model)
        return queued.future

    def _run_now(self, queued: Job, version: str) -> bool:
        """The synchronous fast path (issue 14): a prediction runs in the calling thread
        when the CPU engine is idle (nothing queued, no batch running), exactly as the
        device worker would run it alone (counted, observed, cached after a miss). It
        spares the hand-off to the worker and back: two thread wake-ups, which on a loaded
        machine cost milliseconds against a forward pass of ~20 us. A forward pass only
        reads the runner's weights, so one here beside a batch starting meanwhile is safe.
        False (nothing done) otherwise: queue it."""
        if self.device.type != "cpu" or not self._started:
            return False
        if len(self.batcher) or self.worker._running:  # busy: batch with the others
            return False
        self.batcher.admit()  # refused while stopping, as a put would be
        with self._lock:
            self._pending[version] += 1  # its runner stays loaded while it runs
        try:
            self.worker._run_batch([queued])
        finally:
            self._done(version)
        return True

    def stored(self, adapted: Adapted, key: Key) -> bool:
        """``adapted``'s params are now stored as client version ``key`` (its uid): cache
        them, so its first prediction reads no database; not if its client was forgotten
        since the adaptation was submitted. A version is immutable and its uid never
        reused, so its key is never stale. True if cached."""
        runner = self.runners.get(adapted.meta_model)
        if runner is None:  # unloaded since: its first prediction reads the store
            return False
        fast = runner.fast_params(adapted.params).to(self.device)
        return self.cache.put(key, fast, adapted.ticket)

    def ticket(self) -> int:
        """For params the caller reads itself (a rollback's copy of a stored version):
        take this before the read and pass it as ``Adapted.ticket`` to ``stored``, which
        then skips them if their client was forgotten meanwhile."""
        return self.cache.ticket()

    # -- meta-model versions ------------------------------------------------------------------
    def loaded(self) -> list[str]:
        """The versions (shas) on the device now."""
        with self._lock:
            return list(self.runners)

    def release(self, version: str) -> None:
        """Unload meta-model ``version`` from the device: now if no job of it is queued or
        running, else once its last one is done (a job that loads it again cancels that)."""
        with self._lock:
            if self._pending[version]:
                self._released.add(version)
            else:
                self.runners.pop(version, None)

    def _runner(self, version: str, model: MetaModel | None) -> ModelRunner:
        """The runner of ``version``, created from ``model`` if it is not loaded (a job
        without ``model`` must name a loaded version: a KeyError otherwise)."""
        with self._lock:
            self._released.discard(version)
            runner = self.runners.get(version)
        if runner is not None:
            return runner
        if model is None or model.version != version:
            raise KeyError(f"meta-model version {version[:12]} is not loaded")
        built = ModelRunner(model, self.device, self.config.path)  # outside the lock: a copy
        with self._lock:
            runner = self.runners.setdefault(version, built)
        log.info("loaded meta-model %s@%s on %s", model.name, version[:12], self.device)
        return runner

    def _put(self, queued: Job, version: str) -> None:
        """Queue a job of ``version``, counted until its future is done (while it counts,
        ``release`` leaves the version's runner in place)."""
        with self._lock:
            self._pending[version] += 1
        try:
            self.batcher.put(queued)
        except BaseException:
            self._done(version)
            raise
        queued.future.add_done_callback(lambda _: self._done(version))

    def _done(self, version: str) -> None:
        with self._lock:
            self._pending[version] -= 1
            if self._pending[version] <= 0:
                del self._pending[version]
                if version in self._released:
                    self._released.discard(version)
                    self.runners.pop(version, None)

    def forget(self, tenant_id: str, client_id: str) -> None:
        """Drop every cached version of this client (call after the delete). Uid keys
        already keep them from being served again; this frees their bytes now."""
        self.cache.forget(tenant_id, client_id)

    def stats(self) -> EngineStats:
        live = self.worker.stats
        return EngineStats(
            worker=replace(  # a snapshot
                live, batch_sizes={k: dict(v) for k, v in list(live.batch_sizes.items())}
            ),
            cache=self.cache.stats(),
            queued=len(self.batcher),
            rejected=self.batcher.rejected,
            expired=self.batcher.expired,
        )

    def _deadline(self) -> float:
        return time.monotonic() + self.config.job_timeout_s
