"""Predictions read a kept version (no query) only while the database has not changed:
two apps on one database (two runtimes, as two processes) still read their writes."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.service.api.test_api import XS, YS, adapt
from tests.service.store_fixtures import BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kept_version_answers_until_another_replica_adapts(
    backend: str,
    fresh_database: Callable[[str], str],
    models_dir: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    if backend == "postgresql":
        request.getfixturevalue("postgres_url")  # skipped without PostgreSQL
    url = fresh_database(backend)
    settings = Settings(data_dir=tmp_path, models_dir=models_dir, database_url=url, threads=1)
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        kept = a.app.state.runtime.predictables  # type: ignore[attr-defined]
        assert kept.enabled
        deadline = time.monotonic() + 30  # PostgreSQL's counter listens on its own thread
        while kept.generation() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first = adapt(a)
        for _ in range(3):  # the first reads the database and keeps it; the others do not
            answer = a.post("/v1/clients/alice/predictions", json={"inputs": [[0.5]]})
            assert answer.json()["version_id"] == first["version_id"]
        assert kept.hits >= 2
        second = adapt(b, support={"inputs": XS, "targets": [-y for y in YS]})
        answer = a.post("/v1/clients/alice/predictions", json={"inputs": [[0.5]]})
        assert answer.json()["version"] == 2  # read at once on the other replica
        assert answer.json()["version_id"] == second["version_id"]
        assert answer.headers["ETag"] == f'"{second["version_id"]}"'
        old = a.post("/v1/clients/alice/predictions", json={"inputs": [[0.5]], "version": 1})
        assert old.json()["version_id"] == first["version_id"]
        assert b.delete("/v1/clients/alice").status_code == 204
        gone = a.post("/v1/clients/alice/predictions", json={"inputs": [[0.5]]})
        assert gone.status_code == 404
