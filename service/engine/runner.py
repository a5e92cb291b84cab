"""One meta-model on the device: batched adapt and predict, params to bytes and back.

``ModelRunner`` runs on the device worker's thread. It holds its own copy of the
meta-model, moved to the device (so the caller's ``MetaModel`` is never moved or
mutated), and uses that copy's learner: the net, loss and inner-loop settings the
meta-model was built with.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from models.checkpoint import MetaModel
from models.encoder import EncoderSpec
from models.kernels import BatchedLearner, KernelPath
from models.params import BytesPacker
from service.engine import batches
from service.engine.batcher import Group
from service.engine.cache import FastParams
from service.engine.jobs import Adapted, AdaptJob, Inputs, Key

GATHER_BUFFER_BYTES = 64 << 20  # most a runner keeps to stack predictions' params into
# fast params up to this many predict one client in NumPy on the CPU: past it, the matrix
# products dominate and NumPy's BLAS may start threads of its own beside torch's
NUMPY_MAX = 16_384


class AdaptWork(NamedTuple):  # a tuple: built per adaptation, cheaper than a dataclass
    job: AdaptJob
    ticket: int  # the cache's epoch when the job was submitted


class PredictWork(NamedTuple):  # a tuple: built per prediction, cheaper than a dataclass
    inputs: Inputs  # (Q, D) rows or (Q, *input_shape)
    fast: FastParams  # the client's params: on the device (a hit) or the CPU (loaded)
    key: Key
    ticket: int | None  # set when loaded after a miss: cache it under this ticket


class ModelRunner:
    def __init__(
        self, meta_model: MetaModel, device: torch.device, path: KernelPath = "auto"
    ) -> None:
        model = copy.deepcopy(meta_model).to(device)  # buffers (Standardize) included
        self.name = model.name
        self.version = model.version  # the engine's key for this runner and its jobs
        self.device = device
        self.on_cpu = device.type == "cpu"
        self._buffer: Tensor | None = None  # (B, P) the last gather's, reused (_gather)
        config = model.config
        self.input_shape = config.input_shape
        self.classify = config.kind == "classification"
        # a text meta-model's pinned encoder: its inputs arrive as texts, encoded first
        encoder = config.task.get("encoder") if config.task.get("input") == "text" else None
        self.encoder = None if encoder is None else EncoderSpec.from_dict(encoder)
        self.inner = config.inner
        self.shifts = model.support_shifts  # image support sets grow as meta-trained
        learner = model.learner
        self.batched = BatchedLearner(learner, model.params, model.lrs, path)
        self.packer = BytesPacker(learner.split(model.params)[0])
        if self.packer.dtype is None:
            raise ValueError(f"meta-model {self.name!r}: fast params of mixed dtypes")
        head = learner.net.get_submodule("head")
        self.outputs = head.out_features if isinstance(head, nn.Linear) else None
        # a one-client forward (the bmm path): each fast layer's (weight, bias), as
        # indices into the packer's order, and every entry's size and shape
        kernel = self.batched.kernel
        order = {name: i for i, name in enumerate(self.packer.order)}
        self.one: list[int] | None = None
        if kernel is not None and set(order) == set(kernel.names()):
            self.one = [order[name] for name in kernel.names()]
        self.kernel = kernel  # the bmm path's (None: vmap), for predict_one
        # a small plain MLP on the CPU predicts one client in NumPy (predict_numpy)
        self.numpy = (
            self.one is not None
            and kernel is not None
            and kernel.plain
            and self.on_cpu
            and len(self.input_shape) == 1
            and sum(math.prod(self.packer.shapes[n]) for n in self.packer.order) <= NUMPY_MAX
        )
        self.frozen = self.batched.frozen
        self.sizes = [math.prod(self.packer.shapes[n]) for n in self.packer.order]
        self.shapes = [self.packer.shapes[n] for n in self.packer.order]

    def view(self, flat: Tensor) -> FastParams:
        """Flat (P,) params with their one-client layout (views, no copy)."""
        if self.one is None:
            return FastParams(flat)
        entries = [
            t.view(shape) for t, shape in zip(flat.split(self.sizes), self.shapes, strict=True)
        ]
        layers = tuple(entries[i] for i in self.one)
        if not self.numpy:
            return FastParams(flat, layers)
        return FastParams(flat, layers, tuple(t.numpy() for t in layers))

    def fast_params(self, blob: bytes) -> Tensor:
        """Stored safetensors -> the flat (P,) params the cache holds, on the CPU; checked
        against this meta-model's fast params (names, shapes, dtypes)."""
        try:
            return self.packer.unpack(blob)
        except ValueError:
            raise ValueError(f"stored params do not fit meta-model {self.name!r}") from None

    def adapt_group(self, job: AdaptJob) -> Group:
        """Jobs that may share a batch: any steps and rates on the bmm path."""
        if self.batched.mixed:
            return (self.version, "adapt", job.lr is None)
        return (self.version, "adapt", job.steps, job.lr)

    # -- batches, on the worker thread --------------------------------------------------------
    def adapt(self, works: Sequence[AdaptWork]) -> list[Adapted]:
        start = time.perf_counter()
        jobs = [work.job for work in works]
        x, y, w = batches.support(
            jobs,
            self.input_shape,
            classify=self.classify,
            outputs=self.outputs,
            shifts=self.shifts,
        )
        result = self.batched.adapt(
            x.to(self.device),
            y.to(self.device),
            w.to(self.device),
            steps=[job.steps for job in jobs],
            lr=None if jobs[0].lr is None else [float(job.lr or 0.0) for job in jobs],
        )
        blobs = self.packer.pack(result.fast)
        before = result.loss_before.tolist()
        after = result.loss_after.tolist()
        ms = (time.perf_counter() - start) * 1000.0
        return [
            Adapted(blob, lb, la, work.job.steps, work.job.lr, ms, self.version, work.ticket)
            for blob, lb, la, work in zip(blobs, before, after, works, strict=True)
        ]

    def predict(self, works: Sequence[PredictWork]) -> list[list[list[float]]]:
        """Each work's outputs (Q_i, O): one gathered forward over the clients' stacked
        params, queries zero-padded to the longest (a row's outputs depend on that row
        only); a lone client with its layout takes a plain forward, no stacking."""
        if len(works) == 1 and works[0].fast.layers:
            return [self.predict_one(works[0])]
        q = max(len(p.inputs) for p in works)
        x = batches.inputs([p.inputs for p in works], q, self.input_shape)  # (B, Q, *shape)
        flat = self._gather([p.fast.flat for p in works])  # (B, P)
        fast = self.packer.unflatten(flat)  # (B, ...) per entry, views
        out = self.batched.predict(fast, x.to(self.device))  # (B, Q, O)
        rows: list[list[list[float]]] = out.cpu().tolist()
        return [
            r if len(r) == len(p.inputs) else r[: len(p.inputs)]
            for r, p in zip(rows, works, strict=True)
        ]

    def predict_one(self, work: PredictWork) -> list[list[float]]:
        """One client whose params have their layout (``view``): plain linear calls, or
        NumPy's for a small net on the CPU."""
        x = work.inputs
        if work.fast.arrays and not isinstance(x, Tensor):
            assert self.kernel is not None
            # as torch does, silently: an input beyond float32 becomes inf and the outputs
            # may not be finite, which the use case answers with a 422 naming the inputs
            with np.errstate(all="ignore"):
                rows = np.asarray(x, dtype=np.float32)  # (Q, D)
                outputs = self.kernel.predict_numpy(work.fast.arrays, rows)
            numpy_out: list[list[float]] = outputs.tolist()
            return numpy_out
        if not isinstance(x, Tensor):
            x = torch.tensor(x, dtype=torch.float32)  # (Q, D)
        if len(self.input_shape) > 1:
            x = x.reshape(len(x), *self.input_shape)  # (Q, *shape)
        if not self.on_cpu:
            x = x.to(self.device)
        assert self.kernel is not None  # a layout (``self.one``) means the bmm path
        out: list[list[float]] = self.kernel.predict_one(self.frozen, work.fast.layers, x).tolist()
        return out  # (Q, O)

    def _gather(self, flats: list[Tensor]) -> Tensor:
        """The clients' flat params stacked (B, P), into a buffer kept for the next batch:
        a fresh multi-megabyte tensor per batch page-faults, which cost more than the
        forward pass. Callers hold the device (the worker's lock), so one buffer serves."""
        b, p = len(flats), len(flats[0])
        if b * p * flats[0].element_size() > GATHER_BUFFER_BYTES:
            return torch.stack(flats)
        if self._buffer is None or len(self._buffer) < b or self._buffer.dtype != flats[0].dtype:
            self._buffer = flats[0].new_empty(max(b, 16), p)
        return torch.stack(flats, out=self._buffer[:b])

    def warm_up(self) -> None:
        """A tiny batch of two and one of one, so the first request pays no set-up."""
        inputs = [[0.0] * math.prod(self.input_shape)]
        targets: list[Any] = [0] if self.classify else [0.0]
        if not self.classify and self.outputs != 1:
            targets = [[0.0] * (self.outputs or 1)]
        lr = None if self.inner.learned_lr != "none" else self.inner.lr
        works = [AdaptWork(AdaptJob(self.version, inputs, targets, 1, lr), 0)]
        for batch in (works * 2, works):
            done = self.adapt(batch)
        fast = self.view(self.fast_params(done[0].params).to(self.device))
        self.predict([PredictWork(inputs, fast, ("", "", ""), None)])
        self.predict([PredictWork(inputs, fast, ("", "", ""), None)] * 2)
