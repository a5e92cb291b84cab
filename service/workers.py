"""``fastadapt serve --workers N``: N HTTP fronts on one port, one engine process.

The parent process binds the port, then starts and watches its children:

- the **engine process** (``fastadapt _engine``): owns the device, runs an ``Engine``
  and serves every front over a Unix socket (``service.engine.server``);
- **N fronts** (``fastadapt _front``): each a uvicorn server of the whole app, on the
  listening socket the parent hands down, whose engine is a ``RemoteEngine``. Each does
  the HTTP parsing, keys, the database and the responses on its own core.

A child that dies is started again (a front's requests in flight fail with it; the
engine's jobs in flight fail with 503 + Retry-After in every front, which reconnect by
themselves). Children that keep dying at start-up stop the whole server (exit 3).
SIGTERM (or SIGINT) stops in order: the fronts first (they stop taking requests and
finish theirs), then the engine (it finishes its queue), then the parent exits 0.

Metrics of every process are merged at scrape time (prometheus-client's multiprocess
mode, one folder per server, removed on exit).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from service.settings import Settings

log = logging.getLogger("fastadapt.workers")
FAST_FAILURE_S = 10.0  # a child that exits with an error sooner after its start failed to start
FAST_FAILURES = 5  # in a row: give up, and stop the server
RESTART_BACKOFF_S = (0.1, 5.0)  # before a restart: doubles per fast failure, capped
STARTUP_FAILED = 3
PR_SET_PDEATHSIG = 1  # prctl(2)


@dataclass
class Child:
    """One supervised process: its command, and the running one."""

    name: str
    argv: list[str]
    env: dict[str, str]
    pass_fds: Sequence[int] = ()
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    fast_failures: int = 0
    restarts: int = field(default=0)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, env=self.env, pass_fds=tuple(self.pass_fds), preexec_fn=_die_with_parent
        )
        self.started = time.monotonic()
        log.info("%s: started, pid %d", self.name, self.proc.pid)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float) -> None:
        """Until it exits; SIGKILL past ``timeout``."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s: still running after %g s; killed", self.name, timeout)
            self.proc.kill()
            self.proc.wait()


def serve_workers(settings: Settings) -> int:
    """Run N fronts and the engine process until SIGTERM; the exit status."""
    run_dir = Path(tempfile.mkdtemp(prefix="fastadapt-"))
    try:
        return _supervise(settings, run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _supervise(settings: Settings, run_dir: Path) -> int:
    listener = _listen(settings.host, settings.port)
    metrics_dir = run_dir / "metrics"
    metrics_dir.mkdir()
    socket_path = str(run_dir / "engine.sock")
    env = {
        **os.environ,
        "FASTADAPT_ENGINE_SOCKET": socket_path,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    command = [sys.executable, "-m", "service.cli"]
    engine = Child("engine process", [*command, "_engine", "--socket", socket_path], env)
    fd = listener.fileno()
    fronts = [
        Child(f"front {i + 1}", [*command, "_front", "--fd", str(fd)], env, pass_fds=(fd,))
        for i in range(settings.workers)
    ]
    stopping = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info(
        "serving on %s:%d: %d front processes, one engine process",
        settings.host,
        settings.port,
        settings.workers,
    )
    status = 0
    engine.start()
    for front in fronts:
        front.start()
    while not stopping.wait(0.2):
        failed = next((c for c in (engine, *fronts) if _restart_if_dead(c)), None)
        if failed is not None:
            log.error("%s: failed %d times at start-up; stopping", failed.name, FAST_FAILURES)
            status = STARTUP_FAILED
            break
    listener.close()  # the fronts hold their own copies until they stop
    grace = 2 * settings.shutdown_timeout_s + 15  # their requests, then their lifespan's end
    for front in fronts:
        front.signal(signal.SIGTERM)
    for front in fronts:
        front.wait(grace)
    engine.signal(signal.SIGTERM)  # after the fronts: nothing new reaches its queue
    engine.wait(settings.shutdown_timeout_s + 15)
    log.info("stopped")
    return status


def _restart_if_dead(child: Child) -> bool:
    """Start ``child`` again if it exited; True once it failed too often at start-up."""
    code = child.exited()
    if code is None:
        return False
    # failed to start: exited by itself soon after its start; one killed by a signal (an
    # operator's kill -9, the OOM killer) is started again as often as it is killed
    quick = code > 0 and time.monotonic() - child.started < FAST_FAILURE_S
    child.fast_failures = child.fast_failures + 1 if quick else 0
    if child.fast_failures >= FAST_FAILURES:
        return True
    first, most = RESTART_BACKOFF_S
    pause = min(most, first * 2**child.fast_failures) if quick else first
    log.error("%s: exited with status %s; restarting in %.1f s", child.name, code, pause)
    time.sleep(pause)
    child.restarts += 1
    child.start()
    return False


def _die_with_parent() -> None:
    """In a child, before it runs: SIGKILL it if the parent dies (Linux), so that a parent
    killed outright leaves no front holding the port and no engine holding the device."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _listen(host: str, port: int) -> socket.socket:
    """The port every front accepts on (inherited by them)."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(address)
    listener.listen(2048)
    listener.set_inheritable(True)
    return listener


# -- the children ------------------------------------------------------------------------------
def run_engine(settings: Settings, path: str) -> int:
    """The engine process: an ``Engine`` served on ``path`` until SIGTERM, which lets it
    finish its queue (at most ``shutdown_timeout_s``)."""
    from service.engine import Engine, configure_threads
    from service.engine.server import EngineServer

    configure_threads(settings.threads)
    observer = None
    if settings.metrics:
        from service.api.metrics import Metrics

        observer = Metrics(settings).observer  # merged into the fronts' /metrics
    engine = Engine({}, settings, observer=observer)
    engine.start()
    server = EngineServer(engine, path)

    def stop(signum: int, frame: FrameType | None) -> None:
        server.stop_accepting()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
    server.shutdown(timeout=settings.shutdown_timeout_s)
    logging.shutdown()
    os._exit(0)  # skip the interpreter's teardown of torch (see cli._stopped)
