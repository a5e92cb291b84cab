"""Tenants and API keys through the API, on SQLite and PostgreSQL: 401 / 403 / 404 / 429,
client ids scoped to the tenant, the keys routes, and keys kept out of the logs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service import usecases
from service.auth import Principal, new_token

XS = [[-4.0], [-2.5], [-1.0], [0.0], [1.5], [3.0]]
YS = [0.7, -0.5, -1.6, -0.9, 1.2, 0.3]
BODY = {"meta_model": "sinusoid", "support": {"inputs": XS, "targets": YS}}

KeyFactory = Callable[..., dict[str, str]]


@pytest.fixture
def secure_api(make_api: Any) -> TestClient:
    """An app that requires keys (as on a public address, or with FASTADAPT_AUTH=required)."""
    api: TestClient = make_api(auth="required", auth_cache_s=0)
    return api


@pytest.fixture
def key(session: Session) -> KeyFactory:
    """A new key of ``tenant`` with ``scope``, as request headers."""

    def make(tenant: str = "acme", scope: str = "client") -> dict[str, str]:
        created = usecases.keys.create(session=session, tenant_id=tenant, scope=scope)
        return {"Authorization": f"Bearer {created.token}"}

    return make


def key_id(session: Session, headers: dict[str, str]) -> str:
    token = headers["Authorization"].removeprefix("Bearer ")
    principal = usecases.keys.authenticate(session=session, token=token)
    assert principal.key_id is not None
    return principal.key_id


def adapt(api: TestClient, headers: dict[str, str], client_id: str, ys: list[float]) -> Any:
    body = {"meta_model": "sinusoid", "support": {"inputs": XS, "targets": ys}}
    response = api.post(f"/v1/clients/{client_id}/adaptations", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def assert_unauthorized(response: Any) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["type"] == "unauthorized"


def test_a_loopback_server_serves_without_keys_as_the_default_tenant(
    api: TestClient, key: KeyFactory
) -> None:
    response = api.post("/v1/clients/alice/adaptations", json=BODY)
    assert response.status_code == 201, response.text
    assert api.get("/v1/keys").status_code == 200  # everyone is the default tenant's admin
    # a key, when sent, still counts: its tenant, its scope; a bad one is refused
    acme = key("acme")
    assert api.get("/v1/clients/alice", headers=acme).status_code == 404
    assert api.get("/v1/keys", headers=acme).status_code == 403
    assert_unauthorized(api.get("/v1/clients/alice", headers={"Authorization": "Bearer x"}))
    assert api.get("/v1/clients/alice").status_code == 200


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer not-a-key", "bearer fa_x"],
)
def test_a_missing_or_malformed_key_is_401(
    secure_api: TestClient, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in [("GET", "/v1/meta-models"), ("GET", "/v1/clients/alice")]:
        assert_unauthorized(secure_api.request(method, path, headers=headers))
    response = secure_api.post("/v1/clients/alice/adaptations", json=BODY, headers=headers)
    assert_unauthorized(response)


def test_an_unknown_key_is_401(secure_api: TestClient) -> None:
    headers = {"Authorization": f"Bearer {new_token()}"}
    assert_unauthorized(secure_api.get("/v1/meta-models", headers=headers))


def test_a_revoked_key_is_401(secure_api: TestClient, key: KeyFactory, session: Session) -> None:
    headers = key("acme")
    assert secure_api.get("/v1/meta-models", headers=headers).status_code == 200
    usecases.keys.revoke(session=session, key_id=key_id(session, headers))
    assert_unauthorized(secure_api.get("/v1/meta-models", headers=headers))


def test_probes_and_docs_stay_open(secure_api: TestClient) -> None:
    assert secure_api.get("/healthz").status_code == 200
    assert secure_api.get("/readyz").status_code == 200
    assert secure_api.get("/openapi.json").status_code == 200


def test_every_v1_route_needs_a_key(secure_api: TestClient) -> None:
    paths = secure_api.get("/openapi.json").json()["paths"]
    v1 = [(m, p) for p, operations in paths.items() for m in operations if p.startswith("/v1/")]
    assert len(v1) >= 12
    for method, template in v1:
        path = template.replace("{client_id}", "alice").replace("{name}", "sinusoid")
        path = path.replace("{key_id}", "key_0123456789abcdef")
        assert_unauthorized(secure_api.request(method.upper(), path))


def test_two_tenants_have_their_own_clients_of_the_same_id(
    secure_api: TestClient, key: KeyFactory
) -> None:
    acme, globex = key("acme"), key("globex")
    mine = adapt(secure_api, acme, "alice", YS)
    adapt(secure_api, acme, "alice", YS)  # acme's alice: versions 1 and 2
    theirs = adapt(secure_api, globex, "alice", [-y for y in YS])  # globex's: version 1
    assert (mine["version"], theirs["version"]) == (1, 1)
    history = {
        name: secure_api.get("/v1/clients/alice", headers=headers).json()
        for name, headers in (("acme", acme), ("globex", globex))
    }
    assert [v["version"] for v in history["acme"]["versions"]] == [1, 2]
    assert [v["version"] for v in history["globex"]["versions"]] == [1]
    query = {"inputs": [[0.5], [2.0]]}
    a = secure_api.post("/v1/clients/alice/predictions", json=query, headers=acme).json()
    b = secure_api.post("/v1/clients/alice/predictions", json=query, headers=globex).json()
    assert a["predictions"] != b["predictions"]
    # deleting globex's alice leaves acme's
    assert secure_api.delete("/v1/clients/alice", headers=globex).status_code == 204
    assert secure_api.get("/v1/clients/alice", headers=acme).status_code == 200


def test_another_tenants_client_is_the_same_404_as_one_that_never_existed(
    secure_api: TestClient, key: KeyFactory
) -> None:
    acme, globex = key("acme"), key("globex")
    adapt(secure_api, acme, "alice", YS)
    requests: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", "/v1/clients/{id}", None),
        ("GET", "/v1/clients/{id}/predictions?x=0.5", None),
        ("POST", "/v1/clients/{id}/predictions", {"inputs": [[0.5]]}),
        ("POST", "/v1/clients/{id}/predictions", {"inputs": [[0.5]], "version": 1}),
        ("POST", "/v1/clients/{id}/readaptations", None),
        ("DELETE", "/v1/clients/{id}", None),
    ]
    for method, path, body in requests:
        seen = []
        for client_id in ("alice", "nobody"):
            response = secure_api.request(
                method, path.format(id=client_id), json=body, headers=globex
            )
            assert response.status_code == 404, (method, path, response.text)
            seen.append(response.json()["error"]["message"].replace(client_id, "X"))
        assert seen[0] == seen[1], (method, path)
    assert secure_api.get("/v1/clients/alice", headers=acme).status_code == 200  # untouched


def test_a_client_key_may_not_manage_keys(secure_api: TestClient, key: KeyFactory) -> None:
    client = key("acme", "client")
    for method, path in [
        ("GET", "/v1/keys"),
        ("POST", "/v1/keys"),
        ("DELETE", "/v1/keys/key_0123456789abcdef"),
        ("GET", "/v1/engine/stats"),
    ]:
        response = secure_api.request(method, path, headers=client, json={})
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["error"]["type"] == "forbidden"
    assert secure_api.get("/v1/meta-models", headers=client).status_code == 200


def test_an_admin_manages_its_own_tenants_keys_only(
    secure_api: TestClient, key: KeyFactory, session: Session
) -> None:
    admin, other = key("acme", "admin"), key("globex", "admin")
    response = secure_api.post("/v1/keys", json={"scope": "client"}, headers=admin)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["tenant_id"] == "acme" and created["scope"] == "client"
    assert created["revoked_at"] is None and created["key"].startswith("fa_")
    new = {"Authorization": f"Bearer {created['key']}"}
    assert secure_api.get("/v1/meta-models", headers=new).status_code == 200

    listed = secure_api.get("/v1/keys", headers=admin).json()["keys"]
    assert {k["id"] for k in listed} == {key_id(session, admin), created["id"]}
    assert all("key" not in k and "key_hash" not in k for k in listed)
    assert created["key"] not in str(listed)
    theirs = secure_api.get("/v1/keys", headers=other).json()["keys"]
    assert [k["id"] for k in theirs] == [key_id(session, other)]

    # another tenant's key is unknown; one's own is revoked, and stays listed
    assert secure_api.delete(f"/v1/keys/{created['id']}", headers=other).status_code == 404
    assert secure_api.get("/v1/meta-models", headers=new).status_code == 200
    assert secure_api.delete(f"/v1/keys/{created['id']}", headers=admin).status_code == 204
    assert secure_api.delete(f"/v1/keys/{created['id']}", headers=admin).status_code == 204
    assert_unauthorized(secure_api.get("/v1/meta-models", headers=new))
    listed = secure_api.get("/v1/keys", headers=admin).json()["keys"]
    assert [k["revoked_at"] is not None for k in listed if k["id"] == created["id"]] == [True]
    assert secure_api.post("/v1/keys", json={"scope": "root"}, headers=admin).status_code == 422
    assert secure_api.delete("/v1/keys/bogus", headers=admin).status_code == 422


def test_over_the_rate_limit_is_429_with_retry_after(make_api: Any, key: KeyFactory) -> None:
    api = make_api(auth="required", rate_limit_rps=0.2, rate_limit_burst=3)
    acme, globex = key("acme"), key("globex")
    for _ in range(3):
        assert api.get("/v1/meta-models", headers=acme).status_code == 200
    response = api.get("/v1/clients/alice", headers=acme)
    assert response.status_code == 429, response.text
    assert response.json()["error"]["type"] == "rate_limited"
    assert 1 <= int(response.headers["retry-after"]) <= 5  # 1 token at 0.2/s, rounded up
    assert api.get("/v1/meta-models", headers=globex).status_code == 200  # per tenant
    assert api.get("/healthz").status_code == 200  # probes are not limited


def test_the_rate_limit_applies_without_keys_too(make_api: Any) -> None:
    api = make_api(rate_limit_rps=0.2, rate_limit_burst=1)
    assert api.get("/v1/meta-models").status_code == 200
    assert api.get("/v1/meta-models").status_code == 429


def test_a_trusted_key_is_rechecked_after_auth_cache_s(
    make_api: Any, key: KeyFactory, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = make_api(auth="required", auth_cache_s=2.0)
    guard = api.app.state.guard  # type: ignore[attr-defined]
    now = [1000.0]
    monkeypatch.setattr(guard.keys, "clock", lambda: now[0])
    headers = key("acme")
    assert api.get("/v1/meta-models", headers=headers).status_code == 200
    usecases.keys.revoke(session=session, key_id=key_id(session, headers))
    now[0] += 1.9
    assert api.get("/v1/meta-models", headers=headers).status_code == 200  # still trusted
    now[0] += 0.2
    assert_unauthorized(api.get("/v1/meta-models", headers=headers))


def test_requests_that_miss_the_key_cache_together_share_one_lookup(
    make_api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a busy key's cache entry expires, its concurrent requests wait for one
    database lookup instead of each making their own."""
    api = make_api(auth="required", auth_cache_s=2.0)
    looked_up: list[str] = []

    def slow_lookup(*, session: Session, token: str) -> Principal:
        looked_up.append(token)
        time.sleep(0.3)  # long enough for every request to arrive meanwhile
        return Principal(tenant_id="acme", scope="client", key_id="k1")

    monkeypatch.setattr(usecases.keys, "authenticate", slow_lookup)
    headers = {"Authorization": f"Bearer {new_token()}"}
    with ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(lambda _: api.get("/v1/meta-models", headers=headers).status_code, range(8))
        )
    assert statuses == [200] * 8
    assert len(looked_up) == 1


