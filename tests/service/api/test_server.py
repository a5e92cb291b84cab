"""The real server process: adapt, stop, start again, and get bit-identical predictions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

# the live-server helpers live in tests/live.py; re-exported for the tests that import them here
from tests.live import REPO, START_TIMEOUT_S, free_port, server  # noqa: F401


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
