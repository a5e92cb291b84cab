"""The bulk endpoints, end to end through httpx, on SQLite and PostgreSQL: one result per
item, in order; an item's error fails only itself; results equal single requests'."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import usecases
from service.store.tables import ClientVersion
from tests.service.api.test_api import XS, YS, adapt, predict

PREDICT = "/v1/predictions:batch"
ADAPT = "/v1/adaptations:batch"


def support(ys: list[float] = YS) -> dict[str, Any]:
    return {"inputs": XS, "targets": ys}


def item(client_id: str, ys: list[float] = YS, **extra: Any) -> dict[str, Any]:
    return {"client_id": client_id, "meta_model": "sinusoid", "support": support(ys), **extra}


def versions(session: Session, client_id: str, tenant_id: str = "default") -> list[int]:
    stmt = select(ClientVersion.version).where(
        ClientVersion.tenant_id == tenant_id, ClientVersion.client_id == client_id
    )
    return sorted(session.scalars(stmt))


def same(bulk: dict[str, Any], single: dict[str, Any]) -> bool:
    """A bulk result is the single request's answer (predictions equal to float32
    rounding: a batched forward pass may sum in another order)."""
    rest = {k: v for k, v in bulk.items() if k != "predictions"}
    assert rest == {k: v for k, v in single.items() if k != "predictions"}
    assert bulk["predictions"] == pytest.approx(single["predictions"], rel=1e-5, abs=1e-6)
    return True


def error_of(result: dict[str, Any]) -> tuple[str, int, str]:
    error = result["error"]
    return error["type"], error["status"], error["message"]


def test_bulk_predictions_answer_each_item_in_order_as_single_requests_do(
    api: TestClient,
) -> None:
    adapt(api, "alice")
    adapt(api, "alice", support={"inputs": XS, "targets": [y * 0.5 for y in YS]})
    adapt(api, "bob", support={"inputs": XS, "targets": [-y for y in YS]})
    body = {
        "requests": [
            {"client_id": "bob", "inputs": [[0.5], [1.0]]},
            {"client_id": "carol", "inputs": [[0.5]]},  # never adapted
            {"client_id": "alice", "inputs": [[0.5]], "version": 1},
            {"client_id": "alice", "inputs": [[0.25], [2.0], [-1.0]]},
            {"client_id": "bob", "inputs": [[1.0, 2.0]]},  # two features for a 1-D model
            {"client_id": "alice", "inputs": [[0.5]], "version": 9},  # no such version
        ]
    }
    response = api.post(PREDICT, json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["client_id"] for r in results] == ["bob", "carol", "alice", "alice", "bob", "alice"]
    assert same(results[0], predict(api, "bob", inputs=[[0.5], [1.0]]))
    assert same(results[2], predict(api, "alice", inputs=[[0.5]], version=1))
    assert same(results[3], predict(api, "alice", inputs=[[0.25], [2.0], [-1.0]]))
    assert results[3]["version"] == 2 and results[2]["version"] == 1
    assert error_of(results[1]) == ("not_found", 404, "unknown client 'carol'")
    kind, status, message = error_of(results[4])
    assert (kind, status) == ("invalid_input", 422)
    assert message.startswith("requests[4].inputs[0]")
    assert error_of(results[5]) == ("not_found", 404, "client 'alice' has no version 9")


def test_bulk_predictions_read_params_the_engine_has_not_cached(make_api: Any) -> None:
    first = make_api()
    adapt(first, "alice")
    adapt(first, "bob")
    expected = [predict(first, c, inputs=[[0.5]]) for c in ("alice", "bob")]
    fresh = make_api()  # another process: nothing cached, the params come from the store
    body = {"requests": [{"client_id": c, "inputs": [[0.5]]} for c in ("alice", "bob")]}
    results = fresh.post(PREDICT, json=body).json()["results"]
    assert all(same(r, e) for r, e in zip(results, expected, strict=True))


def test_bulk_adaptations_store_one_version_per_client_and_report_each_item(
    api: TestClient, session: Session
) -> None:
    adapt(api, "alice")  # version 1 already
    body = {
        "adaptations": [
            item("alice"),
            item("bob", [-y for y in YS]),
            item("alice", [2 * y for y in YS]),  # a client again: refused
            item("carol", meta_model="nope"),
            {**item("dave"), "support": {"inputs": [[0.1], [0.2]], "targets": [1.0]}},
            item("erin", inner_steps=500),  # beyond max_inner_steps
        ]
    }
    response = api.post(ADAPT, json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    results = answer["results"]
    assert (answer["succeeded"], answer["failed"]) == (2, 4)
    assert [r["client_id"] for r in results] == ["alice", "bob", "alice", "carol", "dave", "erin"]
    assert results[0]["version"] == 2 and results[1]["version"] == 1
    assert results[0]["origin"] == "adapt" and results[0]["source_version"] is None
    kind, status, message = error_of(results[2])
    assert (kind, status) == ("invalid_input", 422)
    assert message.startswith("adaptations[2].client_id: ") and "adaptations[0]" in message
    kind, status, message = error_of(results[3])
    assert (kind, status) == ("invalid_input", 422)
    assert message.startswith("adaptations[3].meta_model: unknown meta-model 'nope'")
    assert error_of(results[4])[2].startswith("adaptations[4].support")
    assert error_of(results[5])[2].startswith("adaptations[5].inner_steps")
    assert versions(session, "alice") == [1, 2]
    assert versions(session, "bob") == [1]
    assert all(versions(session, c) == [] for c in ("carol", "dave", "erin"))
    # each new version is what the single-client request makes of the same support set
    single = adapt(api, "frank", support=support([-y for y in YS]))
    bob = api.get("/v1/clients/bob").json()
    assert bob["current_version"] == 1
    assert predict(api, "bob", inputs=XS)["predictions"] == pytest.approx(
        predict(api, "frank", inputs=XS)["predictions"], abs=1e-6
    )
    assert results[1]["support_loss_after"] == pytest.approx(single["support_loss_after"])
    assert results[0]["version_id"] != results[1]["version_id"]


def test_bulk_adaptations_answer_200_when_every_item_failed(api: TestClient) -> None:
    body = {"adaptations": [item("alice", meta_model="nope")]}
    response = api.post(ADAPT, json=body)
    assert response.status_code == 200
    assert (response.json()["succeeded"], response.json()["failed"]) == (0, 1)


def test_bulk_limits_fail_the_whole_request_naming_the_field(make_api: Any) -> None:
    api = make_api(max_bulk=2, max_predict_batch=3)
    adapt(api, "alice")
    three = [{"client_id": "alice", "inputs": [[0.5]]}] * 3
    response = api.post(PREDICT, json={"requests": three})
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("requests: 3 items exceed")
    response = api.post(PREDICT, json={"requests": []})
    assert response.status_code == 422 and "requests" in response.json()["error"]["message"]
    many = [{"client_id": "alice", "inputs": [[0.5], [1.0]]}] * 2
    response = api.post(PREDICT, json={"requests": many})
    assert response.status_code == 413
    assert response.json()["error"]["message"].startswith("requests: 4 inputs in all")
    response = api.post(ADAPT, json={"adaptations": [item(c) for c in ("a", "b", "c")]})
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("adaptations: 3 items exceed")
    response = api.post(ADAPT, json={"adaptations": [item("../x")]})  # a malformed item
    assert response.status_code == 422 and "client_id" in response.json()["error"]["message"]
    small = make_api(max_body_bytes=1024)
    response = small.post(ADAPT, json={"adaptations": [item(f"c{i}") for i in range(20)]})
    assert response.status_code == 413


def test_bulk_adaptations_refuse_an_idempotency_key(api: TestClient, session: Session) -> None:
    keyed = {"Idempotency-Key": "k1"}
    response = api.post(ADAPT, json={"adaptations": [item("alice")]}, headers=keyed)
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("Idempotency-Key: not supported")
    assert versions(session, "alice") == []


def test_bulk_requests_see_the_callers_tenant_only(make_api: Any, session: Session) -> None:
    api = make_api(auth="required", auth_cache_s=0)

    def key(tenant: str) -> dict[str, str]:
        created = usecases.keys.create(session=session, tenant_id=tenant, scope="client")
        return {"Authorization": f"Bearer {created.token}"}

    acme, globex = key("acme"), key("globex")
    assert api.post(PREDICT, json={"requests": []}).status_code == 401
    made = api.post(ADAPT, json={"adaptations": [item("alice")]}, headers=acme)
    assert made.json()["succeeded"] == 1
    body = {"requests": [{"client_id": "alice", "inputs": [[0.5]]}]}
    theirs = api.post(PREDICT, json=body, headers=globex).json()["results"][0]
    assert error_of(theirs)[:2] == ("not_found", 404)
    ours = api.post(PREDICT, json=body, headers=acme).json()["results"][0]
    assert ours["version_id"] == made.json()["results"][0]["version_id"]
    again = api.post(ADAPT, json={"adaptations": [item("alice")]}, headers=globex).json()
    assert again["results"][0]["version"] == 1  # globex's own alice
    assert versions(session, "alice", "acme") == [1]
    assert versions(session, "alice", "globex") == [1]


def test_openapi_documents_the_bulk_routes(api: TestClient) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    assert set(paths[PREDICT]) == {"post"} and set(paths[ADAPT]) == {"post"}
    for path in (PREDICT, ADAPT):  # what the request as a whole may answer
        assert set(paths[path]["post"]["responses"]) == {
            "200",
            "401",
            "408",
            "413",
            "422",
            "429",
            "503",
        }
    assert "Multi-status" in paths[ADAPT]["post"]["responses"]["200"]["description"]
