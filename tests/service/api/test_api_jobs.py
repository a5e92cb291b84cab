"""The reconcile routes, on SQLite and PostgreSQL: 202 with the job, progress, cancel,
admin scope (403), another tenant's job unknown (404), one job per meta-model at a time
(409), and the error body naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from service import usecases
from service.store.tables import ClientVersion

XS = [[-3.0], [-1.0], [0.5], [2.0]]
YS = [0.3, -1.1, 0.9, 1.7]
OLD_SHA = "0" * 64


@pytest.fixture
def api(make_api: Any) -> TestClient:
    client: TestClient = make_api(auth="required", auth_cache_s=0, reconcile_rate=0)
    return client


def headers(session: Session, tenant: str, scope: str) -> dict[str, str]:
    created = usecases.keys.create(session=session, tenant_id=tenant, scope=scope)
    return {"Authorization": f"Bearer {created.token}"}


def stale_client(api: TestClient, session: Session, who: dict[str, str], client_id: str) -> None:
    """A client adapted now, then marked as adapted from an older sinusoid."""
    body = {"meta_model": "sinusoid", "support": {"inputs": XS, "targets": YS}}
    response = api.post(f"/v1/clients/{client_id}/adaptations", json=body, headers=who)
    assert response.status_code == 201, response.text
    session.execute(
        update(ClientVersion)
        .where(ClientVersion.client_id == client_id)
        .values(meta_model_version=OLD_SHA)
    )
    session.commit()  # (a savepoint: the test's transaction is still rolled back)


def test_start_watch_and_cancel_a_job(api: TestClient, session: Session) -> None:
    admin = headers(session, "acme", "admin")
    user = headers(session, "acme", "client")
    stranger = headers(session, "other", "admin")
    for client_id in ("a", "b"):
        stale_client(api, session, admin, client_id)

    refused = api.post("/v1/meta-models/sinusoid/reconcile", headers=user)
    assert refused.status_code == 403, refused.text
    assert api.post("/v1/meta-models/nope/reconcile", headers=admin).status_code == 404
    started = api.post("/v1/meta-models/sinusoid/reconcile", headers=admin)
    assert started.status_code == 202, started.text
    job = started.json()
    assert {k: job[k] for k in ("kind", "meta_model", "state", "total", "done", "failed")} == {
        "kind": "reconcile",
        "meta_model": "sinusoid",
        "state": "queued",
        "total": 2,
        "done": 0,
        "failed": 0,
    }
    assert job["problems"] == [] and job["rate"] is None and job["eta_s"] is None
    again = api.post("/v1/meta-models/sinusoid/reconcile", headers=admin)
    assert again.status_code == 409 and job["id"] in again.json()["error"]["message"]

    watched = api.get(f"/v1/jobs/{job['id']}", headers=user)  # any key of the tenant
    assert watched.status_code == 200 and watched.json()["total"] == 2
    assert api.get(f"/v1/jobs/{job['id']}", headers=stranger).status_code == 404
    assert api.post(f"/v1/jobs/{job['id']}/cancel", headers=stranger).status_code == 404
    assert api.post(f"/v1/jobs/{job['id']}/cancel", headers=user).status_code == 403
    bad = api.get("/v1/jobs/not-a-job", headers=user)
    assert bad.status_code == 422 and "job_id" in bad.text

    cancelled = api.post(f"/v1/jobs/{job['id']}/cancel", headers=admin)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled" and cancelled.json()["eta_s"] == 0.0
    assert api.post(f"/v1/jobs/{job['id']}/cancel", headers=admin).json()["state"] == "cancelled"
    # nothing stale for another tenant; a new job once the first is cancelled
    empty = api.post("/v1/meta-models/sinusoid/reconcile", headers=stranger).json()
    assert (empty["state"], empty["total"], empty["eta_s"]) == ("done", 0, 0.0)
    assert api.post(f"/v1/jobs/{empty['id']}/cancel", headers=stranger).status_code == 409
    assert api.post("/v1/meta-models/sinusoid/reconcile", headers=admin).status_code == 202


def test_the_routes_are_documented(api: TestClient) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    start = paths["/v1/meta-models/{name}/reconcile"]["post"]["responses"]
    assert {"202", "401", "403", "404", "409", "503"} <= set(start)
    assert {"200", "404", "422"} <= set(paths["/v1/jobs/{job_id}"]["get"]["responses"])
    assert {"200", "403", "404", "409"} <= set(
        paths["/v1/jobs/{job_id}/cancel"]["post"]["responses"]
    )
