"""The batched engine behind ``service.engine``'s interface.

Request threads call ``submit_adapt`` / ``submit_predict`` with validated jobs; a full
queue raises ``Unavailable`` at once. The device worker runs queued jobs as
micro-batches and completes their futures, which sync code waits on with ``.result()``
and asyncio with ``asyncio.wrap_future``. A prediction that finds the engine idle (no job
queued, the device free) runs at once in the caller's thread and answers a done future:
no thread hand-off, which costs more than a small net's forward pass.

Callers holding many jobs at once (bulk endpoints) hand them over in one call,
``submit_predict_many`` / ``submit_adapt_many``: one queue operation, and one batch (one
gathered forward over the clients' stacked params, or one inner loop) per meta-model
and ``max_batch_size`` jobs.

The params cache is keyed by each version's uid, which is never reused: a client deleted
and re-created (version 1 again) has new keys, so no process, whether or not it heard of
the delete, can answer it from an old entry. ``forget`` only frees a deleted client's
bytes early; its tickets keep params computed or read before a ``forget`` from being
cached after it (entries nobody could ask for). An adaptation takes its ticket when it is
submitted, a prediction's miss when it is refused with ``NotCached``; both travel inside
what the caller hands back, so callers never see them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

from torch import Tensor

from models.checkpoint import MetaModel
from models.device import resolve_device
from models.kernels import KernelPath
from service.engine.batcher import Batcher, Job
from service.engine.cache import CacheStats, FastParams, ParamsCache
from service.engine.jobs import Adapted, AdaptJob, Key, NotCached, PredictJob
from service.engine.observer import EngineObserver
from service.engine.runner import AdaptWork, ModelRunner, PredictWork
from service.engine.texts import EmbeddingStats, EncodeWork, Texts, TextStage, is_texts
from service.engine.worker import DeviceWorker, WorkerStats
from service.errors import Unavailable

log = logging.getLogger(__name__)
MiB = 1 << 20
T = TypeVar("T")


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
    embedding_cache_bytes: int = 64 * MiB  # text embeddings kept (service.engine.texts)
    encoder_half: bool = True  # a sentence encoder in half precision on CUDA

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
    texts: EmbeddingStats  # text meta-models' encode passes and embedding cache


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
        self.texts = TextStage(self.device, config.embedding_cache_bytes, config.encoder_half)
        for runner in self.runners.values():
            self._prepare(runner)
        self.batcher = Batcher(
            max_batch_size=config.max_batch_size,
            max_batch_delay_s=config.max_batch_delay_ms / 1000.0,
            queue_size=config.queue_size,
        )
        self.worker = DeviceWorker(
            self.batcher,
            self.runners,
            self.cache,
            threads=config.threads,
            observer=observer,
            texts=self.texts,
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
        params are stored, and the engine caches them for the first prediction. Texts are
        encoded first (``_encoded``)."""
        runner = self._runner(job.meta_model, job.model)
        if is_texts(job.inputs):
            return self._encoded(
                runner,
                job.inputs,
                lambda x: self.submit_adapt(replace(job, inputs=x)),
                scope=job.tenant,
            )
        queued = Job(runner.adapt_group(job), AdaptWork(job, self.cache.ticket()), self._deadline())
        self._put(queued, job.meta_model)
        return queued.future

    def submit_adapt_many(self, jobs: Sequence[AdaptJob]) -> list[Future[Adapted]]:
        """``submit_adapt`` for many jobs in one queue operation, so that they run as few
        batches (one per meta-model and kernel group, of up to ``max_batch_size``). A queue
        without room for all of them refuses them all with ``Unavailable``; a job whose
        meta-model is not loaded (and carries none) fails its own future with KeyError."""
        futures: list[Future[Adapted]] = []
        queued: list[tuple[Job, str]] = []
        deadline = self._deadline()
        for job in jobs:
            try:
                runner = self._runner(job.meta_model, job.model)
            except KeyError as exc:
                futures.append(_failed(exc))
                continue
            if is_texts(job.inputs):  # through the encode stage, which batches them
                futures.append(self.submit_adapt(job))
                continue
            work = AdaptWork(job, self.cache.ticket())
            one = Job(runner.adapt_group(job), work, deadline)
            queued.append((one, job.meta_model))
            futures.append(one.future)
        self._put_many(queued)
        return futures

    def submit_predict(self, job: PredictJob, on_loop: bool = False) -> Future[list[list[float]]]:
        """Outputs (Q, O) of client version ``job.key`` on ``job.inputs``.

        Without ``job.params``, a cache miss raises ``NotCached`` at once: read the stored
        params and submit ``miss.loaded(params)``, which the engine then caches.
        Params that do not fit the meta-model raise ``ValueError`` here. When the engine
        is idle the prediction runs now, in this thread, and the future is done; with
        ``on_loop`` (the caller is an event loop, which must not wait for the device) only
        a small net's forward does (an MLP's, tens of microseconds), any other is queued."""
        runner, work = self._predict_work(job)
        return self._predict_work_now_or_queued(runner, job, work, on_loop)

    def _predict_work_now_or_queued(
        self, runner: ModelRunner, job: PredictJob, work: PredictWork, on_loop: bool = False
    ) -> Future[list[list[float]]]:
        """``submit_predict`` past its checks: texts through the encode stage first."""
        if is_texts(work.inputs):
            return self._encoded(
                runner,
                work.inputs,
                lambda x: self._predict_now_or_queued(runner, job, work._replace(inputs=x)),
                on_loop,
                scope=job.key[0],
            )
        return self._predict_now_or_queued(runner, job, work, on_loop)

    def _predict_now_or_queued(
        self, runner: ModelRunner, job: PredictJob, work: PredictWork, on_loop: bool = False
    ) -> Future[list[list[float]]]:
        now = not on_loop or bool(work.fast.layers)
        if now and not len(self.batcher) and self._started and not self.batcher.closed:
            done = self.worker.predict_now(runner, [work])
            if done is not None:
                return done[0]
        # batched with what is queued, never waiting for more: a forward pass is too cheap
        # for a wait to pay (at 16 connections a 2 ms wait cost 10% of HTTP throughput)
        queued = Job((job.meta_model, "predict"), work, self._deadline(), wait=False)
        self._put(queued, job.meta_model)
        return queued.future

    def submit_predict_many(self, jobs: Sequence[PredictJob]) -> list[Future[list[list[float]]]]:
        """``submit_predict`` for many jobs (many clients' queries) at once: one future per
        job, in order. Each meta-model's jobs run as one gathered forward over their
        clients' stacked params (per ``max_batch_size`` jobs): at once in this thread when
        the engine is idle, else queued in one operation.

        Nothing is raised for one job: a cache miss fails its future with ``NotCached``
        at once (read the stored params and submit ``miss.loaded(params)``, again many at
        a time), params that do not fit with ValueError, an unloaded meta-model with
        KeyError. A queue without room for all the rest refuses them all with
        ``Unavailable`` (raised)."""
        futures: list[Future[list[list[float]]] | None] = [None] * len(jobs)
        groups: dict[str, tuple[ModelRunner, list[int], list[PredictWork]]] = {}
        for i, job in enumerate(jobs):
            try:
                runner, work = self._predict_work(job, admit=False)
                if is_texts(work.inputs):  # through the encode stage, which batches them
                    futures[i] = self._predict_work_now_or_queued(runner, job, work)
                    continue
            except (NotCached, ValueError, KeyError) as exc:
                futures[i] = _failed(exc)
                continue
            group = groups.setdefault(job.meta_model, (runner, [], []))
            group[1].append(i)
            group[2].append(work)
        queued: list[tuple[Job, str]] = []
        deadline = self._deadline()
        size = self.config.max_batch_size
        for version, (runner, places, works) in groups.items():
            for start in range(0, len(works), size):
                chunk = works[start : start + size]
                done = None
                if not queued and not len(self.batcher) and self._started:
                    self.batcher.admit()  # a stopping engine refuses
                    done = self.worker.predict_now(runner, chunk)
                for j, work in enumerate(chunk):
                    if done is not None:
                        futures[places[start + j]] = done[j]
                        continue
                    one = Job((version, "predict"), work, deadline, wait=False)
                    queued.append((one, version))
                    futures[places[start + j]] = one.future
        self._put_many(queued)
        return [f for f in futures if f is not None]

    def _predict_work(self, job: PredictJob, admit: bool = True) -> tuple[ModelRunner, PredictWork]:
        runner = self._runner(job.meta_model, job.model)
        ticket = job.ticket
        if job.params is None:
            fast = self.cache.get(job.key)
            if fast is None:
                if admit:
                    self.batcher.admit()  # a full queue refuses before the database is read
                raise NotCached(job, self.cache.ticket())
        else:
            flat = runner.fast_params(job.params)  # (P,) on the CPU
            # params from elsewhere than a miss are never cached; a miss's are moved and
            # laid out by whoever runs it, then cached
            fast = runner.view(flat.to(self.device)) if ticket is None else FastParams(flat)
        return runner, PredictWork(job.inputs, fast, job.key, ticket)

    def _encoded(
        self,
        runner: ModelRunner,
        texts: Texts,
        then: Callable[[Tensor], Future[T]],
        on_loop: bool = False,
        scope: str = "",
    ) -> Future[T]:
        """``then(embeddings)``'s future, the texts' embeddings (N, D) taken from the cache
        now if all are there; else encoded now, in this thread, when the engine is idle
        (not on an event loop: an encoder pass takes milliseconds); else from an encode job
        that the device worker batches with every other queued one (adaptations and
        predictions alike). Embeddings are cached per ``scope`` (the job's tenant)."""
        assert runner.encoder is not None
        sha = self.texts.prepare(runner.encoder)
        known = self.texts.cached(sha, texts, scope)
        if known is not None:
            return then(known)
        if not on_loop and not len(self.batcher) and self._started and not self.batcher.closed:
            done = self.worker.encode_now([EncodeWork(sha, texts, scope)])
            if done is not None:
                return then(done[0])
        queued = Job((sha, "encode"), EncodeWork(sha, texts, scope), self._deadline())
        self._put(queued, runner.version)  # the runner stays loaded until its job is queued
        result: Future[T] = Future()

        def encoded(done: Future[Tensor]) -> None:
            try:
                _chain(then(done.result()), result)
            except BaseException as exc:  # the encode failed, or the job was refused
                _settle(result, exc=exc)

        queued.future.add_done_callback(encoded)
        return result

    def stored(self, adapted: Adapted, key: Key) -> bool:
        """``adapted``'s params are now stored as client version ``key`` (its uid): cache
        them, so its first prediction reads no database; not if its client was forgotten
        since the adaptation was submitted. A version is immutable and its uid never
        reused, so its key is never stale. True if cached."""
        runner = self.runners.get(adapted.meta_model)
        if runner is None:  # unloaded since: its first prediction reads the store
            return False
        fast = runner.view(runner.fast_params(adapted.params).to(self.device))
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

    def load(self, model: MetaModel) -> None:
        """Load ``model`` on the device now and warm it up, unless it is loaded: an engine
        process, told of a version by a front, calls it before it submits any job of that
        version. The warm-up runs beside the worker's batches (it touches only the new
        runner: an image meta-model's takes a second or two on a CPU); the shared text
        encoder's, under the device lock."""
        if model.version in self.runners:
            return
        runner = self._runner(model.version, model)
        runner.warm_up()
        if runner.encoder is not None:
            with self.worker.device_lock:
                self.texts.warm_up()

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
        runner = self.runners.get(version)  # the common case, without the lock: loaded and
        if runner is not None and version not in self._released:  # not being released
            return runner
        with self._lock:
            self._released.discard(version)
            runner = self.runners.get(version)
        if runner is not None:
            return runner
        if model is None or model.version != version:
            raise KeyError(f"meta-model version {version[:12]} is not loaded")
        built = ModelRunner(model, self.device, self.config.path)  # outside the lock: a copy
        self._prepare(built)
        with self._lock:
            runner = self.runners.setdefault(version, built)
        log.info("loaded meta-model %s@%s on %s", model.name, version[:12], self.device)
        return runner

    def _prepare(self, runner: ModelRunner) -> None:
        """Load the encoder a text meta-model pins (``EncoderMismatch`` if it differs)."""
        if runner.encoder is not None:
            self.texts.prepare(runner.encoder)

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

    def _put_many(self, queued: Sequence[tuple[Job, str]]) -> None:
        """``_put`` for many jobs, all or none."""
        if not queued:
            return
        with self._lock:
            self._pending.update(version for _, version in queued)
        try:
            self.batcher.put_many([job for job, _ in queued])
        except BaseException:
            for _, version in queued:
                self._done(version)
            raise
        for job, version in queued:
            job.future.add_done_callback(lambda _, v=version: self._done(v))  # type: ignore[misc]

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

    @property
    def ready(self) -> bool:
        """In this process: ready once started, until stopped."""
        return self._started and not self.batcher.closed

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
            texts=self.texts.stats(),
        )

    def _deadline(self) -> float:
        return time.monotonic() + self.config.job_timeout_s


def _settle(future: Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
    """Complete ``future`` unless its caller cancelled it (gave up waiting)."""
    with contextlib.suppress(InvalidStateError):
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)


def _chain(source: Future[T], target: Future[T]) -> None:
    """Complete ``target`` as ``source`` completes."""

    def done(f: Future[T]) -> None:
        if f.cancelled():
            target.cancel()
            return
        exc = f.exception()
        _settle(target, None if exc is not None else f.result(), exc)

    source.add_done_callback(done)


def _failed(exc: BaseException) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_exception(exc)
    return future
