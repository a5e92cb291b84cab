"""The engine's interface in a front process, served by an engine process over a socket.

``fastadapt serve --workers N`` runs N HTTP front processes and one engine process that
owns the device (``service.engine.server``). Each front holds a ``RemoteEngine``: the
same calls as ``Engine`` (validated jobs in, futures out), sent as frames
(``service.engine.wire``) over one Unix socket and answered by the engine process, which
batches the jobs of every front together. Its params and embedding caches are the engine
process's: one per device, whichever front stored or asked.

What differs from an in-process engine, and why:

- A prediction submitted from an event loop (``on_loop``) is only sent: its future
  fails with ``NotCached`` if the engine process holds no params for it, and the caller
  then reads them in a thread. From a thread, ``submit_predict`` waits for the answer, so
  a miss is raised there as in-process.
- Meta-models travel once per connection, as safetensors and JSON, before the first job
  that needs one; the front remembers every version it was given, so an engine process
  that restarted is sent them again.
- While the engine process is away (killed, restarting), every submit and every job in
  flight fails with ``Unavailable`` (503 with Retry-After); a thread reconnects by itself,
  and ``ready`` says whether it is connected (``/readyz``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, BinaryIO, TypeVar, cast

from models.checkpoint import MetaModel
from service.engine import wire
from service.engine.core import EngineConfig, EngineStats
from service.engine.jobs import Adapted, AdaptJob, Key, NotCached, PredictJob
from service.errors import Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
RECONNECT_S = (0.05, 0.25)  # pause before reconnecting: doubles per failure, capped
AWAY = "the engine process is not connected (restarting?); retry"
Decode = Callable[[wire.Header, wire.Frame], Any]


class _Connection:
    """One connection to the engine process: writes under a lock, answers by id."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.frames = wire.FrameReader()
        self.attached = threading.Event()  # its answers are read on the loop
        self.dropped = threading.Event()
        self.outbox = wire.Outbox(sock)  # on the loop, a loop iteration's jobs in one write
        self.ids = itertools.count(1)
        # id -> (future, how to read its answer, the job: a miss raises NotCached(job))
        self.pending: dict[int, tuple[Future[Any], Decode, Any]] = {}
        self.sent: set[str] = set()  # meta-model versions the engine process was given
        self.closed = False

    def send(self, frame: wire.Frame) -> None:
        self.outbox.send(frame)

    def fail_all(self, error: Exception) -> None:
        self.closed = True  # before the sweep: a call that registers after it sees this
        for key in list(self.pending):
            entry = self.pending.pop(key, None)
            if entry is not None and not entry[0].done():
                with contextlib.suppress(Exception):
                    entry[0].set_exception(error)


