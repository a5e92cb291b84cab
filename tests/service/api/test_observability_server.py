"""A real ``fastadapt serve``: its stdout is one JSON line per request and nothing secret,
and its /metrics parse; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.api.test_server import server
from tests.service.api.test_server_auth import keys

SUPPORT = {"inputs": [[-2.71828182], [1.41421356]], "targets": [3.14159265, -1.73205080]}
QUERY = 0.57721566
FIELDS = {"time", "request_id", "tenant", "method", "route", "status", "duration_ms"}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_served_access_log_and_metrics(
    backend: str, fresh_database: Callable[[str], str], models_dir: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTADAPT_")}
    env |= {
        "FASTADAPT_DATA_DIR": str(tmp_path / "data"),
        "FASTADAPT_MODELS_DIR": str(models_dir),
        "FASTADAPT_DATABASE_URL": fresh_database(backend),
        "FASTADAPT_THREADS": "1",
        "FASTADAPT_MAX_BODY_BYTES": "2048",
        "FASTADAPT_METRICS_CENSUS_S": "0",
    }
    token = keys(env, "create", "--tenant", "acme").splitlines()[-1]  # a real key, sent
    log = tmp_path / "server.log"
    headers = {"Authorization": f"Bearer {token}", "X-Request-ID": "e2e-1"}
    body = {"meta_model": "sinusoid", "support": SUPPORT}
    with server(env, log) as client:
        sent = [
            client.post("/v1/clients/alice/adaptations", json=body, headers=headers),
            client.get("/v1/clients/alice/predictions", params={"x": QUERY}, headers=headers),
            client.post(  # the key without a request id: the server makes one
                "/v1/clients/alice/predictions",
                json={"inputs": [[QUERY]]},
                headers={"Authorization": headers["Authorization"]},
            ),
            client.get("/v1/clients/nobody", headers={"X-Request-ID": "not sane!"}),
            client.post("/v1/clients/alice/adaptations", content=b"[" * 4096, headers=headers),
            client.get("/no/such/path"),
        ]
        scraped = client.get("/metrics")
    assert [r.status_code for r in sent] == [201, 200, 200, 404, 413, 404]
    assert sent[0].headers["x-request-id"] == "e2e-1"
    for response in sent:
        request_id = response.headers["x-request-id"]
        if response.status_code >= 400:
            assert response.json()["error"]["request_id"] == request_id

    families = {f.name: f for f in text_string_to_metric_families(scraped.text)}
    clients = {
        s.labels["meta_model"]: s.value for s in families["fastadapt_stored_clients"].samples
    }
    assert clients["sinusoid"] == 1
    assert "fastadapt_http_request_duration_seconds" in families

    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert all(set(line) == FIELDS for line in lines)
    ours = [line for line in lines if line["route"] not in ("/readyz", "/metrics")]
    assert [line["request_id"] for line in ours] == [r.headers["x-request-id"] for r in sent]
    assert [line["status"] for line in ours] == [r.status_code for r in sent]
    assert [line["route"] for line in ours] == [
        "/v1/clients/{client_id}/adaptations",
        "/v1/clients/{client_id}/predictions",
        "/v1/clients/{client_id}/predictions",
        "/v1/clients/{client_id}",
        "/v1/clients/{client_id}/adaptations",
        "unmatched",
    ]
    for secret in (token, "Bearer", "2.71828182", "1.41421356", "3.14159265", "1.7320508",
                   str(QUERY), "x="):  # fmt: skip
        assert secret not in text
