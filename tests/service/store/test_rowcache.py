"""RowCache: rows kept until any connection, of any process, commits to the SQLite file,
or until PostgreSQL notifies a change."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import create_engine, text

from service.store.rowcache import STALL_S, PostgresCounter, RowCache
from service.store.session import connect


def sqlite_file(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with create_engine(url).begin() as connection:
        connection.execute(text("PRAGMA journal_mode=WAL"))
        connection.execute(text("CREATE TABLE t (x INTEGER)"))
    return url


def test_it_is_off_where_no_counter_tells_it_of_commits() -> None:
    for cache in (
        RowCache[str, int](None),
        RowCache[str, int](create_engine("sqlite://")),
    ):
        assert not cache.enabled
        assert cache.generation() is None
        cache.put("a", 1, cache.generation())
        assert cache.get("a") is None


def test_a_row_is_kept_until_another_connection_commits(tmp_path: Path) -> None:
    engine = create_engine(sqlite_file(tmp_path))
    cache = RowCache[str, int](engine)
    cache.put("a", 1, cache.generation())
    assert cache.get("a") == 1
    with engine.begin() as connection:  # a read commits nothing: the row stays
        connection.execute(text("SELECT count(*) FROM t"))
    assert cache.get("a") == 1
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO t VALUES (1)"))
    assert cache.get("a") is None
    cache.close()


def test_a_commit_of_another_process_empties_it(tmp_path: Path) -> None:
    url = sqlite_file(tmp_path)
    cache = RowCache[str, int](create_engine(url))
    cache.put("a", 1, cache.generation())
    assert cache.get("a") == 1
    path = str(tmp_path / "db.sqlite")
    write = (
        f"import sqlite3; c = sqlite3.connect({path!r}); "
        "c.execute('INSERT INTO t VALUES (2)'); c.commit()"
    )
    subprocess.run([sys.executable, "-c", write], check=True)
    assert cache.get("a") is None
    cache.close()


def test_a_row_read_while_a_commit_landed_is_not_kept(tmp_path: Path) -> None:
    engine = create_engine(sqlite_file(tmp_path))
    cache = RowCache[str, int](engine)
    before = cache.generation()  # a reader looks, then queries...
    with engine.begin() as connection:  # ...while another commits
        connection.execute(text("INSERT INTO t VALUES (1)"))
    assert cache.generation() != before  # someone looked meanwhile
    cache.put("a", 1, before)
    assert cache.get("a") is None
    cache.close()


def test_the_least_recently_used_row_goes_first(tmp_path: Path) -> None:
    cache = RowCache[str, int](create_engine(sqlite_file(tmp_path)), max_rows=2)
    for key, value in (("a", 1), ("b", 2)):
        cache.put(key, value, cache.generation())
    assert cache.get("a") == 1  # b is now the least recently used
    cache.put("c", 3, cache.generation())
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)
    cache.close()


def listening(cache: RowCache[str, int]) -> None:
    """Until the PostgreSQL counter's connection listens (it starts on its own thread)."""
    deadline = time.monotonic() + 30
    while cache.generation() is None:
        assert time.monotonic() < deadline, "the counter never listened"
        time.sleep(0.05)


def test_postgresql_a_row_is_kept_until_a_commit_is_notified(
    fresh_database: Callable[[str], str], postgres_url: str
) -> None:
    """Migration 0009's triggers notify every change to clients and versions; ``fresh``
    waits for a round trip, after which the counter includes every commit before it."""
    engine = connect(fresh_database("postgresql"))
    cache = RowCache[str, int](engine)
    try:
        listening(cache)
        assert asyncio.run(cache.fresh())
        cache.put("a", 1, cache.generation())
        assert asyncio.run(cache.fresh()) and cache.get("a") == 1
        with engine.begin() as connection:  # a read notifies nothing: the row stays
            connection.execute(text("SELECT count(*) FROM clients"))
        assert asyncio.run(cache.fresh()) and cache.get("a") == 1
        before = cache.generation()
        with engine.begin() as connection:  # another writer: fastadapt or not
            connection.execute(
                text(
                    "INSERT INTO clients (tenant_id, client_id, current_version, created_at, "
                    "updated_at) VALUES ('t', 'c', 0, now(), now())"
                )
            )
        assert asyncio.run(cache.fresh())  # no sleep: the round trip is the fence
        assert cache.get("a") is None
        cache.put("b", 2, before)  # read before that commit: not kept
        assert cache.get("b") is None
        counter = cache._counter
        assert isinstance(counter, PostgresCounter)
        counter._since = time.monotonic() - 2 * STALL_S  # a round trip stuck on its way
        assert not asyncio.run(cache.fresh())  # at once: predictions query meanwhile
        counter._since = None
        assert asyncio.run(cache.fresh())
    finally:
        cache.close()
        engine.dispose()
    assert not asyncio.run(cache.fresh())  # closed: off
