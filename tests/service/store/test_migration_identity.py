"""Migration 0006: versions stored before it get fresh, distinct uids; keys are unique
per tenant afterwards."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from service.store import migrate
from service.store.session import connect
from tests.service.store_fixtures import BACKENDS, Databases

VERSION = (
    "INSERT INTO client_versions (tenant_id, client_id, version, meta_model, "
    "meta_model_version, params, support_inputs, support_targets, support_size, inner_steps, "
    "support_loss_before, support_loss_after, adapt_ms, created_at) VALUES "
    "('t', :c, :v, 'sinusoid', 'abc', :p, '[]', '[]', 0, 1, 1.0, 0.5, 1.0, :now)"
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_existing_versions_get_distinct_uids(
    backend: str, databases: Databases, request: pytest.FixtureRequest
) -> None:
    url = databases.new(backend, request)
    migrate.upgrade(url, "0003")
    engine = connect(url)
    now = "2026-01-01 00:00:00+00:00"
    with engine.begin() as connection:
        for client, count in (("a", 3), ("b", 2)):
            connection.execute(
                text(
                    "INSERT INTO clients (tenant_id, client_id, current_version, created_at, "
                    "updated_at) VALUES ('t', :c, :n, :now, :now)"
                ),
                {"c": client, "n": count, "now": now},
            )
            for v in range(1, count + 1):
                connection.execute(text(VERSION), {"c": client, "v": v, "p": b"x", "now": now})
    migrate.upgrade(url, "0006")
    with engine.connect() as connection:
        uids = connection.execute(text("SELECT uid FROM client_versions")).scalars().all()
        assert len(uids) == 5 and len(set(uids)) == 5
        assert all(len(u) == 32 and int(u, 16) >= 0 for u in uids)
    with engine.begin() as connection:
        stamp = (
            "UPDATE client_versions SET idempotency_key = 'k' WHERE client_id = :c AND version = 1"
        )
        connection.execute(text(stamp), {"c": "a"})
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(text(stamp), {"c": "b"})  # the same key twice in one tenant
    engine.dispose()
