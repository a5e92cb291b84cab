"""Real ``fastadapt serve`` processes for tests: shared helpers any test may import.

- ``Replica(name, env, log)``: one server on its own loopback port; start, wait until
  ready, stop gracefully (SIGTERM) or kill it (SIGKILL), start it again on the same port.
  ``start_all`` / ``stop_all`` overlap several replicas' start-ups and shutdowns.
- ``server(env, log)``: a replica up (``/readyz`` 200) until the block ends, then stopped
  with SIGTERM (exit 0); yields an ``httpx.Client`` on its base URL.
- ``clean_env(**values)``: this process's environment without any ``FASTADAPT_*``
  variable, plus ``values`` (each becomes ``FASTADAPT_<NAME>``).
- ``fastadapt(env, *args)``: run a ``fastadapt`` command (``migrate``, ``keys create``...)
  and return its standard output.
- ``free_port()``, ``REPO`` (the repository root the processes run in).

Several servers may share one database: give them the same ``FASTADAPT_DATABASE_URL``
(or, for SQLite, the same ``FASTADAPT_DATA_DIR``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 240.0  # a cold start on a loaded 2-core machine (torch import, warm-up)
STOP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def clean_env(**settings: str | Path) -> dict[str, str]:
    """The test process's environment without its ``FASTADAPT_*``, plus ``settings``
    (``database_url="..."`` becomes ``FASTADAPT_DATABASE_URL``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTADAPT_")}
    return env | {f"FASTADAPT_{name.upper()}": str(value) for name, value in settings.items()}


class Replica:
    """One ``fastadapt serve`` process on its own loopback port, logging to ``log``."""

    def __init__(self, name: str, env: Mapping[str, str], log: Path) -> None:
        self.name = name
        self.env = dict(env)
        self.log = log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        """Start the process (on the same port every time); ``wait_ready`` waits for it."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)],
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> Replica:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while True:
                assert self.process is not None and self.process.poll() is None, self.tail()
                try:
                    if client.get("/readyz").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"{self.name} not ready\n{self.tail()}"
                time.sleep(0.1)

    def client(self, key: str | None = None, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else None
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, and the exit status once it has stopped."""
        return self._stop(signal.SIGTERM, timeout)

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """The exit status once it has stopped (after a signal sent by ``send``)."""
        return self._stop(None, timeout)

    def send(self, sig: signal.Signals) -> None:
        """Send ``sig`` without waiting for the process to stop."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def kill(self) -> int:
        """SIGKILL: no shutdown at all."""
        return self._stop(signal.SIGKILL, STOP_TIMEOUT_S)

    def _stop(self, sig: signal.Signals | None, timeout: float) -> int:
        process, self.process = self.process, None
        if process is None:
            return 0
        if sig is not None and process.poll() is None:
            process.send_signal(sig)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"{self.name} did not stop\n{self.tail()}") from None

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def start_all(*replicas: Replica) -> None:
    """Start every replica at once (their start-ups overlap), then wait for each."""
    for replica in replicas:
        replica.start()
    for replica in replicas:
        replica.wait_ready()


def stop_all(*replicas: Replica) -> list[int]:
    """SIGTERM every replica at once (their shutdowns overlap); their exit statuses."""
    for replica in replicas:
        replica.send(signal.SIGTERM)
    return [replica.wait() for replica in replicas]


@contextmanager
def server(env: dict[str, str], log: Path) -> Iterator[httpx.Client]:
    """A replica, ready, for the block; then SIGTERM, and it must exit 0."""
    replica = Replica("server", env, log).start()
    try:
        replica.wait_ready()
        with replica.client(timeout=30) as client:
            yield client
    finally:
        code = replica.terminate()
    assert code == 0, replica.tail()


def fastadapt(env: dict[str, str], *args: str) -> str:
    """Run ``fastadapt ARGS`` (as ``python -m service.cli``) to completion; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout
