"""The engine: owns the device and runs adaptations and predictions off the request threads.

This first version is minimal: one worker thread runs jobs one at a time, with no
cross-client batching. Its interface (``AdaptJob``, ``Adapted``, ``Engine``) is the one
the batched device worker keeps. Requests reach torch only through here.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch
from torch import Tensor

from models.checkpoint import MetaModel
from models.params import Params, from_bytes, to, to_bytes
from service.engine.cache import ParamsCache
from service.errors import InvalidInput, Unavailable
from service.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
_Job = tuple[Callable[[], Any], Future[Any]]


@dataclass(frozen=True)
class AdaptJob:
    meta_model: str  # name of a loaded meta-model
    inputs: list[list[float]]  # (K, D) support inputs, D = prod(input_shape)
    targets: list[float]  # (K,) support targets
    steps: int | None  # inner steps; None: the meta-model's default
    lr: float | None  # inner rate; None: the meta-model's default (or its learned rates)


@dataclass(frozen=True)
class Adapted:
    params: bytes  # safetensors of the adapted ("fast") params
    loss_before: float  # support loss at the meta-initialisation
    loss_after: float  # support loss after the last inner step
    steps: int  # inner steps taken
    lr: float | None  # inner rate used; None when the meta-model's learned rates were
    adapt_ms: float  # time on the worker, tensors in to bytes out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Engine:
    def __init__(self, meta_models: dict[str, MetaModel], settings: Settings) -> None:
        self.meta_models = meta_models
        self.settings = settings
        self.device = resolve_device(settings.device)
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=settings.queue_size)
        self._cache = ParamsCache(settings.cache_bytes)
        self._worker: threading.Thread | None = None
        self._accepting = False

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        if self._worker is not None:
            return
        for meta_model in self.meta_models.values():
            meta_model.to(self.device)
        self._worker = threading.Thread(target=self._run, name="fastadapt-engine", daemon=True)
        self._worker.start()
        self._accepting = True
        for meta_model in self.meta_models.values():  # on the worker, before any request
            self._submit(partial(_warm_up, meta_model, self.device)).result()
        log.info("engine started on %s with %d meta-model(s)", self.device, len(self.meta_models))

    def stop(self) -> None:
        """Finish the queued jobs, then stop; jobs submitted afterwards are refused."""
        if self._worker is None:
            return
        self._accepting = False
        self._jobs.put(None)
        self._worker.join()
        self._worker = None
        while not self._jobs.empty():  # submitted while stopping
            job = self._jobs.get_nowait()
            if job is not None:
                job[1].set_exception(Unavailable("the engine stopped", retry_after=1.0))

    # -- jobs --------------------------------------------------------------------------------
    def submit_adapt(self, job: AdaptJob) -> Future[Adapted]:
        meta_model = self._meta_model(job.meta_model)
        return self._submit(lambda: _adapt(meta_model, job, self.device))

    def submit_predict(
        self,
        meta_model: str,
        key: tuple[str, str, int],
        params: Callable[[], bytes],
        inputs: list[list[float]],
    ) -> Future[list[list[float]]]:
        """Predict with one client version; ``params()`` runs (in this thread) on a cache miss."""
        model = self._meta_model(meta_model)
        fast = self._cache.get(key, lambda: to(from_bytes(params()), self.device))
        return self._submit(lambda: _predict(model, fast, inputs, self.device))

    def forget(self, tenant_id: str, client_id: str) -> None:
        self._cache.forget(tenant_id, client_id)

    # -- internals ---------------------------------------------------------------------------
    def _meta_model(self, name: str) -> MetaModel:
        try:
            return self.meta_models[name]
        except KeyError:
            raise InvalidInput("meta_model", f"unknown meta-model {name!r}") from None

    def _submit(self, fn: Callable[[], T]) -> Future[T]:
        if not self._accepting:
            raise Unavailable("the engine is not running", retry_after=1.0)
        future: Future[T] = Future()
        try:
            self._jobs.put_nowait((fn, future))
        except queue.Full:
            raise Unavailable("the engine's queue is full", retry_after=1.0) from None
        return future

    def _run(self) -> None:
        torch.set_num_threads(self.settings.threads)  # OpenMP's setting is per thread
        while (job := self._jobs.get()) is not None:
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)


def _tensor(rows: list[list[float]], meta_model: MetaModel, device: torch.device) -> Tensor:
    # (N, D) lists -> (N, *input_shape) float32
    x = torch.tensor(rows, dtype=torch.float32, device=device)
    return x.reshape(len(rows), *meta_model.config.input_shape)


def _adapt(meta_model: MetaModel, job: AdaptJob, device: torch.device) -> Adapted:
    start = time.perf_counter()
    x = _tensor(job.inputs, meta_model, device)  # (K, *input_shape)
    if meta_model.config.kind == "classification":
        y = torch.tensor(job.targets, dtype=torch.long, device=device)  # (K,) class indices
    else:
        y = torch.tensor(job.targets, dtype=torch.float32, device=device).reshape(len(x), -1)
    result = meta_model.adapt(x, y, steps=job.steps, lr=job.lr)
    params = to_bytes(result.fast)
    inner = meta_model.config.inner
    default_lr = None if inner.learned_lr != "none" else inner.lr
    return Adapted(
        params=params,
        loss_before=float(result.loss_before),
        loss_after=float(result.loss_after),
        steps=inner.steps if job.steps is None else job.steps,
        lr=default_lr if job.lr is None else job.lr,
        adapt_ms=(time.perf_counter() - start) * 1000.0,
    )


def _warm_up(meta_model: MetaModel, device: torch.device) -> None:
    """One tiny adaptation, so the first request does not pay torch.func's set-up."""
    width = math.prod(meta_model.config.input_shape)
    _adapt(meta_model, AdaptJob(meta_model.name, [[0.0] * width], [0.0], 1, None), device)


def _predict(
    meta_model: MetaModel, fast: Params, inputs: list[list[float]], device: torch.device
) -> list[list[float]]:
    x = _tensor(inputs, meta_model, device)  # (Q, *input_shape)
    out: list[list[float]] = meta_model.predict(fast, x).reshape(len(inputs), -1).tolist()
    return out  # (Q, O)
