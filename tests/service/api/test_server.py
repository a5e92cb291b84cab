"""The real server process: adapt, stop, start again, and get bit-identical predictions."""

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
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[3]
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


def snapshot(client: httpx.Client) -> dict[str, Any]:
    queries = [[-4.9], [-1.3], [0.0], [0.7], [3.14159], [4.99]]
    out: dict[str, Any] = {}
    for client_id in ("alice", "bob"):
        history = client.get(f"/v1/clients/{client_id}").json()
        out[client_id] = history
        for entry in history["versions"]:
            body = {"inputs": queries, "version": entry["version"]}
            response = client.post(f"/v1/clients/{client_id}/predictions", json=body)
            out[(client_id, entry["version"])] = response.json()["predictions"]
        out[(client_id, "get")] = client.get(
            f"/v1/clients/{client_id}/predictions", params={"x": [0.25, 2.5]}
        ).json()
    return out


def test_a_restart_keeps_every_clients_models(models_dir: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTADAPT_")}
    env |= {
        "FASTADAPT_DATA_DIR": str(tmp_path / "data"),
        "FASTADAPT_MODELS_DIR": str(models_dir),
        "FASTADAPT_THREADS": "1",
    }
    log = tmp_path / "server.log"
    support = {"inputs": [[-3.0], [-0.5], [1.0], [2.5]], "targets": [-0.1, -1.4, 0.8, 1.9]}
    with server(env, log) as client:
        for client_id, steps in (("alice", 3), ("alice", 9), ("bob", 5)):
            body = {"meta_model": "sinusoid", "support": support, "inner_steps": steps}
            response = client.post(f"/v1/clients/{client_id}/adaptations", json=body)
            assert response.status_code == 201, response.text
        before = snapshot(client)
    with server(env, log) as client:
        after = snapshot(client)
    assert before[("alice", 1)] != before[("alice", 2)]
    assert after == before  # bit for bit: floats compare exactly
