"""The v1 API, end to end through httpx, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.checkpoint import MetaModel
from service.app import create_app
from service.settings import Settings
from service.store import repository
from service.store.tables import ClientVersion
from tests.service.sgd_reference import Reference

XS = [[-4.0], [-2.5], [-1.0], [0.0], [1.5], [3.0]]
YS = [0.7, -0.5, -1.6, -0.9, 1.2, 0.3]


def adapt(api: TestClient, client_id: str = "alice", **body: Any) -> dict[str, Any]:
    payload = {"meta_model": "sinusoid", "support": {"inputs": XS, "targets": YS}, **body}
    response = api.post(f"/v1/clients/{client_id}/adaptations", json=payload)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def predict(api: TestClient, client_id: str = "alice", **body: Any) -> dict[str, Any]:
    response = api.post(f"/v1/clients/{client_id}/predictions", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_health_readiness_and_docs(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json() == {"status": "ready"}
    assert api.get("/docs").status_code == 200
    paths = api.get("/openapi.json").json()["paths"]
    assert "/v1/clients/{client_id}/adaptations" in paths


def test_not_ready_without_meta_models(
    fresh_database: Callable[[str], str], tmp_path: Path
) -> None:
    url = fresh_database("sqlite")  # nothing registered, nothing shipped
    settings = Settings(data_dir=tmp_path, models_dir=tmp_path / "empty", database_url=url)
    with TestClient(create_app(settings)) as api:
        response = api.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "unavailable"
    assert "no meta-model is registered" in response.json()["error"]["message"]


def test_not_ready_without_a_database(models_dir: Path, tmp_path: Path) -> None:
    unreachable = "postgresql+psycopg://nobody@127.0.0.1:1/nothing?connect_timeout=2"
    settings = Settings(data_dir=tmp_path, models_dir=models_dir, database_url=unreachable)
    with TestClient(create_app(settings)) as api:
        response = api.get("/readyz")
    assert response.status_code == 503
    assert "database" in response.json()["error"]["message"]


def test_meta_models_are_described(api: TestClient, sinusoid: MetaModel) -> None:
    listed = api.get("/v1/meta-models").json()["meta_models"]
    assert [m["name"] for m in listed] == ["plane", "sinusoid", "sinusoid-metasgd"]
    one = api.get("/v1/meta-models/sinusoid").json()
    assert one == {
        "name": "sinusoid",
        "version": sinusoid.version,
        "family": "sinusoid",
        "task_kind": "regression",
        "input_shape": [1],
        "output": "one float per input",
        "inner_steps": 5,
        "inner_lr": 0.01,
        "first_order": False,
        "adapt": "all",
        "learned_lr": "none",
        "max_way": None,
        "accepts_images": False,
        "features": None,  # not tabular
        "trained_support": None,  # an artifact that declares no trained_for: not checked
        "trained_inner_steps": None,
    }
    learned = api.get("/v1/meta-models/sinusoid-metasgd").json()
    assert learned["inner_lr"] is None and learned["learned_lr"] == "per_param"
    missing = api.get("/v1/meta-models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"


def test_adapt_then_predict_matches_an_independent_reference(
    api: TestClient, reference: Reference, sinusoid: MetaModel
) -> None:
    body = adapt(api, inner_steps=8, inner_lr=0.03)
    fast, before, after = reference.adapt(XS, YS, steps=8, lr=0.03)
    assert body["client_id"] == "alice" and body["version"] == 1
    assert body["meta_model"] == "sinusoid" and body["meta_model_version"] == sinusoid.version
    assert (body["support_size"], body["inner_steps"], body["inner_lr"]) == (6, 8, 0.03)
    assert body["support_loss_before"] == pytest.approx(before, rel=1e-5)
    assert body["support_loss_after"] == pytest.approx(after, rel=1e-5)
    assert body["support_loss_after"] < body["support_loss_before"]
    assert body["adapt_ms"] > 0

    queries = [[-3.3], [0.25], [4.9]]
    posted = predict(api, inputs=queries)
    assert posted["client_id"] == "alice" and posted["version"] == 1
    assert posted["predictions"] == pytest.approx(reference.predict(fast, queries), abs=1e-5)
    got = api.get("/v1/clients/alice/predictions", params={"x": [-3.3, 0.25, 4.9]}).json()
    assert got["predictions"] == pytest.approx(posted["predictions"], abs=1e-6)


def test_defaults_are_the_meta_models(api: TestClient) -> None:
    body = adapt(api)
    assert (body["inner_steps"], body["inner_lr"]) == (5, 0.01)
    learned = adapt(api, "bob", meta_model="sinusoid-metasgd", inner_steps=2)
    assert (learned["inner_steps"], learned["inner_lr"]) == (2, None)


def test_every_adaptation_is_a_new_version_and_old_ones_stay_usable(api: TestClient) -> None:
    first = adapt(api, inner_steps=1)
    second = adapt(api, inner_steps=10)
    assert (first["version"], second["version"]) == (1, 2)
    current = predict(api, inputs=[[1.0]])
    old = predict(api, inputs=[[1.0]], version=1)
    assert current["version"] == 2 and old["version"] == 1
    assert current["predictions"] != old["predictions"]

    client = api.get("/v1/clients/alice").json()
    assert client["client_id"] == "alice" and client["current_version"] == 2
    assert [v["version"] for v in client["versions"]] == [1, 2]
    assert [v["inner_steps"] for v in client["versions"]] == [1, 10]
    assert "params" not in client["versions"][0]
    assert client["created_at"].endswith(("Z", "+00:00"))


def test_delete_removes_the_client_and_every_version(api: TestClient, session: Session) -> None:
    adapt(api)
    adapt(api)
    adapt(api, "bob")
    predict(api, inputs=[[0.0]])  # cache it
    assert api.delete("/v1/clients/alice").status_code == 204
    stmt = select(func.count()).select_from(ClientVersion).where(ClientVersion.client_id == "alice")
    assert session.scalar(stmt) == 0
    for response in (
        api.get("/v1/clients/alice"),
        api.post("/v1/clients/alice/predictions", json={"inputs": [[0.0]]}),
        api.delete("/v1/clients/alice"),
    ):
        assert response.status_code == 404, response.text
        assert response.json()["error"]["type"] == "not_found"
    assert api.get("/v1/clients/bob").status_code == 200
    again = adapt(api, inner_steps=1)  # a re-created client starts at version 1, uncached
    assert again["version"] == 1
    fresh = predict(api, inputs=[[0.0]])
    other = api.get("/v1/clients/alice/predictions", params={"x": 0.0}).json()
    assert fresh["predictions"] == other["predictions"]


def test_unknown_client_and_version_are_404(api: TestClient) -> None:
    missing = api.post("/v1/clients/nobody/predictions", json={"inputs": [[0.0]]})
    assert missing.status_code == 404 and "nobody" in missing.json()["error"]["message"]
    assert api.get("/v1/clients/nobody/predictions?x=1").status_code == 404
    adapt(api)
    version = api.post("/v1/clients/alice/predictions", json={"inputs": [[0.0]], "version": 7})
    assert version.status_code == 404 and "version 7" in version.json()["error"]["message"]


def test_a_rejected_adaptation_leaves_the_current_version_intact(api: TestClient) -> None:
    adapt(api)
    before = predict(api, inputs=[[0.5], [2.0]])
    rejected = [
        {"meta_model": "sinusoid", "support": {"inputs": [[1e30]], "targets": [1e30]}},
        {"meta_model": "sinusoid", "support": {"inputs": XS, "targets": YS[:-1]}},
        {"meta_model": "nope", "support": {"inputs": XS, "targets": YS}},
        {"meta_model": "sinusoid", "support": {"inputs": XS, "targets": YS}, "inner_steps": 0},
    ]
    for body in rejected:
        response = api.post("/v1/clients/alice/adaptations", json=body)
        assert response.status_code == 422, response.text
    assert api.get("/v1/clients/alice").json()["current_version"] == 1
    assert predict(api, inputs=[[0.5], [2.0]]) == before


def test_a_client_adapted_from_an_unregistered_meta_model_version_is_a_conflict(
    api: TestClient, session: Session
) -> None:
    adapt(api)
    row = repository.get_version(session=session, tenant_id="default", client_id="alice")
    assert row is not None
    row.meta_model_version = "f" * 64  # a row older than the registry, its artifact gone
    session.commit()
    response = api.post("/v1/clients/alice/predictions", json={"inputs": [[0.0]]})
    assert response.status_code == 409
    message = response.json()["error"]["message"]
    assert "ffffffffffff, which is not registered" in message and "adapt the client" in message


def test_two_dimensional_inputs(api: TestClient) -> None:
    body = {
        "meta_model": "plane",
        "support": {"inputs": [[0.0, 1.0], [1.0, 0.0]], "targets": [1, 2]},
    }
    assert api.post("/v1/clients/p/adaptations", json=body).status_code == 201
    assert len(predict(api, "p", inputs=[[0.5, 0.5]])["predictions"]) == 1
    response = api.get("/v1/clients/p/predictions", params={"x": 0.5})
    assert response.status_code == 422 and response.json()["error"]["message"].startswith("x[0]")
