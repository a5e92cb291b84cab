"""Rows kept in memory until the database changes: a read without a query.

SQLite keeps a change counter that any connection may read: ``PRAGMA data_version``, on
a connection of its own, moves whenever another connection, in this process or any
other, commits to the database file. Reading it takes microseconds and, in WAL mode, no
lock. ``RowCache`` empties itself whenever the counter moved, so what it answers is
never older than the newest commit: a client that adapts (through any process) and then
predicts reads its new version, as it would with a query.

PostgreSQL has no such counter (LISTEN/NOTIFY arrives late, unless a round trip fences
it), so there, and for an in-memory SQLite database, the cache is off and every read
queries: ``RowCache.generation`` answers None.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

from sqlalchemy import Engine

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
MAX_ROWS = 65_536  # a row is a few hundred bytes: at most some tens of MB
log = logging.getLogger(__name__)


class RowCache(Generic[K, V]):
    """Up to ``max_rows`` rows, least recently used dropped first.

    A reader takes ``generation()`` before it queries and passes it to ``put``: a row
    read while another commit landed is then not kept (its generation is gone)."""

    def __init__(self, engine: Engine | None, max_rows: int = MAX_ROWS) -> None:
        """The cache of ``engine``'s database; off for PostgreSQL, in-memory SQLite or
        None (a test's own transaction, which commits nothing the counter would see)."""
        self.max_rows = max_rows
        self._rows: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self._seen: int | None = None  # the counter the rows were read under
        self._counter: sqlite3.Connection | None = None
        url = None if engine is None else engine.url
        on_file = url is not None and url.get_backend_name() == "sqlite"
        if on_file and url is not None and url.database and url.database != ":memory:":
            # only ever reads the counter: never in a transaction, never holds a lock
            self._counter = sqlite3.connect(
                url.database, isolation_level=None, check_same_thread=False
            )
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self._counter is not None

    def generation(self) -> int | None:
        """The database's change counter now, emptying the cache if it moved since the
        last look; None when the cache is off (or the counter cannot be read now)."""
        if self._counter is None:
            return None
        with self._lock:
            try:
                (counter,) = self._counter.execute("PRAGMA data_version").fetchone()
            except sqlite3.Error as exc:  # a locked or vanished file: read the database
                log.warning("the database's change counter is unreadable (%s)", type(exc).__name__)
                self._rows.clear()
                self._seen = None
                return None
            if counter != self._seen:
                self._rows.clear()
                self._seen = counter
            return int(counter)

    def get(self, key: K) -> V | None:
        """The row kept under ``key``, if the database has not changed since it was read."""
        if self.generation() is None:
            return None
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                self.misses += 1
                return None
            self._rows.move_to_end(key)
            self.hits += 1
            return row

    def put(self, key: K, row: V, generation: int | None) -> None:
        """Keep ``row``, read after ``generation()`` answered ``generation``, unless the
        database changed since (or the cache is off)."""
        if generation is None:
            return
        with self._lock:
            if generation != self._seen:
                return
            self._rows[key] = row
            self._rows.move_to_end(key)
            if len(self._rows) > self.max_rows:
                self._rows.popitem(last=False)

    def close(self) -> None:
        with self._lock:
            if self._counter is not None:
                self._counter.close()
                self._counter = None
            self._rows.clear()
