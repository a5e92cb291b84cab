"""Real ``fastadapt serve`` processes for tests: shared helpers any test may import.

- ``server(env, log)``: a server on a free loopback port, up (``/readyz`` 200) until the
  block ends, then stopped with SIGTERM; yields an ``httpx.Client`` on its base URL.
- ``clean_env(**values)``: this process's environment without any ``FASTADAPT_*``
  variable, plus ``values`` (each becomes ``FASTADAPT_<NAME>``).
- ``fastadapt(env, *args)``: run a ``fastadapt`` command (``migrate``, ``keys create``...)
  and return its standard output.
- ``free_port()``, ``REPO`` (the repository root the processes run in).

Several servers may share one database: give them the same ``FASTADAPT_DATABASE_URL``
(or, for SQLite, the same ``FASTADAPT_DATA_DIR``) and start them one after the other.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def server(env: dict[str, str], log: Path) -> Iterator[httpx.Client]:
    port = free_port()
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                assert process.poll() is None, log.read_text()
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            yield client
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code in (0, -signal.SIGTERM), log.read_text()  # uvicorn re-raises the signal


def clean_env(**values: str | Path) -> dict[str, str]:
    """The environment without ``FASTADAPT_*``, plus ``FASTADAPT_<NAME>=value`` for each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTADAPT_")}
    return env | {f"FASTADAPT_{name.upper()}": str(value) for name, value in values.items()}


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
