"""The prediction path's read: one version's four columns, current or by number."""

from __future__ import annotations

from sqlalchemy.orm import Session

from service.store import repository
from tests.service.store.test_store import append, new_version


def test_the_current_version_or_a_numbered_one_is_read_without_its_blobs(
    session: Session,
) -> None:
    first = append(session, new_version())
    labelled = new_version()
    labelled.labels = ["a", 3]
    second = append(session, labelled)
    append(session, new_version("bob"))
    session.commit()
    current = repository.get_predictable(session=session, tenant_id="default", client_id="alice")
    assert current == repository.Predictable(2, second.uid, "0" * 64, ["a", 3])
    old = repository.get_predictable(
        session=session, tenant_id="default", client_id="alice", version=1
    )
    assert old == repository.Predictable(1, first.uid, "0" * 64, None)


def test_an_unknown_client_or_version_or_tenant_reads_none(session: Session) -> None:
    append(session, new_version())
    session.commit()
    who = {"session": session, "client_id": "alice"}
    assert repository.get_predictable(**who, tenant_id="default", version=2) is None
    assert repository.get_predictable(**who, tenant_id="other") is None
    assert repository.get_predictable(session=session, tenant_id="default", client_id="x") is None


def test_a_new_version_is_read_at_once(session: Session) -> None:
    """Never cached: what another replica committed is what the next read sees."""
    append(session, new_version())
    session.commit()
    before = repository.get_predictable(session=session, tenant_id="default", client_id="alice")
    newer = append(session, new_version())
    session.commit()
    after = repository.get_predictable(session=session, tenant_id="default", client_id="alice")
    assert before is not None and after is not None
    assert (after.version, after.uid) == (2, newer.uid) != (before.version, before.uid)