class RemoteEngine:
    """``Engine``'s calls, answered by the engine process listening on ``path``."""

    def __init__(
        self,
        meta_models: Mapping[str, MetaModel],
        settings: object,
        path: str,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """Answers are read on ``loop`` (the front's event loop, which awaits most of them:
        no thread hand-off between an answer and its request); without one, on a loop in
        a thread of this engine's own."""
        self.config = EngineConfig.of(settings)
        self.path = path
        self.device = "engine process"  # the engine process's device, once connected
        self._models: dict[str, MetaModel] = {m.version: m for m in meta_models.values()}
        self._artifacts: dict[str, tuple[str, bytes]] = {}  # version -> (config, weights)
        self._conn: _Connection | None = None
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop = loop
        self._own_loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None  # the loop's thread, once attached
        self.disconnects = 0  # times a connection was lost (counted for tests and logs)

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background, and reconnect whenever the connection drops."""
        if self._thread is not None:
            return
        loop = self._loop
        if loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(
                target=loop.run_forever, name="fastadapt-engine-answers", daemon=True
            ).start()
            self._own_loop = loop
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="fastadapt-engine-link", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until connected (or ``timeout``); whether it is."""
        return self._connected.wait(timeout)

    @property
    def ready(self) -> bool:
        """Connected to the engine process now."""
        return self._connected.is_set()

    def stop(self, timeout: float | None = None) -> None:
        """Close the connection; jobs in flight fail with ``Unavailable``. The engine
        process goes on serving the other fronts."""
        self._stopping.set()
        conn = self._conn
        if conn is not None:
            self._drop(conn)
        if self._thread is not None:
            self._thread.join(timeout)
        if self._own_loop is not None:
            self._own_loop.call_soon_threadsafe(self._own_loop.stop)

    def _run(self) -> None:
        """Connect, wait for the connection to drop, reconnect; until ``stop``."""
        failures = 0
        while not self._stopping.is_set():
            try:
                conn = self._connect()
            except (OSError, ValueError) as exc:
                failures += 1
                if failures == 1 or failures % 100 == 0:
                    log.warning("engine process at %s: %s; retrying", self.path, exc)
                first, most = RECONNECT_S
                self._stopping.wait(min(most, first * 2 ** min(failures - 1, 10)))
                continue
            failures = 0
            conn.dropped.wait()
            if not self._stopping.is_set():
                log.warning("lost the engine process at %s; reconnecting", self.path)

    def _connect(self) -> _Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
            conn = _Connection(sock)
            conn.send(wire.Frame({"op": "hello", "id": 0}))
            hello = wire.read_frame(cast(BinaryIO, sock.makefile("rb")))  # nothing follows it
            if hello is None or "ok" not in hello.header:
                raise ConnectionError("the engine process did not answer its hello")
            self.device = str(hello.header["ok"]["device"])
            for version in list(self._models):  # warm: what this front serves is loaded now
                self._send_model(conn, version)
        except BaseException:
            sock.close()
            raise
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._attach, conn)
        conn.attached.wait()
        self._conn = conn
        self._connected.set()
        log.info("connected to the engine process at %s (device %s)", self.path, self.device)
        return conn

    def _attach(self, conn: _Connection) -> None:
        """On the loop: read answers as they arrive."""
        loop = self._loop
        assert loop is not None
        self._loop_thread = conn.outbox.holder = threading.get_ident()
        conn.outbox.schedule = lambda: loop.call_soon(self._flush, conn)
        loop.add_reader(conn.sock.fileno(), self._readable, conn)
        conn.attached.set()

    def _flush(self, conn: _Connection) -> None:
        """On the loop, after the iteration that sent them: the jobs it held, written."""
        try:
            conn.outbox.flush()
        except OSError:
            self._drop(conn)

    def _readable(self, conn: _Connection) -> None:
        """On the loop: the answers that arrived (the socket is readable: no wait)."""
        try:
            data = conn.sock.recv(1 << 18)
            frames = conn.frames.feed(data) if data else None
        except (OSError, ValueError) as exc:
            if not self._stopping.is_set():
                log.error("the engine process connection failed: %s", exc)
            frames = None
        if frames is None:
            self._drop(conn)
            return
        for frame in frames:
            self._answer(conn, frame)

    def _drop(self, conn: _Connection) -> None:
        """The connection is gone: every job in flight fails (503), reconnect."""
        if conn.dropped.is_set():
            return
        self._connected.clear()
        if self._conn is conn:
            self._conn = None
        self.disconnects += 1
        conn.closed = True
        if self._loop is not None and conn.attached.is_set():
            with contextlib.suppress(Exception):
                self._loop.call_soon_threadsafe(self._loop.remove_reader, conn.sock.fileno())
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
        conn.fail_all(Unavailable("the engine process stopped while running this; retry", 1.0))
        conn.dropped.set()

    def _answer(self, conn: _Connection, frame: wire.Frame) -> None:
        header = frame.header
        entry = conn.pending.pop(int(header.get("id", -1)), None)
        if entry is None:  # the caller gave up (timed out)
            return
        future, decode, job = entry
        if future.done():
            return
        err = header.get("error")
        try:
            if err is None:
                future.set_result(decode(header["ok"], frame))
            elif err["type"] == "NotCached":
                future.set_exception(NotCached(job, int(err["ticket"])))
            else:
                future.set_exception(wire.read_error(err))
        except Exception as exc:  # a malformed answer fails its job, not the link
            with contextlib.suppress(Exception):
                future.set_exception(RuntimeError(f"a malformed engine answer: {exc}"))

    # -- sending -------------------------------------------------------------------------------
    def _link(self) -> _Connection:
        conn = self._conn
        if conn is None or conn.closed:
            raise Unavailable(AWAY, 1.0)
        return conn

    def _send_model(self, conn: _Connection, version: str) -> None:
        model = self._models.get(version)
        if model is None or version in conn.sent:
            return
        artifact = self._artifacts.get(version)
        if artifact is None:
            artifact = self._artifacts[version] = (model.config.to_json(), model.weights_bytes())
        config, weights = artifact
        conn.send(wire.Frame({"op": "load", "version": version, "config": config}, [weights]))
        conn.sent.add(version)

    def _call(
        self, op: str, jobs: Sequence[Any], put: Callable[..., wire.Header], decode: Decode
    ) -> list[Future[Any]]:
        """Send ``jobs`` in one frame (their meta-models first, where this connection has
        not sent them): a future per job, answered by the engine process."""
        conn = self._link()
        for job in jobs:
            model = getattr(job, "model", None)
            if model is not None and job.meta_model not in self._models:
                self._models[job.meta_model] = model
        blobs: list[bytes | memoryview] = []
        parts = [put(job, blobs) for job in jobs]
        ids = [next(conn.ids) for _ in jobs]
        futures: list[Future[Any]] = [Future() for _ in jobs]
        for i, future, job in zip(ids, futures, jobs, strict=True):
            conn.pending[i] = (future, decode, job)
        try:
            for version in {job.meta_model for job in jobs}:
                if version not in conn.sent:
                    self._send_model(conn, version)
            conn.send(wire.Frame({"op": op, "ids": ids, "jobs": parts}, blobs))
        except OSError:
            self._drop(conn)
        if conn.closed:  # the link dropped: the reader's sweep may have run before we registered
            for i in ids:
                conn.pending.pop(i, None)
            raise Unavailable(AWAY, 1.0)
        return futures

    def _request(self, op: str, fields: wire.Header | None = None) -> Any:
        """A request answered at once (stats, a ticket): its answer's ``ok`` part."""
        conn = self._link()
        i = next(conn.ids)
        future: Future[Any] = Future()
        conn.pending[i] = (future, lambda ok, frame: ok, None)
        try:
            conn.send(wire.Frame({"op": op, "id": i, **(fields or {})}))
        except OSError:
            self._drop(conn)
            raise Unavailable(AWAY, 1.0) from None
        return self._wait(future).result()

    def _tell(self, op: str, fields: wire.Header, blobs: Sequence[bytes] = ()) -> bool:
        """A message without an answer; False if the engine process is away."""
        conn = self._conn
        if conn is None or conn.closed:
            return False
        try:
            conn.send(wire.Frame({"op": op, **fields}, blobs))
        except OSError:
            self._drop(conn)
            return False
        return True

    def _wait(self, future: Future[T]) -> Future[T]:
        """``future``, done (its result or exception), or ``Unavailable`` when overdue."""
        limit = self.config.job_timeout_s + 5.0
        if threading.get_ident() == self._loop_thread:  # it would wait for itself
            raise RuntimeError("a RemoteEngine call that waits, made on its event loop")
        try:
            future.exception(timeout=limit)
        except TimeoutError:
            future.cancel()
            raise Unavailable(f"the engine did not answer within {limit:g} s", 1.0) from None
        return future

    # -- jobs ----------------------------------------------------------------------------------
    def submit_adapt(self, job: AdaptJob) -> Future[Adapted]:
        return self._call("adapt", [job], wire.adapt_job, wire.read_adapted)[0]

    def submit_adapt_many(self, jobs: Sequence[AdaptJob]) -> list[Future[Adapted]]:
        if not jobs:
            return []
        return self._call("adapt", jobs, wire.adapt_job, wire.read_adapted)

    def submit_predict(self, job: PredictJob, on_loop: bool = False) -> Future[list[list[float]]]:
        """Outputs (Q, O) of ``job``. From a thread: waits for the answer and raises
        ``NotCached`` if the engine process holds no params for it (submit
        ``miss.loaded(params)``). With ``on_loop``: sent only, and the future itself fails
        with ``NotCached`` on a miss."""
        future = self._call("predict", [job], wire.predict_job, wire.get_rows)[0]
        if on_loop:
            return future
        miss = self._wait(future).exception()
        if isinstance(miss, NotCached):
            raise miss
        return future

    def submit_predict_many(self, jobs: Sequence[PredictJob]) -> list[Future[list[list[float]]]]:
        """One future per job, each done: a miss fails its own with ``NotCached``."""
        if not jobs:
            return []
        futures = self._call("predict", jobs, wire.predict_job, wire.get_rows)
        return [self._wait(f) for f in futures]

    def stored(self, adapted: Adapted, key: Key) -> bool:
        """Tell the engine process to cache ``adapted``'s params as version ``key``."""
        fields = {"key": list(key), "meta_model": adapted.meta_model, "ticket": adapted.ticket}
        return self._tell("stored", fields, [adapted.params])

    def ticket(self) -> int:
        try:
            return int(self._request("ticket")["ticket"])
        except Unavailable:
            return -1  # a new engine process: its cache holds nothing of this client

    def forget(self, tenant_id: str, client_id: str) -> None:
        self._tell("forget", {"tenant": tenant_id, "client": client_id})

    def loaded(self) -> list[str]:
        return list(self._models)

    def release(self, version: str) -> None:
        self._models.pop(version, None)
        self._artifacts.pop(version, None)
        self._tell("release", {"version": version})

    def stats(self) -> EngineStats:
        """The engine process's counts (``Unavailable`` while it is away)."""
        return EngineStats(**wire.read_stats(self._request("stats")))
