"""The engine process's side of the socket: frames in, the engine's calls, answers out.

``EngineServer`` listens on a Unix socket and serves every front process that connects
(``service.engine.remote``) from one ``Engine``: jobs of all fronts share its queue, its
batches and its caches. A thread per connection reads frames in order and submits them;
each answer is written when its future completes, by whichever thread completes it (the
device worker, or this one when the engine ran the job at once). A meta-model's ``load``
arrives before the first job that needs it; a loader thread loads it, and jobs of it
wait for that while jobs of other versions go on.

A front that disconnects only loses its own answers; the versions it alone had loaded
are released. ``shutdown`` stops taking connections, lets the engine finish what it holds
(their answers are written), then closes every connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from models.checkpoint import MetaModel
from service.engine import wire
from service.engine.core import Engine
from service.engine.jobs import Adapted, NotCached

log = logging.getLogger(__name__)
LOADERS = 4  # meta-model versions loaded at once


class _Front:
    """One connected front process."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # answers the reader thread makes (jobs run at once) wait for the end of what it
        # read, and go in one write; the device worker's go at once
        self.outbox = wire.Outbox(sock)
        self.versions: set[str] = set()  # meta-model versions it loaded
        self.open = True

    def send(self, frame: wire.Frame) -> None:
        if not self.open:
            return
        try:
            self.outbox.send(frame)
        except OSError:  # it went away: its reader thread cleans up
            self.open = False

    def flush(self) -> None:
        try:
            self.outbox.flush()
        except OSError:
            self.open = False


