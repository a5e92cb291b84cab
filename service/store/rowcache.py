"""Rows kept in memory until the database changes: a read without a query.

A ``RowCache`` empties itself whenever the database's change counter moved, so what it
answers is never older than the newest commit: a client that adapts (through any
process) and then predicts reads its new version, as it would with a query. The counter:

- SQLite: ``PRAGMA data_version`` on a connection of its own, which moves whenever another
  connection, of this process or any other, commits to the file. Reading it takes
  microseconds and, in WAL mode, no lock.
- PostgreSQL: the notifications a trigger on ``clients`` and ``client_versions`` sends on
  every change (migration 0009), counted by a listening connection on a thread of its
  own. A notification arrives after its commit, so a read first awaits ``fresh()``: one
  round trip on that connection that began after the call. PostgreSQL sends a listening
  session every notification committed before its query ends ahead of the query's answer,
  and a commit signals the listeners before it is acknowledged, so the counter then
  includes every commit a caller could have seen acknowledged. One round trip serves
  every read that waits for it. While the connection is down (and until it listens
  again), or a round trip is overdue by ``STALL_S``, reads query instead of waiting.
- Elsewhere (in-memory SQLite, a test's own transaction): off; every read queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

import psycopg
from psycopg.conninfo import make_conninfo
from sqlalchemy import Engine

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
MAX_ROWS = 65_536  # a row is a few hundred bytes: at most some tens of MB
CHANNEL = "fastadapt_changes"  # migration 0009's triggers notify it
RECONNECT_S = 1.0  # the listening connection's retry interval, while it is down
IDLE_ROUND_TRIP_S = 5.0  # a round trip this often when no read waits: drains the queue
# a round trip overdue by this much: the connection is stuck (reads query meanwhile, and
# the keepalives below close a dead one within about 10 s)
STALL_S = 1.0
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 2,
}
log = logging.getLogger(__name__)
Waiting = list[tuple[asyncio.AbstractEventLoop, "asyncio.Future[bool]"]]  # reads awaiting fresh()


class Counter(Protocol):
    def read(self) -> int | None:
        """The change counter now; None when it cannot be known (the cache is off)."""

    async def fresh(self) -> bool:
        """True once ``read`` includes every commit acknowledged before this call."""

    def close(self) -> None: ...


class RowCache(Generic[K, V]):
    """Up to ``max_rows`` rows, least recently used dropped first.

    A reader takes ``generation()`` before it queries and passes it to ``put``: a row
    read while another commit landed is then not kept (its generation is gone). On the
    event loop, ``await fresh()`` before ``get`` (PostgreSQL's counter lags its commits)."""

    def __init__(self, engine: Engine | None, max_rows: int = MAX_ROWS) -> None:
        """The cache of ``engine``'s database; off for an in-memory SQLite database or
        None (a test's own transaction, which commits nothing a counter would see)."""
        self.max_rows = max_rows
        self._rows: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self._seen: int | None = None  # the counter the rows were read under
        self._counter = None if engine is None else _counter_of(engine)
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self._counter is not None

    async def fresh(self) -> bool:
        """Whether ``get`` may answer now: the counter includes every commit acknowledged
        before this call (awaits a round trip on PostgreSQL; at once on SQLite)."""
        return self._counter is not None and await self._counter.fresh()

    def generation(self) -> int | None:
        """The database's change counter now, emptying the cache if it moved since the
        last look; None when the cache is off (or the counter cannot be read now)."""
        if self._counter is None:
            return None
        with self._lock:
            counter = self._counter.read()
            if counter != self._seen:
                self._rows.clear()
                self._seen = counter
            return counter

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


def _counter_of(engine: Engine) -> Counter | None:
    url = engine.url
    backend = url.get_backend_name()
    if backend == "sqlite" and url.database and url.database != ":memory:":
        return SqliteCounter(url.database)
    if backend == "postgresql":
        return PostgresCounter(url.set(drivername="postgresql").render_as_string(False))
    return None


class SqliteCounter:
    """``PRAGMA data_version`` on a connection that never writes or holds a transaction."""

    def __init__(self, path: str) -> None:
        self._connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()

    def read(self) -> int | None:
        with self._lock:
            try:
                (counter,) = self._connection.execute("PRAGMA data_version").fetchone()
            except sqlite3.Error as exc:  # a locked or vanished file: read the database
                log.warning("the database's change counter is unreadable (%s)", type(exc).__name__)
                return None
            return int(counter)

    async def fresh(self) -> bool:
        return True  # read() itself sees every commit made before it

    def close(self) -> None:
        with self._lock:
            self._connection.close()


class PostgresCounter:
    """Notifications on ``CHANNEL``, counted by a listening connection on its own thread,
    which also runs the round trips ``fresh`` awaits (one for all who wait meanwhile)."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = make_conninfo(conninfo, **KEEPALIVES)
        self._cond = threading.Condition()
        self._count = 0  # notifications seen, plus one per (re)connection
        self._listening = False
        self._closed = False
        self._since: float | None = None  # when the round trip under way began
        self._waiting: Waiting = []
        self._thread = threading.Thread(target=self._run, name="fastadapt-changes", daemon=True)
        self._thread.start()

    def read(self) -> int | None:
        with self._cond:
            return self._count if self._listening else None

    async def fresh(self) -> bool:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        with self._cond:
            stuck = self._since is not None and time.monotonic() - self._since > STALL_S
            if not self._listening or stuck:
                return False
            self._waiting.append((loop, future))
            self._cond.notify()
        try:
            return await asyncio.wait_for(future, STALL_S)
        except TimeoutError:
            return False

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=IDLE_ROUND_TRIP_S + 1.0)

    def _notified(self, _notify: psycopg.Notify) -> None:
        with self._cond:
            self._count += 1

    def _run(self) -> None:
        while not self._closed:
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.add_notify_handler(self._notified)
                    conn.execute(f"LISTEN {CHANNEL}")
                    with self._cond:  # what changed while no one listened is unknown
                        self._count += 1
                        self._listening = True
                    log.info("listening for changes: predictions read kept versions")
                    self._serve(conn)
            except psycopg.Error as exc:
                if self._listening:  # once per outage, not once per retry
                    log.warning("stopped listening for changes (%s)", type(exc).__name__)
            finally:
                self._stop_listening()
            with self._cond:
                if not self._closed:
                    self._cond.wait(RECONNECT_S)

    def _serve(self, conn: psycopg.Connection) -> None:
        """Round trips while the connection lasts: for the reads that wait, else idle."""
        while True:
            with self._cond:
                if not self._waiting and not self._closed:
                    self._cond.wait(IDLE_ROUND_TRIP_S)
                if self._closed:
                    return
                batch, self._waiting = self._waiting, []
                self._since = time.monotonic()
            try:
                conn.execute("SELECT 1")  # every notification committed before it, delivered
            except psycopg.Error:
                _answer(batch, False)
                raise
            finally:
                with self._cond:
                    self._since = None
            _answer(batch, True)

    def _stop_listening(self) -> None:
        with self._cond:
            self._listening = False
            batch, self._waiting = self._waiting, []
        _answer(batch, False)  # they query instead


def _answer(batch: Waiting, fresh: bool) -> None:
    for loop, future in batch:
        with contextlib.suppress(RuntimeError):  # a closed loop: no one waits there
            loop.call_soon_threadsafe(_resolve, future, fresh)


def _resolve(future: asyncio.Future[bool], fresh: bool) -> None:
    if not future.done():  # not cancelled meanwhile (a client that went away)
        future.set_result(fresh)
