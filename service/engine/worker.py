"""The device worker: one thread that owns the device and runs micro-batches on it.

``ModelRunner`` holds one meta-model on the device (its own copy of the net, so the
caller's ``MetaModel`` is never moved or mutated) and turns jobs into tensors and
batches into results. ``DeviceWorker`` takes batches from the ``Batcher`` and completes
their futures. Request threads only validate and enqueue; torch runs here.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from models.batched import BatchedLearner, BytesPacker, Path, pad_batch
from models.checkpoint import MetaModel
from models.maml import Learner
from models.params import to
from service.engine.batcher import Batcher, Group, Job
from service.engine.cache import Key, ParamsCache
from service.errors import InvalidInput


@dataclass(frozen=True)
class AdaptJob:
    meta_model: str  # name of a loaded meta-model
    inputs: list[list[float]]  # (K, D) support inputs, D = prod(input_shape)
    targets: list[float]  # (K,) support targets (class indices for classification)
    steps: int | None  # inner steps; None: the meta-model's default
    lr: float | None  # inner rate; None: the meta-model's default (or its learned rates)


@dataclass(frozen=True)
class Adapted:
    params: bytes  # safetensors of the adapted ("fast") params
    loss_before: float  # support loss at the meta-initialisation
    loss_after: float  # support loss after the last inner step
    steps: int  # inner steps taken
    lr: float | None  # inner rate used; None when the meta-model's learned rates were
    adapt_ms: float  # wall time of the batch this job ran in, tensors in to bytes out


@dataclass(frozen=True)
class AdaptWork:
    """A validated adapt job. Inputs stay Python lists until the worker converts a whole
    batch with one ``torch.tensor`` call (per-job tensors cost more than the inner loop)."""

    inputs: Sequence[Sequence[float]]  # (K, D) finite numbers, D = prod(input_shape)
    targets: Sequence[Any]  # (K,) finite numbers (one output) or (K, O); or class indices
    steps: int
    lr: float | None  # None: the meta-model's learned rates


@dataclass(frozen=True)
class PredictWork:
    inputs: Sequence[Sequence[float]]  # (Q, D) finite numbers
    fast: Tensor  # (P,) the client's params, flat: on the device (a hit) or the CPU (loaded)
    key: Key
    ticket: int | None  # set when loaded after a miss: cache it under this ticket


def resolve_device(spec: str) -> torch.device:
    """ "auto" -> CUDA when present, else the CPU; otherwise a torch device string."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r}: CUDA is not available")
    return device


def configure_threads(threads: int) -> None:
    """Torch's intra-op threads for the whole process (the worker is its only big user)."""
    torch.set_num_threads(threads)
    # settable once, before the first parallel work; otherwise keep what is there
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)  # the worker never runs ops in parallel