class EngineServer:
    def __init__(self, engine: Engine, path: str) -> None:
        self.engine = engine
        self.path = path
        self._fronts: list[_Front] = []
        self._lock = threading.Lock()  # _fronts and their versions
        # meta-model versions loading or loaded, by version: loader threads load them
        # while jobs of versions already loaded go on, and a small one need not wait for
        # a big one (a text meta-model's encoder takes seconds to load)
        self._loads: dict[str, Future[None]] = {}
        self._loader = ThreadPoolExecutor(LOADERS, thread_name_prefix="fastadapt-engine-load")
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None

    def serve_forever(self) -> None:
        """Accept fronts until ``shutdown``."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        os.chmod(self.path, 0o600)  # this user's processes only
        listener.listen(64)
        listener.settimeout(0.2)
        self._listener = listener
        log.info("engine process %d on %s, device %s", os.getpid(), self.path, self.engine.device)
        while not self._stopping.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            sock.settimeout(None)
            front = _Front(sock)
            with self._lock:
                self._fronts.append(front)
            threading.Thread(
                target=self._serve, args=(front,), name="fastadapt-engine-front", daemon=True
            ).start()

    def stop_accepting(self) -> None:
        """``serve_forever`` returns within its poll (safe from a signal handler)."""
        self._stopping.set()

    def shutdown(self, timeout: float | None = None) -> None:
        """No new fronts; the engine finishes its queue (at most ``timeout``), its answers
        are written; then every connection closes."""
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._loader.shutdown(wait=False, cancel_futures=True)
        self.engine.stop(timeout)
        with self._lock:
            fronts = list(self._fronts)
        for front in fronts:
            front.open = False
            with contextlib.suppress(OSError):
                front.sock.shutdown(socket.SHUT_RDWR)

    # -- one front -------------------------------------------------------------------------------
    def _serve(self, front: _Front) -> None:
        reader = wire.FrameReader()
        front.outbox.holder = threading.get_ident()
        try:
            while data := front.sock.recv(1 << 18):
                for frame in reader.feed(data):
                    self._dispatch(front, frame)
                front.flush()
        except OSError as exc:
            if not self._stopping.is_set():
                log.warning("a front process's connection failed: %s", exc)
        except Exception:  # a frame that is not ours: this front's link ends, no other's
            log.exception("a front process sent a frame that could not be read")
        finally:
            self._gone(front)

    def _gone(self, front: _Front) -> None:
        front.open = False
        with contextlib.suppress(OSError):
            front.sock.close()
        with self._lock:
            if front in self._fronts:
                self._fronts.remove(front)
            held = set().union(*(f.versions for f in self._fronts))
            for version in front.versions - held:
                self._loads.pop(version, None)
        for version in front.versions - held:  # nobody serves it any more
            self.engine.release(version)

    def _dispatch(self, front: _Front, frame: wire.Frame) -> None:
        header = frame.header
        op = header.get("op")
        if op == "adapt":
            jobs = [wire.read_adapt_job(part, frame) for part in header["jobs"]]
            self._once_loaded(
                {job.meta_model for job in jobs},
                lambda: self._submit(front, header["ids"], lambda: self._adapt(jobs), wire.adapted),
            )
        elif op == "predict":
            predictions = [wire.read_predict_job(part, frame) for part in header["jobs"]]
            self._once_loaded(
                {job.meta_model for job in predictions},
                lambda: self._submit(
                    front, header["ids"], lambda: self._predict(predictions), wire.put_rows
                ),
            )
        elif op == "stored":
            adapted = Adapted(
                frame.blob(0).tobytes(), 0.0, 0.0, 0, None, 0.0,
                str(header["meta_model"]), int(header["ticket"]),
            )  # fmt: skip
            self.engine.stored(adapted, wire.key_of(header["key"]))
        elif op == "load":
            self._load(front, header, frame)
        elif op == "forget":
            self.engine.forget(str(header["tenant"]), str(header["client"]))
        elif op == "release":
            self._release(front, str(header["version"]))
        elif op == "ticket":
            front.send(wire.Frame({"id": header["id"], "ok": {"ticket": self.engine.ticket()}}))
        elif op == "stats":
            front.send(wire.Frame({"id": header["id"], "ok": wire.stats(self.engine.stats())}))
        elif op == "hello":
            ok = {"device": str(self.engine.device), "pid": os.getpid()}
            front.send(wire.Frame({"id": header["id"], "ok": ok}))
        else:
            raise ValueError(f"an unknown op {op!r}")

    def _adapt(self, jobs: Sequence[Any]) -> list[Future[Any]]:
        if len(jobs) == 1:
            return [self.engine.submit_adapt(jobs[0])]
        return list(self.engine.submit_adapt_many(jobs))

    def _predict(self, jobs: Sequence[Any]) -> list[Future[Any]]:
        if len(jobs) == 1:
            try:
                return [self.engine.submit_predict(jobs[0])]
            except NotCached as miss:
                failed: Future[Any] = Future()
                failed.set_exception(miss)
                return [failed]
        return list(self.engine.submit_predict_many(jobs))

    def _submit(
        self,
        front: _Front,
        ids: Sequence[int],
        submit: Callable[[], list[Future[Any]]],
        put: Callable[[Any, list[bytes | memoryview]], wire.Header],
    ) -> None:
        """Submit, then answer each id as its future completes (a refusal at once)."""
        try:
            futures = submit()
        except Exception as exc:  # refused as a whole (a full queue, an unloaded model)
            for i in ids:
                front.send(wire.Frame({"id": i, "error": wire.error(exc)}))
            return
        for i, future in zip(ids, futures, strict=True):
            future.add_done_callback(lambda f, i=i: self._answer(front, i, f, put))  # type: ignore[misc]

    @staticmethod
    def _answer(
        front: _Front,
        i: int,
        future: Future[Any],
        put: Callable[[Any, list[bytes | memoryview]], wire.Header],
    ) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if isinstance(exc, NotCached):
            front.send(wire.Frame({"id": i, "error": {"type": "NotCached", "ticket": exc.ticket}}))
            return
        if exc is not None:
            front.send(wire.Frame({"id": i, "error": wire.error(exc)}))
            return
        blobs: list[bytes | memoryview] = []
        ok = put(future.result(), blobs)
        front.send(wire.Frame({"id": i, "ok": ok}, blobs))

    def _load(self, front: _Front, header: wire.Header, frame: wire.Frame) -> None:
        """A meta-model version a front serves: loaded and warmed up on the device, once,
        by a loader thread."""
        version = str(header["version"])
        with self._lock:
            front.versions.add(version)
            if version in self._loads or version in self.engine.loaded():
                return
            config, weights = str(header["config"]), frame.blob(0).tobytes()
            self._loads[version] = self._loader.submit(self._load_new, version, config, weights)

    def _once_loaded(self, versions: set[str], then: Callable[[], None]) -> None:
        """``then()`` now, or once the loads of ``versions`` in progress are done (in a
        loader thread; a failed load leaves its jobs to fail with KeyError)."""
        with self._lock:
            waiting = [f for v in versions if (f := self._loads.get(v)) and not f.done()]
        if not waiting:
            then()
            return
        left = [len(waiting)]
        lock = threading.Lock()

        def loaded(_: Future[None]) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                then()

        for future in waiting:
            future.add_done_callback(loaded)

    def _load_new(self, version: str, config: str, weights: bytes) -> None:
        try:
            model = MetaModel.from_bytes(
                config,
                weights,
                expected_sha=hashlib.sha256(weights).hexdigest(),
                source=f"meta-model {version[:12]}",
            )
            model.version = version  # the front's name for it (its registry's sha)
            self.engine.load(model)
        except Exception:  # its jobs then fail with KeyError (not loaded), answered
            log.exception("could not load meta-model %s", version[:12])
            with self._lock:
                self._loads.pop(version, None)  # a later load frame tries again

    def _release(self, front: _Front, version: str) -> None:
        with self._lock:
            front.versions.discard(version)
            held = any(version in f.versions for f in self._fronts)
            if not held:
                self._loads.pop(version, None)
        if not held:
            self.engine.release(version)
