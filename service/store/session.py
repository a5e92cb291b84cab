"""The database engine and session factory.

SQLite runs in WAL mode with foreign keys on, and SQLAlchemy (not the ``sqlite3``
driver's legacy mode) emits ``BEGIN``, so reads, savepoints and rollbacks are
transactional there as on PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_S = 30.0  # a writer waits this long for another writer's lock
# A PostgreSQL host that stops answering (rather than refusing connections) fails a new
# connection after this, so requests answer 503 in seconds instead of waiting for TCP.
POSTGRES_CONNECT_TIMEOUT_S = 5
SQLITE_POOL_SIZE = 16  # connections kept open (and as many more at a peak)


def connect(url: str) -> Engine:
    """A SQLAlchemy engine for ``url``; creates the SQLite file's directory if needed."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        connect_args = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
        return create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    pool: dict[str, Any] = {}
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        pool = {"pool_size": SQLITE_POOL_SIZE, "max_overflow": SQLITE_POOL_SIZE}  # QueuePool
    # A connection is cheap to keep and costly to open (two PRAGMAs): the pool keeps
    # enough for the request threads that read at once (QueuePool's 5 churned: a fifth of
    # them opened and closed a connection under 64 concurrent predictions).
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, **pool)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # the driver no longer issues BEGIN itself
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # Rows stay readable after commit: use cases return them to the API layer.
    return sessionmaker(engine, expire_on_commit=False)
