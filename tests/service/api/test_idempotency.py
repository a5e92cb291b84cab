"""Version identity (``version_id``, the predictions' ETag) and safe retries
(``Idempotency-Key``), through the API, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.app import create_app
from service.settings import Settings
from service.store import repository
from service.store.session import connect
from service.store.tables import DEFAULT_TENANT, ClientVersion, utcnow
from service.usecases import idempotency
from tests.service.api.test_api import XS, YS, adapt, predict

BODY = {"meta_model": "sinusoid", "support": {"inputs": XS, "targets": YS}, "inner_steps": 3}
ADAPTATIONS = "/v1/clients/alice/adaptations"


def post(
    api: TestClient | httpx.Client, key: str, body: Any = BODY, path: str = ADAPTATIONS
) -> httpx.Response:
    return api.post(path, json=body, headers={"Idempotency-Key": key})


def versions(session: Session, client_id: str = "alice") -> int:
    stmt = select(func.count()).select_from(ClientVersion)
    return int(session.scalar(stmt.where(ClientVersion.client_id == client_id)) or 0)


# -- identity --------------------------------------------------------------------------------
def test_every_version_has_an_id_never_reused_and_predictions_carry_it_as_etag(
    api: TestClient,
) -> None:
    first, second = adapt(api), adapt(api)
    ids = {first["version_id"], second["version_id"]}
    assert len(ids) == 2 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    history = api.get("/v1/clients/alice").json()["versions"]
    assert [v["version_id"] for v in history] == [first["version_id"], second["version_id"]]
    response = api.post("/v1/clients/alice/predictions", json={"inputs": [[0.0]], "version": 1})
    assert response.json()["version_id"] == first["version_id"]
    assert response.headers["ETag"] == f'"{first["version_id"]}"'
    query = api.get("/v1/clients/alice/predictions", params={"x": 0.5})
    assert query.headers["ETag"] == f'"{second["version_id"]}"'
    assert api.delete("/v1/clients/alice").status_code == 204
    again = adapt(api)  # version 1 again, never the same identity
    assert again["version"] == 1 and again["version_id"] not in ids
    assert predict(api, inputs=[[0.0]])["version_id"] == again["version_id"]


def test_the_api_docs_name_the_headers(api: TestClient) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    adaptations = paths["/v1/clients/{client_id}/adaptations"]["post"]
    assert any(p["name"] == "Idempotency-Key" for p in adaptations["parameters"])
    assert "Idempotent-Replayed" in adaptations["responses"]["201"]["headers"]
    readaptations = paths["/v1/clients/{client_id}/readaptations"]["post"]
    assert any(p["name"] == "Idempotency-Key" for p in readaptations["parameters"])
    for method in ("get", "post"):
        predictions = paths["/v1/clients/{client_id}/predictions"][method]
        assert "ETag" in predictions["responses"]["200"]["headers"]


# -- safe retries ----------------------------------------------------------------------------
def test_a_retry_replays_the_first_response_and_creates_nothing(
    api: TestClient, session: Session
) -> None:
    first = post(api, "k-1")
    assert first.status_code == 201, first.text
    assert "Idempotent-Replayed" not in first.headers
    reordered = json.loads(json.dumps(BODY))
    reordered = {"inner_steps": 3, **reordered}  # the same JSON, keys in another order
    retry = api.post(
        ADAPTATIONS,
        content=json.dumps(reordered, indent=2),
        headers={"Idempotency-Key": "k-1", "Content-Type": "application/json"},
    )
    assert retry.status_code == 201
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json() == first.json()  # bit for bit: floats compare exactly
    assert versions(session) == 1
    assert post(api, "k-2").json()["version"] == 2  # a new key is a new request


def test_the_same_key_with_another_request_is_422_naming_the_header(
    api: TestClient, session: Session
) -> None:
    assert post(api, "k").status_code == 201
    changed = {**BODY, "inner_steps": 4}
    for response in (
        post(api, "k", changed),
        post(api, "k", path="/v1/clients/bob/adaptations"),  # keys are per tenant
        post(api, "k", {}, path="/v1/clients/alice/readaptations"),
    ):
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_input"
        assert error["message"].startswith("Idempotency-Key: ")
    assert versions(session) == 1 and versions(session, "bob") == 0


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
def test_a_malformed_key_is_422_naming_the_header(api: TestClient, key: str) -> None:
    response = api.post(
        # as raw bytes: the test client refuses to encode a non-ASCII value itself
        ADAPTATIONS,
        json=BODY,
        headers=[(b"Idempotency-Key", key.encode("utf-8"))],
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith("Idempotency-Key: ")


def test_a_key_expires_and_may_then_be_used_anew(api: TestClient, session: Session) -> None:
    first = post(api, "k").json()
    ttl = api.app.state.settings.idempotency_ttl_s  # type: ignore[attr-defined]
    made = utcnow() - timedelta(seconds=ttl + 1)  # as if the first was made a TTL ago
    session.execute(update(ClientVersion).values(created_at=made))
    session.commit()
    second = post(api, "k")
    assert second.status_code == 201 and "Idempotent-Replayed" not in second.headers
    assert second.json()["version"] == 2 and second.json()["version_id"] != first["version_id"]
    third = post(api, "k")  # the key now names the second
    assert third.headers["Idempotent-Replayed"] == "true" and third.json() == second.json()
    assert versions(session) == 2


def test_readaptations_replay_too(api: TestClient, session: Session) -> None:
    adapt(api)
    path = "/v1/clients/alice/readaptations"
    first = post(api, "r", {"inner_steps": 2}, path=path)
    assert first.status_code == 201, first.text
    retry = post(api, "r", {"inner_steps": 2}, path=path)
    assert retry.headers["Idempotent-Replayed"] == "true" and retry.json() == first.json()
    empty = api.post(path, headers={"Idempotency-Key": "e"})  # no body at all
    assert empty.status_code == 201
    again = api.post(path, headers={"Idempotency-Key": "e"})
    assert again.headers["Idempotent-Replayed"] == "true" and again.json() == empty.json()
    assert versions(session) == 3


def test_a_duplicate_while_the_first_is_in_flight_is_a_retryable_409(
    api: TestClient, session: Session
) -> None:
    runtime = api.app.state.runtime  # type: ignore[attr-defined]
    with runtime.in_flight.hold(DEFAULT_TENANT, "busy"):  # as if a first were adapting
        response = post(api, "busy")
    assert response.status_code == 409
    assert response.headers["Retry-After"] == "1"
    assert "in progress" in response.json()["error"]["message"]
    assert versions(session) == 0
    assert post(api, "busy").status_code == 201  # released: the retry goes through


def test_losing_a_race_to_another_process_replays_its_version(
    api: TestClient, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process stores the key between this one's look-up and its insert: the
    unique key refuses the insert, and this request answers the stored version."""
    winner = post(api, "race").json()
    real = repository.find_idempotent
    calls: list[int] = []

    def blind_first(**kwargs: Any) -> ClientVersion | None:
        calls.append(1)
        return None if len(calls) == 1 else real(**kwargs)

    monkeypatch.setattr(repository, "find_idempotent", blind_first)
    loser = post(api, "race")
    assert len(calls) == 2  # looked up, adapted, lost on insert, looked up again
    assert loser.status_code == 201 and loser.headers["Idempotent-Replayed"] == "true"
    assert loser.json() == winner
    assert versions(session) == 1


