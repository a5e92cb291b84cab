"""RowCache: rows kept until any connection, of any process, commits to the SQLite file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, text

from service.store.rowcache import RowCache


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
        RowCache[str, int](create_engine("postgresql+psycopg://u@127.0.0.1:1/x")),
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