class ModelRunner:
    """One meta-model on the device: job validation, batched adapt and predict."""

    def __init__(self, meta_model: MetaModel, device: torch.device, path: Path = "auto") -> None:
        self.name = meta_model.name
        self.device = device
        config = meta_model.config
        self.input_shape = config.input_shape
        self.classify = config.kind == "classification"
        self.inner = config.inner
        self.shifts = meta_model.support_shifts  # image support sets grow as meta-trained
        net = copy.deepcopy(meta_model.net).to(device)  # buffers (Standardize) included
        learner = Learner(net, meta_model.learner.loss, config.inner)
        params = to(meta_model.params, device)
        self.batched = BatchedLearner(learner, params, to(meta_model.lrs, device), path)
        self.packer = BytesPacker(learner.split(params)[0])
        if self.packer.dtype is None:
            raise ValueError(f"meta-model {self.name!r}: fast params of mixed dtypes")
        head = net.get_submodule("head")
        self.outputs = head.out_features if isinstance(head, nn.Linear) else None
        self.width = math.prod(self.input_shape)  # values per input row

    # -- validation, in the submitting thread -------------------------------------------------
    def inputs(self, rows: Sequence[Sequence[float]], field: str) -> Sequence[Sequence[float]]:
        """Check (N, D) nested lists of finite numbers, in Python (cheaper than torch here)."""
        try:
            if len(rows) == 0:
                raise InvalidInput(field, "no inputs")
            if any(len(row) != self.width for row in rows):
                raise InvalidInput(field, f"each input must have {self.width} value(s)")
            finite = all(map(math.isfinite, itertools.chain.from_iterable(rows)))
        except TypeError:
            raise InvalidInput(field, "not an array of numbers") from None
        if not finite:
            raise InvalidInput(field, "NaN or infinity")
        return rows

    def adapt_work(self, job: AdaptJob) -> AdaptWork:
        inputs = self.inputs(job.inputs, "support.inputs")
        if len(job.targets) != len(inputs):
            raise InvalidInput(
                "support.targets", f"{len(job.targets)} targets for {len(inputs)} inputs"
            )
        targets = self._targets(job.targets)
        if job.steps is not None and (not isinstance(job.steps, int) or job.steps < 0):
            raise InvalidInput("inner_steps", "must be an integer >= 0")
        if job.lr is not None and not math.isfinite(job.lr):
            raise InvalidInput("inner_lr", "must be a finite number")
        steps = self.inner.steps if job.steps is None else job.steps
        lr = job.lr
        if lr is None and self.inner.learned_lr == "none":
            lr = self.inner.lr
        return AdaptWork(inputs, targets, steps, lr)

    def _targets(self, targets: Sequence[Any]) -> Sequence[Any]:
        field = "support.targets"
        if self.classify:
            if not all(map(self._class_index, targets)):
                raise InvalidInput(field, f"class indices in [0, {self.outputs})")
            return targets
        try:  # (K,) numbers for one output, else (K, O)
            if self.outputs == 1:
                finite = all(map(math.isfinite, targets))
            elif any(len(row) != self.outputs for row in targets):
                raise InvalidInput(field, f"{self.outputs} values per target")
            else:
                finite = all(map(math.isfinite, itertools.chain.from_iterable(targets)))
        except TypeError:
            raise InvalidInput(field, f"{self.outputs} number(s) per target") from None
        if not finite:
            raise InvalidInput(field, "NaN or infinity")
        return targets

    def _class_index(self, t: Any) -> bool:
        """An int (or an integral float: 2.0) in [0, outputs); not a bool."""
        if isinstance(t, bool) or not isinstance(t, int | float) or not float(t).is_integer():
            return False
        return t >= 0 and (self.outputs is None or t < self.outputs)

    def fast_params(self, blob: bytes) -> Tensor:
        """Stored safetensors -> the flat (P,) params the cache holds, on the CPU; checked
        against this meta-model's fast params (names, shapes, dtypes)."""
        try:
            return self.packer.unpack(blob)
        except ValueError:
            raise ValueError(f"stored params do not fit meta-model {self.name!r}") from None

    def adapt_group(self, work: AdaptWork) -> Group:
        """Jobs that may share a batch: any steps and rates on the bmm path."""
        if self.batched.mixed:
            return (self.name, "adapt", work.lr is None)
        return (self.name, "adapt", work.steps, work.lr)

    # -- batches, on the worker thread --------------------------------------------------------
    def adapt(self, works: Sequence[AdaptWork]) -> list[Adapted]:
        start = time.perf_counter()
        x, y, w = self._support(works)
        result = self.batched.adapt(
            x.to(self.device),
            y.to(self.device),
            w.to(self.device),
            steps=[a.steps for a in works],
            lr=None if works[0].lr is None else [float(a.lr or 0.0) for a in works],
        )
        blobs = self.packer.pack(result.fast)
        before = result.loss_before.tolist()
        after = result.loss_after.tolist()
        ms = (time.perf_counter() - start) * 1000.0
        return [
            Adapted(blob, lb, la, work.steps, work.lr, ms)
            for blob, lb, la, work in zip(blobs, before, after, works, strict=True)
        ]

    def _support(self, works: Sequence[AdaptWork]) -> tuple[Tensor, Tensor, Tensor]:
        """The batch's support sets, zero-padded: x (B, K, *input_shape), y (B, K) class
        indices or (B, K, O), w (B, K) with 0 on padding; augmented per client first where
        the meta-model was meta-trained that way."""
        k = max(len(a.inputs) for a in works)
        x = self._tensor([a.inputs for a in works], k)  # (B, K, *input_shape)
        if self.classify:
            y = torch.tensor(_padded([a.targets for a in works], k, 0), dtype=torch.long)  # (B, K)
        else:
            fill = 0.0 if self.outputs == 1 else [0.0] * (self.outputs or 1)
            y = torch.tensor(_padded([a.targets for a in works], k, fill), dtype=torch.float32)
            y = y.reshape(len(works), k, -1)  # (B, K, O)
        sizes = [len(a.inputs) for a in works]
        w = (torch.arange(k) < torch.tensor(sizes)[:, None]).float()  # (B, K): 0 on padding
        if self.shifts is None:
            return x, y, w
        grown = [self.shifts.expand(x[i, :n], y[i, :n], w[i, :n]) for i, n in enumerate(sizes)]
        return pad_batch([g[0] for g in grown], [g[1] for g in grown])

    def predict(self, works: Sequence[PredictWork]) -> list[list[list[float]]]:
        q = max(len(p.inputs) for p in works)
        x = self._tensor([p.inputs for p in works], q)  # (B, Q, *input_shape)
        fast = self.packer.unflatten(torch.stack([p.fast for p in works]))  # (B, ...) per entry
        out = self.batched.predict(fast, x.to(self.device))  # (B, Q, O)
        rows: list[list[list[float]]] = out.cpu().tolist()
        return [r[: len(p.inputs)] for r, p in zip(rows, works, strict=True)]

    def _tensor(self, rows: list[Sequence[Sequence[float]]], length: int) -> Tensor:
        # B lists of (N_i, D) rows -> (B, N, *input_shape) float32, zero-padded to N = length
        x = torch.tensor(_padded(rows, length, [0.0] * self.width), dtype=torch.float32)
        return x.reshape(len(rows), length, *self.input_shape)

    def warm_up(self) -> None:
        """A tiny batch of two and one of one, so the first request pays no set-up."""
        inputs = [[0.0] * self.width]
        targets: list[Any] = [0] if self.classify else [0.0]
        if not self.classify and self.outputs != 1:
            targets = [[0.0] * (self.outputs or 1)]
        lr = None if self.inner.learned_lr != "none" else self.inner.lr
        works = [AdaptWork(inputs, targets, 1, lr)]
        for batch in (works * 2, works):
            done = self.adapt(batch)
        fast = self.fast_params(done[0].params).to(self.device)
        self.predict([PredictWork(inputs, fast, ("", "", 0), None)])


