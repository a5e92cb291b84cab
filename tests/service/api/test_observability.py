"""Metrics, request ids and access logs, in process on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from service import usecases
from service.api.deps import get_sessions, get_tenant
from service.app import create_app
from service.errors import Unavailable
from service.settings import Settings
from tests.service.conftest import ApiFactory

ADAPT = "/v1/clients/{}/adaptations"
PREDICT = "/v1/clients/{}/predictions"
SUPPORT = {"inputs": [[-1.0], [0.25], [1.5]], "targets": [0.5, 0.125, -0.75]}
ADAPTATION = {"meta_model": "sinusoid", "support": SUPPORT, "inner_steps": 3}
PREDICT_ROUTE = "/v1/clients/{client_id}/predictions"
ADAPT_ROUTE = "/v1/clients/{client_id}/adaptations"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(api: TestClient) -> tuple[set[str], Samples]:
    """The families' names and every sample, by (sample name, labels)."""
    response = api.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(response.text))
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    return {f.name for f in families}, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests(samples: Samples, route: str, method: str, status: int) -> float:
    return value(
        samples, "fastadapt_http_requests_total", route=route, method=method, status=str(status)
    )


def adapt(api: TestClient, client_id: str, **headers: str) -> Any:
    response = api.post(ADAPT.format(client_id), json=ADAPTATION, headers=headers)
    assert response.status_code == 201, response.text
    return response


# -- /metrics --------------------------------------------------------------------------------
def test_metrics_families_follow_the_conventions_and_counts_move(make_api: ApiFactory) -> None:
    api = make_api(metrics_census_s=0)
    names, before = scrape(api)
    assert {
        "fastadapt_http_requests",  # the parser drops a counter's _total from its family
        "fastadapt_http_request_duration_seconds",
        "fastadapt_adaptation_seconds",
        "fastadapt_inner_loop_seconds",
        "fastadapt_engine_batch_size",
        "fastadapt_engine_queue_depth",
        "fastadapt_cache_hits",
        "fastadapt_cache_misses",
        "fastadapt_cache_evictions",
        "fastadapt_cache_bytes",
        "fastadapt_stored_clients",
        "fastadapt_stored_versions",
    } <= names
    assert all(name.startswith("fastadapt_") for name in names)
    assert value(before, "fastadapt_stored_clients", meta_model="sinusoid") == 0

    adapt(api, "alice")
    adapt(api, "alice")
    adapt(api, "bob")
    for client_id in ("alice", "bob"):
        response = api.post(PREDICT.format(client_id), json={"inputs": [[0.5]]})
        assert response.status_code == 200, response.text
    assert api.get(PREDICT.format("alice"), params={"x": [0.5]}).status_code == 200
    assert api.post(PREDICT.format("nobody"), json={"inputs": [[0.5]]}).status_code == 404
    _, after = scrape(api)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert (
        requests(after, ADAPT_ROUTE, "POST", 201) - requests(before, ADAPT_ROUTE, "POST", 201) == 3
    )
    assert requests(after, PREDICT_ROUTE, "POST", 200) == 2
    assert requests(after, PREDICT_ROUTE, "GET", 200) == 1
    assert requests(after, PREDICT_ROUTE, "POST", 404) == 1
    assert requests(after, "/metrics", "GET", 200) >= 1  # the first scrape
    latency = "fastadapt_http_request_duration_seconds_count"
    assert moved(latency, route=PREDICT_ROUTE, method="POST") == 3
    assert value(after, "fastadapt_http_request_duration_seconds_bucket",
                 route=PREDICT_ROUTE, method="POST", le="+Inf") == 3  # fmt: skip
    assert moved("fastadapt_adaptation_seconds_count", meta_model="sinusoid") == 3
    assert 1 <= moved("fastadapt_inner_loop_seconds_count", meta_model="sinusoid") <= 3
    assert moved("fastadapt_engine_batch_size_sum", kind="adapt") == 3
    assert moved("fastadapt_engine_batch_size_sum", kind="predict") >= 3
    assert value(after, "fastadapt_engine_batch_size_bucket", kind="adapt", le="1") >= 1
    assert value(after, "fastadapt_engine_queue_depth") == 0
    assert moved("fastadapt_cache_hits_total") == 3  # adapted versions are cached when stored
    assert value(after, "fastadapt_cache_bytes") > 0
    assert "fastadapt_cache_evictions_total" in {name for name, _ in after}
    assert value(after, "fastadapt_stored_clients", meta_model="sinusoid") == 2
    assert value(after, "fastadapt_stored_versions", meta_model="sinusoid") == 3
    assert value(after, "fastadapt_stored_clients", meta_model="plane") == 0  # loaded, unused


