"""Two real server processes on one database: a client deleted and re-created on one is
never answered from the other's cache with the deleted model (issue 11's reproduction:
adapt on A, predict on B, delete on A, adapt again on A, predict on B)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from service.store import migrate
from tests.live import clean_env, server
from tests.service.store_fixtures import Databases

QUERIES = [[-4.0], [-1.0], [0.0], [0.5], [2.0], [4.5]]
OLD = {"inputs": [[-3.0], [-1.0], [1.0], [3.0]], "targets": [-0.5, -1.5, 1.5, 0.5]}
NEW = {"inputs": [[-2.0], [0.0], [2.0], [4.0]], "targets": [2.0, -2.0, 2.0, -2.0]}


def adapt(api: httpx.Client, support: dict[str, list[float] | list[list[float]]]) -> str:
    body = {"meta_model": "sinusoid", "support": support, "inner_steps": 5}
    response = api.post("/v1/clients/alice/adaptations", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["version"] == 1
    version_id: str = response.json()["version_id"]
    return version_id


def predict(api: httpx.Client) -> tuple[list[float], str]:
    response = api.post("/v1/clients/alice/predictions", json={"inputs": QUERIES})
    assert response.status_code == 200, response.text
    assert response.headers["ETag"] == f'"{response.json()["version_id"]}"'
    return response.json()["predictions"], response.json()["version_id"]


def cache_hits(api: httpx.Client) -> float:
    """The engine's params-cache hits, from /metrics (the open loopback caller is admin)."""
    text = api.get("/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("fastadapt_cache_hits")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_delete_and_recreate_on_one_server_is_never_served_stale_by_another(
    backend: str,
    models_dir: Path,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> None:
    databases = Databases(tmp_path_factory)
    values: dict[str, str | Path] = {
        "data_dir": tmp_path / "data",  # SQLite: both servers share data/fastadapt.db
        "models_dir": models_dir,
        "threads": "1",
    }
    if backend == "postgresql":
        url = databases.postgresql(request.getfixturevalue("postgres_url"))
        migrate.upgrade(url)
        values["database_url"] = url
    env = clean_env(**values)
    try:
        with server(env, tmp_path / "a.log") as a, server(env, tmp_path / "b.log") as b:
            old_id = adapt(a, OLD)
            on_a, _ = predict(a)
            on_b, seen = predict(b)  # B reads the params and caches them ...
            assert (on_b, seen) == (on_a, old_id)
            hits = cache_hits(b)
            assert predict(b) == (on_a, old_id)  # ... and now answers from its cache
            assert cache_hits(b) > hits
            assert a.delete("/v1/clients/alice").status_code == 204  # B hears nothing of it
            new_id = adapt(a, NEW)  # version 1 again, with other data
            assert new_id != old_id
            fresh_a, on_a_id = predict(a)
            fresh_b, on_b_id = predict(b)
            assert on_a_id == on_b_id == new_id
            assert fresh_b == fresh_a  # the new model, bit for bit ...
            assert fresh_b != on_a  # ... never the deleted one
            history = b.get("/v1/clients/alice").json()["versions"]
            assert [v["version_id"] for v in history] == [new_id]
    finally:
        databases.drop_all()
