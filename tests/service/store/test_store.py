"""Repository functions on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC

import pytest
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session

from service.store import repository
from service.store.session import connect, session_factory
from service.store.tables import DEFAULT_TENANT, Client, ClientVersion


def new_version(client_id: str = "alice", tenant_id: str = DEFAULT_TENANT) -> ClientVersion:
    return ClientVersion(
        tenant_id=tenant_id,
        client_id=client_id,
        meta_model="sinusoid",
        meta_model_version="0" * 64,
        params=b"weights-" + client_id.encode(),
        support_inputs="[[0.5]]",
        support_targets="[1.0]",
        support_size=1,
        inner_steps=5,
        inner_lr=0.01,
        support_loss_before=1.0,
        support_loss_after=0.5,
        adapt_ms=1.5,
    )


def append(session: Session, row: ClientVersion) -> ClientVersion:
    """Store ``row`` as its client's next version, as production does (in a group of one)."""
    repository.append_versions(session=session, rows=[row])
    return row


def count_versions(session: Session, client_id: str) -> int:
    stmt = (
        select(func.count()).select_from(ClientVersion).where(ClientVersion.client_id == client_id)
    )
    return int(session.scalar(stmt) or 0)


def test_versions_count_up_and_the_newest_is_current(session: Session) -> None:
    for expected in (1, 2, 3):
        row = append(session, new_version())
        assert row.version == expected
    session.commit()
    assert (
        repository.get_version(session=session, tenant_id="default", client_id="alice") is not None
    )
    current = repository.get_version(session=session, tenant_id="default", client_id="alice")
    assert current is not None and current.version == 3
    first = repository.get_version(
        session=session, tenant_id="default", client_id="alice", version=1
    )
    assert first is not None and first.version == 1
    assert (
        repository.get_version(session=session, tenant_id="default", client_id="alice", version=4)
        is None
    )
    client = repository.get_client(session=session, tenant_id="default", client_id="alice")
    assert client is not None and client.current_version == 3
    assert [v.version for v in client.versions] == [1, 2, 3]


def test_history_and_version_records_leave_the_blobs_in_the_database(session: Session) -> None:
    append(session, new_version())
    session.commit()
    session.expunge_all()
    client = repository.get_client(session=session, tenant_id="default", client_id="alice")
    assert client is not None
    unloaded = inspect(client.versions[0]).unloaded
    assert {"params", "support_inputs", "support_targets"} <= unloaded
    uid = client.versions[0].uid
    assert len(uid) == 32 and int(uid, 16) >= 0  # 32 hex digits, set when stored
    params = repository.load_params(session=session, tenant_id="default", uid=uid)
    assert params == b"weights-alice"


def test_timestamps_are_utc_aware(session: Session) -> None:
    append(session, new_version())
    session.commit()
    session.expunge_all()
    client = repository.get_client(session=session, tenant_id="default", client_id="alice")
    assert client is not None
    assert client.created_at.tzinfo is not None and client.created_at.utcoffset() == UTC.utcoffset(
        None
    )
    assert client.versions[0].created_at.tzinfo is not None


def test_tenants_do_not_share_clients(session: Session) -> None:
    append(session, new_version(tenant_id="a"))
    append(session, new_version(tenant_id="b"))
    append(session, new_version(tenant_id="b"))
    a = repository.get_version(session=session, tenant_id="a", client_id="alice")
    b = repository.get_version(session=session, tenant_id="b", client_id="alice")
    assert a is not None and a.version == 1
    assert b is not None and b.version == 2
    assert repository.get_client(session=session, tenant_id="default", client_id="alice") is None


def test_delete_removes_every_version_and_nothing_else(session: Session) -> None:
    for client_id in ("alice", "alice", "bob"):
        append(session, new_version(client_id))
    session.commit()
    assert repository.delete_client(session=session, tenant_id="default", client_id="alice")
    session.commit()
    assert count_versions(session, "alice") == 0
    assert count_versions(session, "bob") == 1
    assert not repository.client_exists(session=session, tenant_id="default", client_id="alice")
    assert not repository.delete_client(session=session, tenant_id="default", client_id="alice")


def test_a_client_row_is_kept_only_with_its_versions(session: Session) -> None:
    append(session, new_version())
    session.rollback()
    assert not repository.client_exists(session=session, tenant_id="default", client_id="alice")
    assert session.scalar(select(func.count()).select_from(Client)) == 0


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_racing_adaptations_get_distinct_versions(
    backend: str, fresh_database: Callable[[str], str]
) -> None:
    """Writers released together each get their own version; none fails."""
    engine = connect(fresh_database(backend))
    sessions = session_factory(engine)
    writers = 8
    barrier = threading.Barrier(writers)
    versions: list[int] = []
    errors: list[BaseException] = []

    def write() -> None:
        try:
            with sessions() as s:
                barrier.wait()
                versions.append(append(s, new_version()).version)
                s.commit()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(versions) == list(range(1, writers + 1))
    with sessions() as s:
        client = repository.get_client(session=s, tenant_id="default", client_id="alice")
        assert client is not None and client.current_version == writers
    engine.dispose()