def test_routes_are_labelled_by_template_never_by_path(make_api: ApiFactory) -> None:
    api = make_api()
    for client_id in ("alice", "bob", "carol"):
        api.get(f"/v1/clients/{client_id}")  # 404s of a matched route
    api.get("/no/such/path/alice")
    api.delete("/v1/meta-models/sinusoid")  # 405
    _, samples = scrape(api)
    routes = {dict(labels)["route"] for name, labels in samples if "route" in dict(labels)}
    assert not any("alice" in route or "bob" in route for route in routes)
    assert requests(samples, "/v1/clients/{client_id}", "GET", 404) == 3
    assert requests(samples, "unmatched", "GET", 404) == 1
    assert requests(samples, "/v1/meta-models/{name}", "DELETE", 405) == 1


def test_every_app_has_its_own_registry(make_api: ApiFactory) -> None:
    first, second = make_api(), make_api()
    first.get("/v1/meta-models")
    first.get("/v1/meta-models")
    second.get("/v1/meta-models")
    for api, count in ((first, 2), (second, 1)):
        _, samples = scrape(api)
        assert requests(samples, "/v1/meta-models", "GET", 200) == count


def test_metrics_can_be_turned_off(make_api: ApiFactory) -> None:
    api = make_api(metrics=False)
    assert api.get("/metrics").status_code == 404
    assert "/metrics" not in api.get("/openapi.json").json()["paths"]


def test_the_stored_counts_are_reused_for_a_while(make_api: ApiFactory) -> None:
    api = make_api(metrics_census_s=3600)
    _, before = scrape(api)
    adapt(api, "alice")
    _, after = scrape(api)
    assert value(before, "fastadapt_stored_clients", meta_model="sinusoid") == 0
    assert value(after, "fastadapt_stored_clients", meta_model="sinusoid") == 0  # not recounted