def test_the_request_hash_is_canonical_json() -> None:
    def h(body: bytes, path: str = ADAPTATIONS) -> str:
        return idempotency.request_hash(method="post", path=path, body=body)

    assert h(b'{"a": 1, "b": [1, 2]}') == h(b'{"b":[1,2],"a":1}')
    assert h(b'{"a": 1}') != h(b'{"a": 2}')
    assert h(b'{"a": 1}') != h(b'{"a": 1}', "/v1/clients/bob/adaptations")
    assert h(b"not json") == h(b"not json") != h(b"not json!")


# -- concurrent retries, real commits ---------------------------------------------------------
Factory = Callable[[str], str]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_retries_on_two_apps_create_one_version(
    backend: str,
    fresh_database: Factory,
    models_dir: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Two apps (two runtimes, as two processes) on one database, four threads each
    sending the same request with the same key: one version; every 201 is the same body."""
    if backend == "postgresql":
        request.getfixturevalue("postgres_url")  # skipped without PostgreSQL
    url = fresh_database(backend)
    settings = Settings(data_dir=tmp_path, models_dir=models_dir, database_url=url, threads=1)
    responses: list[httpx.Response] = []
    lock = threading.Lock()
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        start = threading.Barrier(8)

        def send(api: TestClient) -> None:
            start.wait()
            response = post(api, "together")
            with lock:
                responses.append(response)

        threads = [threading.Thread(target=send, args=(api,)) for api in (a, b) * 4]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    created = [r for r in responses if r.status_code == 201]
    assert created and all(r.status_code == 409 for r in responses if r not in created)
    assert all(r.json() == created[0].json() for r in created)
    database = connect(url)
    with Session(database) as session:
        assert versions(session) == 1
    database.dispose()