def test_openapi_declares_the_bearer_scheme_on_v1_and_metrics_only(secure_api: TestClient) -> None:
    document = secure_api.get("/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["ApiKey"]["description"],
    }
    for path, operations in document["paths"].items():
        for operation in operations.values():
            secured = operation.get("security") == [{"ApiKey": []}]
            assert secured == (path.startswith("/v1/") or path == "/metrics"), path
            if secured:
                assert "401" in operation["responses"], path


def test_neither_keys_nor_support_sets_reach_the_logs(
    secure_api: TestClient, key: KeyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    admin = key("acme", "admin")
    token = admin["Authorization"].removeprefix("Bearer ")
    secret_ys = [0.123456789, -0.987654321, 0.55555551, -0.4444441, 0.31415926, -0.2718281]
    adapt(secure_api, admin, "alice", secret_ys)
    created = secure_api.post("/v1/keys", json={}, headers=admin).json()["key"]
    secure_api.get("/v1/keys", headers=admin)
    wrong = "fa_" + token[3:-1] + ("A" if token[-1] != "A" else "B")
    secure_api.get("/v1/meta-models", headers={"Authorization": f"Bearer {wrong}"})
    secure_api.get("/v1/meta-models", headers={"Authorization": "Bearer garbage-secret"})
    secure_api.post("/v1/clients/..bad/adaptations", json=BODY, headers=admin)
    logged = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    for secret in (token, created, wrong, "garbage-secret", *map(str, secret_ys)):
        assert secret not in logged