def test_a_failed_count_leaves_the_rest_of_the_metrics(
    make_api: ApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(*, session: Session) -> list[usecases.census.Stored]:
        raise Unavailable("the database is unreachable (OperationalError)")

    monkeypatch.setattr(usecases.census, "count", down)
    names, _ = scrape(make_api(metrics_census_s=0))
    assert "fastadapt_stored_clients" not in names
    assert "fastadapt_http_requests" in names and "fastadapt_cache_hits" in names


def test_openmetrics_when_asked(make_api: ApiFactory) -> None:
    response = make_api().get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


# -- X-Request-ID ----------------------------------------------------------------------------
@pytest.fixture
def own_app(
    tmp_path: Path, models_dir: Path, database_url: str, session: Session
) -> Callable[..., FastAPI]:
    """Apps on the test's transaction, for TestClients made here (``make_api``'s re-raise
    a 500's exception)."""

    def build(**overrides: Any) -> FastAPI:
        values: dict[str, Any] = {"models_dir": models_dir, "database_url": database_url}
        app = create_app(Settings(data_dir=tmp_path, threads=1, **values, **overrides))
        app.dependency_overrides[get_sessions] = lambda: lambda: nullcontext(session)
        return app

    return build


@pytest.fixture
def fragile_api(
    own_app: Callable[..., FastAPI], monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    """An API whose meta-model listing raises (a 500), not re-raised into the test."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(usecases.meta_models, "list_all", broken)
    with TestClient(own_app(), raise_server_exceptions=False) as client:
        yield client


def test_every_answer_carries_a_request_id(make_api: ApiFactory) -> None:
    api = make_api(max_body_bytes=1024)
    answers = {
        201: api.post(ADAPT.format("alice"), json=ADAPTATION),
        200: api.get("/v1/meta-models"),
        404: api.get("/v1/clients/nobody"),
        422: api.post(ADAPT.format("alice"), json={"meta_model": "nope"}),
        413: api.post(ADAPT.format("alice"), content=b"[" * 2048),
        405: api.put("/v1/clients/alice"),
    }
    unknown_path = api.get("/no/such/path")
    assert unknown_path.status_code == 404
    ids = set()
    for status, response in [*answers.items(), (404, unknown_path)]:
        assert response.status_code == status, response.text
        request_id = response.headers["x-request-id"]
        assert len(request_id) == 32 and request_id not in ids
        ids.add(request_id)
        if status >= 400:
            assert response.json()["error"]["request_id"] == request_id


def test_a_500_carries_its_request_id_and_is_counted(fragile_api: TestClient) -> None:
    response = fragile_api.get("/v1/meta-models", headers={"X-Request-ID": "trace-500"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "trace-500"
    assert response.json() == {
        "error": {"type": "internal", "message": "internal server error", "request_id": "trace-500"}
    }
    _, samples = scrape(fragile_api)
    assert requests(samples, "/v1/meta-models", "GET", 500) == 1


@pytest.mark.parametrize(
    "sent", ["abc", "0f8fad5b-d9cb-469f-a165-70867728950e", "a.b:c_d-e", "x" * 128]
)
def test_a_sane_caller_id_is_echoed(make_api: ApiFactory, sent: str) -> None:
    api = make_api()
    for response in (
        api.get("/v1/meta-models", headers={"X-Request-ID": sent}),
        api.get("/v1/clients/nobody", headers={"X-Request-ID": sent}),
    ):
        assert response.headers["x-request-id"] == sent
    assert response.json()["error"]["request_id"] == sent


@pytest.mark.parametrize(
    "sent", ["", "x" * 129, "has space", "semi;colon", "new\\nline", "é", "<script>", "a/b"]
)
def test_an_insane_caller_id_is_replaced(make_api: ApiFactory, sent: str) -> None:
    response = make_api().get("/v1/clients/nobody", headers={"X-Request-ID": sent.encode()})
    request_id = response.headers["x-request-id"]
    assert request_id != sent and len(request_id) == 32 and request_id.isalnum()
    assert response.json()["error"]["request_id"] == request_id


def test_the_error_schema_documents_the_request_id(make_api: ApiFactory) -> None:
    schemas = make_api().get("/openapi.json").json()["components"]["schemas"]
    assert "request_id" in schemas["ErrorDetail"]["properties"]


# -- the access log --------------------------------------------------------------------------
ACCESS_FIELDS = {"time", "request_id", "tenant", "method", "route", "status", "duration_ms"}


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "fastadapt.access"]


def test_one_json_line_per_request(make_api: ApiFactory, caplog: pytest.LogCaptureFixture) -> None:
    api = make_api(max_body_bytes=1024)
    caplog.set_level(logging.INFO, logger="fastadapt.access")
    responses = [
        api.post(ADAPT.format("alice"), json=ADAPTATION),
        api.get(PREDICT.format("alice"), params={"x": [0.5]}, headers={"X-Request-ID": "r-1"}),
        api.get("/v1/clients/nobody"),
        api.post(ADAPT.format("alice"), content=b"[" * 2048),
        api.get("/no/such/path"),
    ]
    lines = access_lines(caplog)
    assert len(lines) == len(responses)
    # /v1 routes on loopback without a key: the open principal's tenant; the 413 (refused
    # before routing) and the unknown path ran no auth dependency
    tenants = ["default", "default", "default", None, None]
    for line, response, tenant in zip(lines, responses, tenants, strict=True):
        assert set(line) == ACCESS_FIELDS
        assert line["request_id"] == response.headers["x-request-id"]
        assert line["status"] == response.status_code
        assert line["tenant"] == tenant
        assert line["duration_ms"] >= 0 and line["time"].endswith("+00:00")
    assert [(line["method"], line["route"]) for line in lines] == [
        ("POST", ADAPT_ROUTE),
        ("GET", PREDICT_ROUTE),
        ("GET", "/v1/clients/{client_id}"),
        ("POST", ADAPT_ROUTE),
        ("GET", "unmatched"),
    ]
    assert lines[1]["request_id"] == "r-1"


def test_the_tenant_comes_from_the_auth_dependency(
    make_api: ApiFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async def tenant(request: Request) -> str:  # as the auth dependency does it
        request.state.tenant_id = "acme"
        return "acme"

    api = make_api()
    api.app.dependency_overrides[get_tenant] = tenant  # type: ignore[attr-defined]
    caplog.set_level(logging.INFO, logger="fastadapt.access")
    api.get("/v1/clients/nobody")
    api.get("/v1/meta-models")  # no tenant dependency: the open principal's, on loopback
    api.get("/healthz")  # no auth dependency at all
    assert [line["tenant"] for line in access_lines(caplog)] == ["acme", "default", None]


def test_nothing_secret_reaches_the_log(
    make_api: ApiFactory, caplog: pytest.LogCaptureFixture
) -> None:
    api = make_api()
    caplog.set_level(logging.DEBUG)
    token = "fa_secret_0123456789abcdef0123456789abcdef"
    support = {"inputs": [[-1.23456789], [2.34567891]], "targets": [3.45678912, -4.56789123]}
    headers = {"Authorization": f"Bearer {token}", "X-Custom": "header-value-7777"}
    body = {"meta_model": "sinusoid", "support": support}
    api.post(ADAPT.format("alice"), json=body, headers=headers)
    api.post(ADAPT.format("alice"), json={**body, "inner_lr": -5.67891234}, headers=headers)
    api.get(PREDICT.format("alice"), params={"x": [6.78912345]}, headers=headers)
    api.post(PREDICT.format("alice"), json={"inputs": [[7.89123456]]}, headers=headers)
    server_side = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in server_side)
    assert len(access_lines(caplog)) == 4
    for secret in (token, "header-value-7777", "1.23456789", "2.34567891", "3.45678912",
                   "4.56789123", "5.67891234", "6.78912345", "7.89123456", "x="):  # fmt: skip
        assert secret not in logged


def test_the_access_log_can_be_turned_off(
    make_api: ApiFactory, caplog: pytest.LogCaptureFixture
) -> None:
    api = make_api(access_log=False)
    caplog.set_level(logging.INFO, logger="fastadapt.access")
    api.get("/v1/meta-models")
    assert access_lines(caplog) == []


def test_without_metrics_and_log_ids_remain(own_app: Callable[..., FastAPI]) -> None:
    with TestClient(own_app(metrics=False, access_log=False)) as api:
        response = api.get("/v1/clients/nobody", headers={"X-Request-ID": "kept"})
    assert response.headers["x-request-id"] == "kept"
    assert response.json()["error"]["request_id"] == "kept"
