"""Retention, origins, listings and "never resurrect" in the repository, on SQLite and
PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.errors import NotFound
from service.store import repository
from service.store.tables import ClientVersion
from tests.service.store.test_store import append, new_version


def stored(session: Session, client_id: str, tenant_id: str = "default") -> list[int]:
    stmt = (
        select(ClientVersion.version)
        .where(ClientVersion.tenant_id == tenant_id, ClientVersion.client_id == client_id)
        .order_by(ClientVersion.version)
    )
    return list(session.scalars(stmt))


def test_one_group_prunes_every_client_to_its_newest_versions(session: Session) -> None:
    for _ in range(3):
        append(session, new_version("carol"))
    rows = [new_version(c) for c in ("alice",) * 5 + ("bob",) * 2 + ("carol",)]
    repository.append_versions(session=session, rows=rows, keep=2)
    session.commit()
    assert stored(session, "alice") == [4, 5]
    assert stored(session, "bob") == [1, 2]  # fewer than keep: all of them
    assert stored(session, "carol") == [3, 4]
    for client, current in (("alice", 5), ("bob", 2), ("carol", 4)):  # the newest is current
        found = repository.get_version(session=session, tenant_id="default", client_id=client)
        assert found is not None and found.version == current


def test_keep_one_keeps_only_the_current_version(session: Session) -> None:
    for _ in range(3):
        repository.append_versions(session=session, rows=[new_version()], keep=1)
    assert stored(session, "alice") == [3]
    with pytest.raises(ValueError, match="keep"):
        repository.append_versions(session=session, rows=[new_version()], keep=0)


def test_origin_defaults_to_adapt_and_records_the_source(session: Session) -> None:
    first = append(session, new_version())
    copy = new_version()
    copy.origin, copy.source_version = "rollback", first.version
    append(session, copy)
    session.commit()
    rows = repository.list_versions(
        session=session, tenant_id="default", client_id="alice", before=None, limit=10
    )
    assert [(r.version, r.origin, r.source_version) for r in rows] == [
        (2, "rollback", 1),
        (1, "adapt", None),
    ]


def test_a_version_made_from_a_deleted_client_does_not_resurrect_it(session: Session) -> None:
    orphan = new_version("gone")
    orphan.origin, orphan.source_version = "readapt", 1
    with pytest.raises(NotFound, match="gone"):
        repository.append_versions(session=session, rows=[orphan])
    session.rollback()
    assert not repository.client_exists(session=session, tenant_id="default", client_id="gone")


def test_list_clients_pages_filters_and_tenants(session: Session) -> None:
    for client in ("b", "a", "d", "c"):
        append(session, new_version(client))
    append(session, new_version("a", tenant_id="other"))
    session.execute(
        update(ClientVersion)
        .where(ClientVersion.client_id == "c", ClientVersion.tenant_id == "default")
        .values(meta_model="plane", meta_model_version="1" * 64)
    )
    session.execute(
        update(ClientVersion)
        .where(ClientVersion.client_id == "d")
        .values(meta_model_version="2" * 64)
    )

    def ids(**kwargs: object) -> list[str]:
        args = {"session": session, "tenant_id": "default", "after": None, "limit": 10}
        rows = repository.list_clients(**(args | kwargs))  # type: ignore[arg-type]
        return [r.client_id for r in rows]

    assert ids() == ["a", "b", "c", "d"]
    assert ids(limit=2) == ["a", "b"] and ids(after="b") == ["c", "d"]
    assert ids(tenant_id="other") == ["a"] and ids(tenant_id="nobody") == []
    assert ids(meta_model="plane") == ["c"]
    promoted = {"sinusoid": "0" * 64, "plane": "1" * 64}
    assert ids(stale_against=promoted) == ["d"]  # on another sha of its name
    assert ids(stale_against={"sinusoid": "0" * 64}) == ["c", "d"]  # plane: none promoted
    assert ids(stale_against={}) == ["a", "b", "c", "d"]
    summary = repository.list_clients(
        session=session, tenant_id="default", after="b", limit=1, meta_model="plane"
    )[0]
    assert (summary.current_version, summary.meta_model_version) == (1, "1" * 64)
    assert summary.updated_at.tzinfo is not None