def _padded(lists: list[Sequence[Any]], length: int, fill: Any) -> list[Sequence[Any]]:
    """Each list padded with ``fill`` to ``length`` (the same object: torch only reads it)."""
    return [r if len(r) == length else [*r, *([fill] * (length - len(r)))] for r in lists]


@dataclass
class WorkerStats:
    adapt_batches: int = 0
    adapt_jobs: int = 0
    predict_batches: int = 0
    predict_jobs: int = 0
    failed_jobs: int = 0  # jobs whose run raised (after a retry alone)
    largest_batch: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # size -> batches


class DeviceWorker:
    """The thread that owns the device: takes batches, runs them, completes futures."""

    def __init__(
        self,
        batcher: Batcher,
        runners: dict[str, ModelRunner],
        cache: ParamsCache,
        *,
        threads: int,
    ) -> None:
        self.batcher = batcher
        self.runners = runners
        self.cache = cache
        self.threads = threads
        self.stats = WorkerStats()
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastadapt-device", daemon=True)
        self._error: BaseException | None = None

    def start(self) -> None:
        """Start the thread and wait for it to warm up every meta-model."""
        self._thread.start()
        self.ready.wait()
        if self._error is not None:
            raise RuntimeError("the device worker failed to start") from self._error

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            configure_threads(self.threads)
            for runner in self.runners.values():
                runner.warm_up()
        except BaseException as exc:  # reported by start()
            self._error = exc
            self.ready.set()
            return
        self.ready.set()
        while (batch := self.batcher.next_batch()) is not None:
            self._run_batch(batch)

    def _run_batch(self, batch: list[Job]) -> None:
        start = time.perf_counter()
        try:
            results = self._execute(batch)
        except Exception as exc:
            if len(batch) > 1:  # one bad job must not fail the others: run each alone
                for job in batch:
                    self._run_batch([job])
                return
            self.stats.failed_jobs += 1
            batch[0].future.set_exception(exc)
            return
        self._count(batch, time.perf_counter() - start)
        for job, result in zip(batch, results, strict=True):
            job.future.set_result(result)

    def _execute(self, batch: list[Job]) -> list[Any]:
        name, kind = batch[0].group[:2]
        runner = self.runners[str(name)]
        if kind == "adapt":
            return runner.adapt([job.payload for job in batch])
        works: list[PredictWork] = []
        for job in batch:
            work: PredictWork = job.payload
            if work.ticket is not None:  # loaded after a miss: onto the device, into the cache
                fast = work.fast.to(runner.device)
                self.cache.put(work.key, fast, work.ticket)
                work = PredictWork(work.inputs, fast, work.key, None)
            works.append(work)
        return runner.predict(works)

    def _count(self, batch: list[Job], seconds: float) -> None:
        stats, size = self.stats, len(batch)
        if batch[0].group[1] == "adapt":
            stats.adapt_batches += 1
            stats.adapt_jobs += size
        else:
            stats.predict_batches += 1
            stats.predict_jobs += size
        stats.largest_batch = max(stats.largest_batch, size)
        stats.batch_sizes[size] = stats.batch_sizes.get(size, 0) + 1
        per_job = seconds / size
        self.batcher.seconds_per_job = 0.9 * self.batcher.seconds_per_job + 0.1 * per_job
