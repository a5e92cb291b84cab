"""Client versions through the API, on SQLite and PostgreSQL: listing clients and versions
page by page (filters, tenants), rollback, retention and added examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from models.maml import InnerLoopConfig
from service import usecases
from service.store.tables import ClientVersion
from tests.service.api.test_api_classification import save
from tests.service.conftest import ApiFactory

XS = [[-4.0], [-2.5], [-1.0], [0.0], [1.5], [3.0]]
YS = [0.7, -0.5, -1.6, -0.9, 1.2, 0.3]
QUERIES = [[-3.3], [0.2], [2.9]]


def adapt(
    api: TestClient,
    client_id: str = "alice",
    ys: list[float] = YS,
    meta_model: str = "sinusoid",
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    xs = [[x[0], 1.0] for x in XS] if meta_model == "plane" else XS
    body = {"meta_model": meta_model, "support": {"inputs": xs, "targets": ys}}
    response = api.post(f"/v1/clients/{client_id}/adaptations", json=body, headers=headers)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def ok(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def refused(response: Any, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert all(w in message for w in words), message


def predictions(api: TestClient, client_id: str = "alice", **body: Any) -> list[float]:
    found = ok(api.post(f"/v1/clients/{client_id}/predictions", json={"inputs": QUERIES, **body}))
    result: list[float] = found["predictions"]
    return result


def every_page(api: TestClient, path: str, key: str, **query: Any) -> list[list[Any]]:
    """Every page of a listing, following next_cursor."""
    pages = []
    params = dict(query)
    while True:
        page = ok(api.get(path, params=params))
        pages.append(page[key])
        if page["next_cursor"] is None:
            return pages
        params["cursor"] = page["next_cursor"]


# -- listing clients -------------------------------------------------------------------------
def test_the_cursor_covers_every_client_once_in_order(api: TestClient) -> None:
    names = [f"c{i}" for i in (5, 3, 0, 6, 1, 4, 2)]
    for name in names:
        adapt(api, name)
    adapt(api, "c3")  # a second version: still listed once
    pages = every_page(api, "/v1/clients", "clients", limit=3)
    assert [len(p) for p in pages] == [3, 3, 1]
    listed = [c["client_id"] for page in pages for c in page]
    assert listed == sorted(names)
    c3 = next(c for page in pages for c in page if c["client_id"] == "c3")
    assert c3["current_version"] == 2 and c3["meta_model"] == "sinusoid"
    assert set(c3) == {
        "client_id",
        "current_version",
        "meta_model",
        "meta_model_version",
        "updated_at",
    }
    assert len(every_page(api, "/v1/clients", "clients")[0]) == 7  # default: 50 a page


def test_listing_filters_by_meta_model_and_by_stale_version(
    api: TestClient, session: Session
) -> None:
    for name in ("a", "b", "c"):
        adapt(api, name)
    adapt(api, "p", meta_model="plane", ys=YS)
    listed = ok(api.get("/v1/clients", params={"meta_model": "plane"}))
    assert [c["client_id"] for c in listed["clients"]] == ["p"]
    assert ok(api.get("/v1/clients", params={"stale": "true"}))["clients"] == []
    # b's current version is on an older sha of sinusoid than the one loaded (promoted)
    session.execute(
        update(ClientVersion)
        .where(ClientVersion.client_id == "b")
        .values(meta_model_version="0" * 64)
    )
    stale = ok(api.get("/v1/clients", params={"stale": "true", "limit": 1}))
    assert [c["client_id"] for c in stale["clients"]] == ["b"] and stale["next_cursor"] is None
    both = {"stale": "true", "meta_model": "plane"}
    assert ok(api.get("/v1/clients", params=both))["clients"] == []


def test_bad_page_arguments_are_422_naming_the_field(api: TestClient) -> None:
    adapt(api, "a")
    for params, field in (
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"cursor": "garbage!"}, "cursor"),
        ({"cursor": "WyJ2ZXJzaW9ucyIsMV0"}, "cursor"),  # a versions cursor
    ):
        refused(api.get("/v1/clients", params=params), 422, field)
    refused(api.get("/v1/clients/a/versions", params={"cursor": "WyJjbGllbnRzIiwiYSJd"}), 422)
    assert ok(api.get("/v1/clients", params={"limit": 500}))["next_cursor"] is None


def test_another_tenant_never_sees_the_clients(make_api: ApiFactory, session: Session) -> None:
    api = make_api(auth="required", auth_cache_s=0)

    def key(tenant: str) -> dict[str, str]:
        created = usecases.keys.create(session=session, tenant_id=tenant, scope="client")
        return {"Authorization": f"Bearer {created.token}"}

    acme, other = key("acme"), key("other")
    for name in ("a", "b"):
        adapt(api, name, headers=acme)
    adapt(api, "c", headers=other)
    listed = ok(api.get("/v1/clients", headers=acme, params={"limit": 1}))
    assert [c["client_id"] for c in listed["clients"]] == ["a"]
    # acme's cursor in other's hands still lists only other's clients
    page = {"cursor": listed["next_cursor"]}
    assert [
        c["client_id"] for c in ok(api.get("/v1/clients", headers=other, params=page))["clients"]
    ] == ["c"]
    assert [c["client_id"] for c in ok(api.get("/v1/clients", headers=other))["clients"]] == ["c"]
    refused(api.get("/v1/clients/a/versions", headers=other), 404, "'a'")
    refused(api.post("/v1/clients/a/rollback", headers=other, json={"version": 1}), 404)
    body = {"inputs": [[0.5]], "targets": [0.1]}
    refused(api.post("/v1/clients/a/examples", headers=other, json=body), 404)
    assert api.get("/v1/clients").status_code == 401


# -- listing versions ------------------------------------------------------------------------
def test_versions_newest_first_with_origins(api: TestClient) -> None:
    for _ in range(4):
        adapt(api)
    readapted = ok(api.post("/v1/clients/alice/readaptations", json={"version": 2}), 201)
    assert (readapted["origin"], readapted["source_version"]) == ("readapt", 2)
    pages = every_page(api, "/v1/clients/alice/versions", "versions", limit=2)
    assert [[v["version"] for v in p] for p in pages] == [[5, 4], [3, 2], [1]]
    flat = [v for p in pages for v in p]
    assert [(v["origin"], v["source_version"]) for v in flat] == [("readapt", 2)] + [
        ("adapt", None)
    ] * 4
    first = ok(api.get("/v1/clients/alice/versions"))
    assert (first["client_id"], first["current_version"]) == ("alice", 5)
    history = ok(api.get("/v1/clients/alice"))["versions"]  # the full history says so too
    assert history[-1]["origin"] == "readapt" and history[0]["origin"] == "adapt"
    refused(api.get("/v1/clients/nobody/versions"), 404, "nobody")


# -- rollback --------------------------------------------------------------------------------
def test_rollback_appends_a_copy_that_predicts_as_the_old_version(api: TestClient) -> None:
    adapt(api)
    old = predictions(api)
    adapt(api, ys=[-y for y in YS])
    assert predictions(api) != old
    made = ok(api.post("/v1/clients/alice/rollback", json={"version": 1}), 201)
    assert (made["version"], made["origin"], made["source_version"]) == (3, "rollback", 1)
    v1 = ok(api.get("/v1/clients/alice/versions"))["versions"][-1]
    same = ("meta_model_version", "support_size", "support_loss_after", "labels", "inner_steps")
    assert all(made[k] == v1[k] for k in same)
    misses = ok(api.get("/v1/engine/stats"))["cache"]["misses"]
    assert predictions(api) == old
    assert ok(api.get("/v1/engine/stats"))["cache"]["misses"] == misses  # cached by the rollback
    assert predictions(api, version=3) == old == predictions(api, version=1)
    history = ok(api.get("/v1/clients/alice"))
    assert history["current_version"] == 3
    assert [(v["version"], v["origin"]) for v in history["versions"]] == [
        (1, "adapt"),
        (2, "adapt"),
        (3, "rollback"),
    ]
    # a rollback's support set is the old one: readapting it reproduces version 1's data
    readapted = ok(api.post("/v1/clients/alice/readaptations", json={}), 201)
    assert readapted["source_version"] == 3 and readapted["support_size"] == len(XS)


def test_rollback_to_an_unknown_version_or_client_is_404(api: TestClient) -> None:
    adapt(api)
    refused(api.post("/v1/clients/alice/rollback", json={"version": 9}), 404, "version 9")
    refused(api.post("/v1/clients/bob/rollback", json={"version": 1}), 404, "'bob'")
    for bad in ({"version": 0}, {"version": "1"}, {}, {"version": 1, "extra": 1}):
        assert api.post("/v1/clients/alice/rollback", json=bad).status_code == 422
    assert ok(api.get("/v1/clients/alice"))["current_version"] == 1


# -- retention -------------------------------------------------------------------------------
def test_retention_keeps_exactly_the_newest_versions(make_api: ApiFactory) -> None:
    api = make_api(versions_kept=3)
    for i in range(5):
        adapt(api, ys=[y + i for y in YS])
    kept = ok(api.get("/v1/clients/alice/versions"))
    assert [v["version"] for v in kept["versions"]] == [5, 4, 3]
    assert kept["current_version"] == 5
    assert [v["version"] for v in ok(api.get("/v1/clients/alice"))["versions"]] == [3, 4, 5]
    refused(
        api.post("/v1/clients/alice/predictions", json={"inputs": QUERIES, "version": 2}),
        404,
        "version 2",
    )
    refused(api.get("/v1/clients/alice/predictions", params={"x": 0.5, "version": 1}), 404)
    refused(api.post("/v1/clients/alice/rollback", json={"version": 1}), 404, "version 1")
    third = predictions(api, version=3)
    back = ok(api.post("/v1/clients/alice/rollback", json={"version": 3}), 201)
    assert back["version"] == 6  # numbers are never reused
    assert [v["version"] for v in ok(api.get("/v1/clients/alice/versions"))["versions"]] == [
        6,
        5,
        4,
    ]
    assert predictions(api) == third  # version 3 itself is now pruned; its copy is current
    refused(api.post("/v1/clients/alice/predictions", json={"inputs": QUERIES, "version": 3}), 404)


def test_versions_kept_is_at_least_one(make_api: ApiFactory) -> None:
    with pytest.raises(ValueError, match="versions_kept"):
        make_api(versions_kept=0)


# -- examples --------------------------------------------------------------------------------
def test_examples_equal_adapting_the_combined_set(api: TestClient) -> None:
    body = {"meta_model": "sinusoid", "support": {"inputs": XS[:4], "targets": YS[:4]}}
    ok(api.post("/v1/clients/alice/adaptations", json=body), 201)
    added = {"inputs": XS[4:], "targets": YS[4:]}
    made = ok(api.post("/v1/clients/alice/examples", json=added), 201)
    assert (made["version"], made["origin"], made["source_version"]) == (2, "examples", 1)
    assert made["support_size"] == len(XS)
    direct = adapt(api, "direct")
    assert made["support_loss_after"] == pytest.approx(direct["support_loss_after"], rel=1e-5)
    assert predictions(api) == pytest.approx(predictions(api, "direct"), rel=1e-5, abs=1e-6)
    # the new version's support set is the combined one: readapting it changes nothing
    again = ok(api.post("/v1/clients/alice/readaptations", json={}), 201)
    assert again["support_size"] == len(XS)


def test_examples_are_validated_and_bounded(make_api: ApiFactory) -> None:
    api = make_api(max_support=6)
    adapt(api)  # 6 points: the limit
    one = {"inputs": [[0.5]], "targets": [0.1]}
    refused(api.post("/v1/clients/alice/examples", json=one), 422, "inputs", "limit of 6")
    refused(api.post("/v1/clients/bob/examples", json=one), 404, "'bob'")
    roomy = make_api(max_support=10)
    for body, field in (
        ({"inputs": [[0.5]], "targets": ["label"]}, "targets[0]"),
        ({"inputs": [[0.5], [0.5, 1.0]], "targets": [1.0, 2.0]}, "inputs[1]"),
        ({"inputs": [[0.5]], "targets": [1.0, 2.0]}, "targets"),
        ({"inputs": [], "targets": []}, "inputs"),
        ({"inputs": [[0.5]], "targets": [1.0], "inner_steps": 0}, "inner_steps"),
    ):
        response = roomy.post("/v1/clients/alice/examples", json=body)
        refused(response, 422, field)
        assert response.json()["error"]["message"].startswith(field), response.text
    assert ok(roomy.get("/v1/clients/alice"))["current_version"] == 1


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("blobs")
    save(
        root,
        "blobs",
        "tabular",
        {"kind": "mlp", "in_features": 2, "hidden": [16], "out_features": 3},
        {"kind": "classification", "input_shape": [2], "max_way": 3},
        InnerLoopConfig(steps=20, lr=0.5),
    )
    return root


def test_examples_may_add_labels_within_max_way(make_api: ApiFactory, classifier_dir: Path) -> None:
    api = make_api(models_dir=classifier_dir)
    support = {"inputs": [[0.0, 0.0], [3.0, 3.0]], "targets": ["x", "y"]}
    body = {"meta_model": "blobs", "support": support}
    ok(api.post("/v1/clients/ann/adaptations", json=body), 201)
    grown = {"inputs": [[-3.0, 3.0], [0.1, 0.0]], "targets": ["z", "x"]}
    made = ok(api.post("/v1/clients/ann/examples", json=grown), 201)
    assert made["labels"] == ["x", "y", "z"] and made["support_size"] == 4
    fourth = {"inputs": [[5.0, -5.0]], "targets": ["w"]}
    refused(api.post("/v1/clients/ann/examples", json=fourth), 422, "targets", "at most 3")
