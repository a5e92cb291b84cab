"""The hardening of issue 10 that needs a real server: a body that never finishes (408), a
500 on a pooled connection, and PostgreSQL going down and coming back (503, recovery)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from service.app import create_app
from service.settings import Settings
from service.store import migrate
from service.usecases import clients
from tests.service.api.test_server import REPO, free_port, server

SUPPORT = {"inputs": [[-3.0], [-0.5], [1.0], [2.5]], "targets": [-0.1, -1.4, 0.8, 1.9]}
ADAPT_BODY = {"meta_model": "sinusoid", "support": SUPPORT}


def environment(models_dir: Path, tmp_path: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTADAPT_")}
    env |= {
        "FASTADAPT_DATA_DIR": str(tmp_path / "data"),
        "FASTADAPT_MODELS_DIR": str(models_dir),
        "FASTADAPT_THREADS": "1",
    }
    return env | {f"FASTADAPT_{k.upper()}": v for k, v in settings.items()}


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: status, headers (lower-case), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    while len(rest) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    return int(lines[0].split()[1]), headers, rest


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# -- 3. a body that never finishes ------------------------------------------------------
def test_a_body_that_never_finishes_gets_408_and_the_connection_closed(
    models_dir: Path, tmp_path: Path
) -> None:
    env = environment(models_dir, tmp_path, body_timeout_s="1.5")
    with server(env, tmp_path / "server.log") as client:
        port = client.base_url.port
        assert port is not None
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(
                b"POST /v1/clients/alice/adaptations HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nContent-Length: 4000000\r\n\r\n" + b"[" * 1024
            )
            started = time.monotonic()
            status, headers, body = read_response(sock)
            waited = time.monotonic() - started
            assert status == 408
            assert headers["connection"] == "close"
            error = json.loads(body)["error"]
            assert error["type"] == "timeout" and "1.5 s" in error["message"]
            assert 1.0 < waited < 10.0
            assert closed_by_server(sock)
        assert client.get("/healthz").status_code == 200  # the server is fine
        # a body that arrives slowly but within the time is read as usual
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            text = json.dumps(ADAPT_BODY).encode()
            sock.sendall(
                b"POST /v1/clients/alice/adaptations HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(text)
            )
            for i in range(0, len(text), 40):
                sock.sendall(text[i : i + 40])
                time.sleep(0.02)
            status, _, body = read_response(sock)
            assert status == 201, body


# -- 5. a 500 and a pooled client -------------------------------------------------------
@contextmanager
def threaded_server(settings: Settings) -> Iterator[httpx.Client]:
    """The app under uvicorn in a thread of this process (so a test can break a use case)."""
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="error")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not uv.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


def test_a_500_closes_its_connection_and_says_so(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'fastadapt.db'}"
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path, models_dir=models_dir, database_url=url, threads=1)

    def broken(**_: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(clients, "get", broken)
    with threaded_server(settings) as client:
        for _ in range(3):  # one pooled client: every request after a 500 still works
            failed = client.get("/v1/clients/alice")
            assert failed.status_code == 500
            assert failed.headers["connection"] == "close"
            assert failed.json()["error"] == {
                "type": "internal",
                "message": "internal server error",
                "request_id": failed.headers["x-request-id"],
            }
            assert client.get("/healthz").status_code == 200
            assert client.post("/v1/clients/bob/adaptations", json=ADAPT_BODY).status_code == 201
        port = client.base_url.port
        assert port is not None
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(b"GET /v1/clients/alice HTTP/1.1\r\nHost: localhost\r\n\r\n")
            status, headers, _ = read_response(sock)
            assert (status, headers["connection"]) == (500, "close")
            assert closed_by_server(sock)  # as announced


# -- 2. PostgreSQL down, and back --------------------------------------------------------
def postgres_version() -> str | None:
    root = Path("/usr/lib/postgresql")
    versions = sorted((p.name for p in root.iterdir() if p.name.isdigit()), key=int)
    return versions[-1] if versions else None


@contextmanager
def own_cluster() -> Iterator[tuple[str, str, int]]:
    """A PostgreSQL cluster of this test's own on a free port (trust auth, loopback):
    (version, name, port). The shared server is never touched."""
    if shutil.which("pg_createcluster") is None or not Path("/usr/lib/postgresql").is_dir():
        pytest.skip("pg_createcluster (postgresql-common) is not installed")
    if os.geteuid() != 0:
        pytest.skip("pg_createcluster needs root")
    version = postgres_version()
    if version is None:
        pytest.skip("no PostgreSQL server is installed")
    name, port = f"fastadapt_{uuid.uuid4().hex[:10]}", free_port()
    create = ["pg_createcluster", version, name, "-p", str(port), "--start"]
    subprocess.run([*create, "--", "--auth=trust"], check=True, capture_output=True)
    try:
        yield version, name, port
    finally:
        subprocess.run(["pg_dropcluster", "--stop", version, name], capture_output=True)


def pg_ctl(version: str, name: str, action: str) -> None:
    subprocess.run(["pg_ctlcluster", version, name, action], check=True, capture_output=True)


def test_postgresql_down_is_503_and_recovery_needs_no_restart(
    models_dir: Path, tmp_path: Path
) -> None:
    with own_cluster() as (version, name, port):
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        env = environment(models_dir, tmp_path, database_url=url)
        migrated = subprocess.run(
            [sys.executable, "-m", "service.cli", "migrate"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        assert migrated.returncode == 0, migrated.stderr
        with server(env, tmp_path / "server.log") as client:
            assert client.post("/v1/clients/alice/adaptations", json=ADAPT_BODY).status_code == 201
            predict = {"inputs": [[0.5], [1.5]]}
            before = client.post("/v1/clients/alice/predictions", json=predict).json()

            pg_ctl(version, name, "stop")
            for response in (
                client.post("/v1/clients/bob/adaptations", json=ADAPT_BODY),
                client.post("/v1/clients/alice/predictions", json=predict),  # cached
                client.get("/v1/clients/alice/predictions", params={"x": 0.5}),
                client.get("/v1/clients/alice"),
                client.post("/v1/clients/alice/readaptations"),
                client.delete("/v1/clients/alice"),
            ):
                assert response.status_code == 503, response.text
                assert int(response.headers["retry-after"]) >= 1
                error = response.json()["error"]
                assert error["type"] == "unavailable" and "database" in error["message"]
                assert "0.5" not in error["message"]
            assert client.get("/readyz").status_code == 503

            pg_ctl(version, name, "start")  # recovery, with no restart of the server
            deadline = time.monotonic() + 30
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            after = client.post("/v1/clients/alice/predictions", json=predict)
            assert after.status_code == 200 and after.json() == before
            assert client.get("/v1/clients/alice").json()["current_version"] == 1
            assert client.post("/v1/clients/bob/adaptations", json=ADAPT_BODY).status_code == 201
        log = (tmp_path / "server.log").read_text()
        assert "Traceback" not in log  # each 503 a warning line, no stack trace
        assert "-1.4" not in log  # nor the support set
