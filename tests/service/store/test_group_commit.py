"""Group commit of new versions, and the bulk repository write under it, on both backends."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.store import group_commit, repository
from service.store.group_commit import GroupCommit
from service.store.session import connect, session_factory
from service.store.tables import ClientVersion
from tests.service.store.test_store import append, new_version


def test_append_versions_numbers_each_clients_rows_in_order(session: Session) -> None:
    append(session, new_version("alice"))
    rows = [new_version(c) for c in ("bob", "alice", "bob", "carol", "alice")]
    rows[0].params = b"bob-1"
    rows[2].params = b"bob-2"
    repository.append_versions(session=session, rows=rows)
    session.commit()
    assert [r.version for r in rows] == [1, 2, 2, 1, 3]
    for client, current in (("alice", 3), ("bob", 2), ("carol", 1)):
        found = repository.get_client(session=session, tenant_id="default", client_id=client)
        assert found is not None and found.current_version == current
        assert [v.version for v in found.versions] == list(range(1, current + 1))
    stored = [
        repository.load_params(session=session, tenant_id="default", uid=row.uid)
        for row in (rows[0], rows[2])
    ]
    assert len({row.uid for row in rows}) == len(rows)  # every version its own identity
    assert stored == [b"bob-1", b"bob-2"]


def test_a_lone_append_commits_at_once(session: Session) -> None:
    commits = GroupCommit()
    row = commits.append(session=session, row=new_version())
    assert row.version == 1 and (commits.commits, commits.rows) == (1, 1)


def grouped(
    session: Session, monkeypatch: pytest.MonkeyPatch, followers: list[ClientVersion]
) -> tuple[GroupCommit, list[Future[ClientVersion]]]:
    """A leader whose commit blocks until ``followers`` have all queued behind it."""
    commits = GroupCommit()
    first_write, release = threading.Event(), threading.Event()
    append_versions = repository.append_versions

    def slow_first(
        *, session: Session, rows: Sequence[ClientVersion], keep: int | None = None
    ) -> None:
        if not first_write.is_set():
            first_write.set()
            assert release.wait(10)
        append_versions(session=session, rows=rows, keep=keep)

    monkeypatch.setattr(group_commit.repository, "append_versions", slow_first)
    with ThreadPoolExecutor(len(followers) + 1) as pool:
        leader = pool.submit(commits.append, session=session, row=new_version("leader"))
        assert first_write.wait(10)
        futures = [pool.submit(commits.append, session=session, row=row) for row in followers]
        deadline = time.monotonic() + 10
        while len(commits._pending) < len(followers):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        release.set()
    return commits, [leader, *futures]


def test_rows_that_arrive_during_a_commit_share_the_next_one(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the leader's commit runs, arrivals queue; the next leader commits them all."""
    commits, futures = grouped(session, monkeypatch, [new_version(f"c{i}") for i in range(6)])
    assert all(f.result().version == 1 for f in futures)
    assert (commits.commits, commits.rows) == (2, 7)


def test_a_bad_row_fails_only_its_own_append(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group's transaction fails; its rows are retried alone, and only the bad one fails."""
    bad = new_version("bad")
    bad.support_size = None  # type: ignore[assignment]  # NOT NULL
    commits, futures = grouped(session, monkeypatch, [new_version("a"), bad, new_version("b")])
    with pytest.raises(IntegrityError):
        futures[2].result()
    assert [futures[i].result().version for i in (0, 1, 3)] == [1, 1, 1]
    assert (commits.commits, commits.rows) == (3, 3)  # the leader's, then a and b alone
    assert repository.get_client(session=session, tenant_id="default", client_id="bad") is None


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_appends_all_commit_with_distinct_versions_and_a_bad_row_fails_alone(
    backend: str, fresh_database: Callable[[str], str]
) -> None:
    engine = connect(fresh_database(backend))
    sessions = session_factory(engine)
    commits = GroupCommit()
    writers = 24
    barrier = threading.Barrier(writers)

    def write(i: int) -> int:
        row = new_version(f"client-{i % 3}")
        if i == 7:
            row.support_size = None  # type: ignore[assignment]  # NOT NULL: this one fails
        with sessions() as s:
            barrier.wait()
            return commits.append(session=s, row=row).version

    with ThreadPoolExecutor(writers) as pool:
        futures = [pool.submit(write, i) for i in range(writers)]
    with pytest.raises(IntegrityError):
        futures[7].result()
    versions: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for i, future in enumerate(futures):
        if i != 7:
            versions[i % 3].append(future.result())
    assert {c: sorted(v) for c, v in versions.items()} == {
        0: list(range(1, 9)),
        1: list(range(1, 8)),  # the failed row was client-1's
        2: list(range(1, 9)),
    }
    assert commits.rows == writers - 1
    with sessions() as s:
        for c, expected in ((0, 8), (1, 7), (2, 8)):
            found = repository.get_client(session=s, tenant_id="default", client_id=f"client-{c}")
            assert found is not None and found.current_version == expected
            assert [v.version for v in found.versions] == list(range(1, expected + 1))
    engine.dispose()
