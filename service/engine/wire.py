"""The engine process's wire format: frames of a JSON header and raw byte blobs.

A front process (``service.engine.remote``) and the engine process
(``service.engine.server``) talk over one Unix socket per front. Each frame is

    !II  (header length, blobs length)  then the header (UTF-8 JSON)  then the blobs

and the header's ``"blobs"`` lists each blob's length. Images and outputs travel as
float32 arrays (the engine computes in float32, so nothing is lost), parameters and
meta-models as their safetensors bytes; texts, labels and rows of numbers as JSON (a
float's JSON text reads back the same double). Nothing is pickled: a frame is parsed by
``json`` and ``numpy.frombuffer`` only, whoever sent it.

This module turns jobs, results and errors into frames and back; it knows nothing of
sockets beyond reading and writing whole frames.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from service.engine.batcher import DeadlineExceeded
from service.engine.cache import CacheStats
from service.engine.jobs import Adapted, AdaptJob, Inputs, Key, PredictJob
from service.engine.texts import EmbeddingStats, is_texts
from service.engine.worker import WorkerStats
from service.errors import Unavailable

PREFIX = struct.Struct("!II")
MAX_HEADER = 64 << 20  # a bulk request's texts; more is a corrupt stream, not a job
MAX_BLOBS = 1 << 30

Header = dict[str, Any]


class Frame:
    """One message: its header and its blobs (views of one received buffer)."""

    __slots__ = ("blobs", "header")

    def __init__(self, header: Header, blobs: Sequence[bytes | memoryview] = ()) -> None:
        self.header = header
        self.blobs = list(blobs)

    def encode(self) -> list[bytes | memoryview]:
        """The frame as buffers to write in order (``sendmsg`` / ``b"".join``)."""
        self.header["blobs"] = [len(b) for b in self.blobs]
        head = json.dumps(self.header, separators=(",", ":")).encode()
        total = sum(len(b) for b in self.blobs)
        return [PREFIX.pack(len(head), total), head, *self.blobs]

    def blob(self, index: int) -> memoryview:
        return memoryview(self.blobs[index])


def read_frame(stream: BinaryIO) -> Frame | None:
    """The next frame from ``stream``; None at a clean end of stream. A truncated or
    oversized frame raises ConnectionError: the peer died or is not one of ours."""
    prefix = stream.read(PREFIX.size)
    if not prefix:
        return None
    if len(prefix) < PREFIX.size:
        raise ConnectionError("the stream ended inside a frame")
    head_size, blobs_size = PREFIX.unpack(prefix)
    if head_size > MAX_HEADER or blobs_size > MAX_BLOBS:
        raise ConnectionError(f"a frame of {head_size} + {blobs_size} bytes")
    body = stream.read(head_size + blobs_size)
    if len(body) < head_size + blobs_size:
        raise ConnectionError("the stream ended inside a frame")
    return _parse(body, head_size)


class Outbox:
    """Frames written to one socket, in order: at once, except from its ``holder`` thread
    (a front's event loop; the engine process's reader of that front), whose frames wait
    for ``flush``: one write for every answer or job of a loop iteration, not one each.
    ``schedule`` (if any) is called when the first frame is held, to arrange the flush."""

    def __init__(self, sock: socket.socket, schedule: Callable[[], object] | None = None) -> None:
        self.sock = sock
        self.holder: int | None = None  # the thread whose frames wait for flush
        self.schedule = schedule
        self._held: list[bytes] = []
        self._lock = threading.Lock()

    def send(self, frame: Frame) -> None:
        """Write ``frame`` (OSError if the socket is gone), or hold it for ``flush``."""
        data = b"".join(frame.encode())
        with self._lock:
            if self.holder == threading.get_ident():
                if not self._held and self.schedule is not None:
                    self.schedule()
                self._held.append(data)
                return
            if self._held:  # after what the holder wrote before it
                data = b"".join([*self._held, data])
                self._held.clear()
            write_all(self.sock, data)

    def flush(self) -> None:
        with self._lock:
            if self._held:
                data = b"".join(self._held)
                self._held.clear()
                write_all(self.sock, data)


def write_all(sock: socket.socket, data: bytes) -> None:
    """``sock.sendall`` that also works on a non-blocking socket (an event loop's reader,
    uvloop's at least, makes the socket non-blocking): waits while its buffer is full."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            select.select([], [sock], [], 1.0)


class FrameReader:
    """Frames out of a byte stream fed as it arrives (an event loop's reads)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """The frames ``data`` completed (ConnectionError as ``read_frame``)."""
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        at = 0
        while len(buffer) - at >= PREFIX.size:
            head_size, blobs_size = PREFIX.unpack_from(buffer, at)
            if head_size > MAX_HEADER or blobs_size > MAX_BLOBS:
                raise ConnectionError(f"a frame of {head_size} + {blobs_size} bytes")
            end = at + PREFIX.size + head_size + blobs_size
            if len(buffer) < end:
                break
            frames.append(_parse(bytes(buffer[at + PREFIX.size : end]), head_size))
            at = end
        del buffer[:at]
        return frames


def _parse(body: bytes, head_size: int) -> Frame:
    view = memoryview(body)
    header = json.loads(view[:head_size].tobytes())
    blobs: list[bytes | memoryview] = []
    at = head_size
    for size in header.get("blobs", ()):
        blobs.append(view[at : at + size])
        at += size
    if at != len(body):
        raise ConnectionError("a frame's blob lengths do not add up")
    return Frame(header, blobs)


# -- inputs and outputs ------------------------------------------------------------------------
def put_inputs(inputs: Inputs, blobs: list[bytes | memoryview]) -> Header:
    """``inputs`` as a header part; numbers appended to ``blobs`` as float32."""
    if is_texts(inputs):
        return {"texts": list(inputs)}
    if isinstance(inputs, list):  # rows of numbers: JSON decodes them into the engine's
        return {"rows": inputs}  # cheapest form (one torch.tensor call per batch)
    if isinstance(inputs, Tensor):
        array = inputs.detach().to("cpu", torch.float32).contiguous().numpy()
    else:
        array = np.asarray(inputs, dtype=np.float32)
    blobs.append(array.tobytes())
    return {"shape": list(array.shape), "blob": len(blobs) - 1}


def get_inputs(part: Header, frame: Frame) -> Inputs:
    """What ``put_inputs`` wrote: texts (a tuple of str), rows (lists of floats) or an
    (N, ...) float32 tensor."""
    if "texts" in part:
        return tuple(str(t) for t in part["texts"])
    if "rows" in part:
        rows: list[list[float]] = part["rows"]
        return rows
    array = np.frombuffer(frame.blob(part["blob"]), dtype=np.float32)
    return torch.from_numpy(array.reshape(part["shape"]).copy())


def put_rows(rows: Sequence[Sequence[float]], blobs: list[bytes | memoryview]) -> Header:
    """A prediction's outputs (Q, O) as float32 (the engine computed them in float32)."""
    array = np.asarray(rows, dtype=np.float32)
    blobs.append(array.tobytes())
    return {"shape": list(array.shape), "blob": len(blobs) - 1}


def get_rows(part: Header, frame: Frame) -> list[list[float]]:
    array = np.frombuffer(frame.blob(part["blob"]), dtype=np.float32).reshape(part["shape"])
    rows: list[list[float]] = array.tolist()
    return rows


# -- jobs ---------------------------------------------------------------------------------------
def adapt_job(job: AdaptJob, blobs: list[bytes | memoryview]) -> Header:
    return {
        "meta_model": job.meta_model,
        "inputs": put_inputs(job.inputs, blobs),
        "targets": list(job.targets),
        "steps": job.steps,
        "lr": job.lr,
        "tenant": job.tenant,
    }


def read_adapt_job(part: Header, frame: Frame) -> AdaptJob:
    return AdaptJob(
        str(part["meta_model"]),
        get_inputs(part["inputs"], frame),
        part["targets"],
        int(part["steps"]),
        None if part["lr"] is None else float(part["lr"]),
        tenant=str(part.get("tenant", "")),
    )


def predict_job(job: PredictJob, blobs: list[bytes | memoryview]) -> Header:
    part: Header = {
        "meta_model": job.meta_model,
        "key": list(job.key),
        "inputs": put_inputs(job.inputs, blobs),
        "ticket": job.ticket,
    }
    if job.params is not None:
        blobs.append(job.params)
        part["params"] = len(blobs) - 1
    return part


def read_predict_job(part: Header, frame: Frame) -> PredictJob:
    params = part.get("params")
    return PredictJob(
        str(part["meta_model"]),
        key_of(part["key"]),
        get_inputs(part["inputs"], frame),
        None if params is None else frame.blob(params).tobytes(),
        ticket=part.get("ticket"),
    )


def key_of(value: Sequence[Any]) -> Key:
    tenant, client, uid = (str(v) for v in value)
    return (tenant, client, uid)


# -- results -------------------------------------------------------------------------------------
def adapted(result: Adapted, blobs: list[bytes | memoryview]) -> Header:
    blobs.append(result.params)
    return {
        "params": len(blobs) - 1,
        "loss_before": result.loss_before,
        "loss_after": result.loss_after,
        "steps": result.steps,
        "lr": result.lr,
        "adapt_ms": result.adapt_ms,
        "meta_model": result.meta_model,
        "ticket": result.ticket,
    }


def read_adapted(part: Header, frame: Frame) -> Adapted:
    return Adapted(
        frame.blob(part["params"]).tobytes(),
        float(part["loss_before"]),
        float(part["loss_after"]),
        int(part["steps"]),
        part["lr"],
        float(part["adapt_ms"]),
        str(part["meta_model"]),
        int(part["ticket"]),
    )


# -- errors ----------------------------------------------------------------------------------------
# what may fail a job, by the name on the wire; anything else arrives as a RuntimeError
ERRORS: dict[str, type[Exception]] = {"KeyError": KeyError, "ValueError": ValueError}
RETRYABLE: dict[str, type[Unavailable]] = {
    "Unavailable": Unavailable,
    "DeadlineExceeded": DeadlineExceeded,
}


def error(exc: BaseException) -> Header:
    """A job's failure as a header part (its type and message; never a traceback)."""
    if isinstance(exc, Unavailable):
        name = "DeadlineExceeded" if isinstance(exc, DeadlineExceeded) else "Unavailable"
        return {"type": name, "message": exc.message, "retry_after": exc.retry_after}
    name = next((n for n, t in ERRORS.items() if type(exc) is t), "RuntimeError")
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return {"type": name, "message": str(message)}


def read_error(part: Header) -> Exception:
    retryable = RETRYABLE.get(str(part["type"]))
    if retryable is not None:
        return retryable(str(part["message"]), float(part.get("retry_after") or 1.0))
    kind = ERRORS.get(str(part["type"]), RuntimeError)
    return kind(str(part["message"]))


# -- stats -----------------------------------------------------------------------------------------
def stats(value: Any) -> Header:
    """``EngineStats`` as JSON (batch sizes' keys become strings)."""
    out: Header = asdict(value)
    return out


def read_stats(part: Header) -> dict[str, Any]:
    """The parts of ``EngineStats``, rebuilt by ``service.engine.remote``."""
    worker = dict(part["worker"])
    worker["batch_sizes"] = {
        kind: {int(size): n for size, n in sizes.items()}
        for kind, sizes in worker["batch_sizes"].items()
    }
    return {
        "worker": WorkerStats(**worker),
        "cache": CacheStats(**part["cache"]),
        "queued": int(part["queued"]),
        "rejected": int(part["rejected"]),
        "expired": int(part["expired"]),
        "texts": EmbeddingStats(**part["texts"]),
    }
