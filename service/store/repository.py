"""Repository functions: keyword-only arguments, the caller's transaction, never a commit."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import cache
from typing import Any, cast

from sqlalchemy import (
    Insert,
    Table,
    Update,
    bindparam,
    case,
    delete,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload

from service.store.tables import Client, ClientVersion, new_uid, utcnow


def append_versions(*, session: Session, rows: Sequence[ClientVersion]) -> None:
    """Store ``rows`` as the next versions of their clients (created if new), in order,
    and make each client's newest current: three statements for the lot, whatever its size.

    One ``INSERT ... ON CONFLICT DO UPDATE`` creates the clients that are new and locks
    every client's row until the transaction ends (the row lock on PostgreSQL; on SQLite
    the first write of a transaction takes the database's write lock), so two racing
    adaptations of a client serialise there instead of both reading version N. The
    clients are locked in (tenant, client) order, so two writers cannot deadlock. Core
    statements compiled once, executed as ``executemany``: per row, the ORM's unit of
    work costs more than the database. The rows stay out of the session; each gets its
    ``version``, and its ``uid`` unless it has one.
    """
    if not rows:
        return
    for row in rows:
        if row.uid is None:
            row.uid = new_uid()
    now = utcnow()
    keys = sorted({(row.tenant_id, row.client_id) for row in rows})
    connection = session.connection()
    locked = connection.execute(
        _lock_clients(connection.dialect.name),
        [
            {
                "tenant_id": t,
                "client_id": c,
                "current_version": 0,
                "created_at": now,
                "updated_at": now,
            }
            for t, c in keys
        ],
    )
    current: dict[tuple[str, str], int] = {(str(r[0]), str(r[1])): int(r[2]) for r in locked}
    for row in rows:
        key = (row.tenant_id, row.client_id)
        current[key] += 1
        row.version = current[key]
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        state = inspect(row).dict  # the attributes this row sets (column defaults do the rest)
        values = {column: state[attr] for attr, column in _version_columns() if attr in state}
        by_columns.setdefault(tuple(values), []).append(values)
    for params in by_columns.values():
        connection.execute(_table(ClientVersion).insert(), params)
    connection.execute(
        _set_current_version(),
        [{"t": t, "c": c, "v": v} for (t, c), v in current.items()],
    )


@cache
def _lock_clients(dialect: str) -> Insert:
    table = _table(Client)
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(table)
    return stmt.on_conflict_do_update(
        index_elements=[table.c.tenant_id, table.c.client_id],
        set_={"updated_at": stmt.excluded.updated_at},
    ).returning(table.c.tenant_id, table.c.client_id, table.c.current_version)


@cache
def _set_current_version() -> Update:
    table = _table(Client)
    return (
        update(table)
        .where(table.c.tenant_id == bindparam("t"), table.c.client_id == bindparam("c"))
        .values(current_version=bindparam("v"))
    )


def _table(cls: type[Client] | type[ClientVersion]) -> Table:
    return cast(Table, cls.__table__)


@cache
def _version_columns() -> list[tuple[str, str]]:
    """(ORM attribute, table column) of every ClientVersion column."""
    return [(attr.key, attr.columns[0].key) for attr in inspect(ClientVersion).column_attrs]


def get_client(*, session: Session, tenant_id: str, client_id: str) -> Client | None:
    """The client with its version history (without parameters or support sets)."""
    return session.get(Client, (tenant_id, client_id), options=[selectinload(Client.versions)])


def get_version(
    *, session: Session, tenant_id: str, client_id: str, version: int | None = None
) -> ClientVersion | None:
    """One version's record (without parameters or support set); ``None`` means current."""
    if version is not None:
        return session.get(ClientVersion, (tenant_id, client_id, version))
    stmt = (
        select(ClientVersion)
        .join(Client)
        .where(
            Client.tenant_id == tenant_id,
            Client.client_id == client_id,
            ClientVersion.version == Client.current_version,
        )
    )
    return session.scalars(stmt).one_or_none()


def load_params(*, session: Session, tenant_id: str, uid: str) -> bytes | None:
    """The adapted parameters (safetensors bytes) of the version ``uid`` (of the tenant):
    by identity, so a version deleted meanwhile is never answered with its successor's."""
    stmt = select(ClientVersion.params).where(
        ClientVersion.tenant_id == tenant_id, ClientVersion.uid == uid
    )
    return session.scalars(stmt).one_or_none()


def find_idempotent(
    *, session: Session, tenant_id: str, idempotency_key: str
) -> ClientVersion | None:
    """The tenant's version made by the request with this ``Idempotency-Key``, if stored."""
    stmt = select(ClientVersion).where(
        ClientVersion.tenant_id == tenant_id, ClientVersion.idempotency_key == idempotency_key
    )
    return session.scalars(stmt).one_or_none()


def release_idempotency_key(
    *, session: Session, tenant_id: str, idempotency_key: str, made_before: datetime
) -> int:
    """Forget the key on a version made before ``made_before`` (it expired), so that a new
    request may use it; the number of versions released (0 or 1)."""
    stmt = (
        update(ClientVersion)
        .where(
            ClientVersion.tenant_id == tenant_id,
            ClientVersion.idempotency_key == idempotency_key,
            ClientVersion.created_at < made_before,
        )
        .values(idempotency_key=None, request_hash=None)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(session.execute(stmt), "rowcount", 0) or 0)


def client_exists(*, session: Session, tenant_id: str, client_id: str) -> bool:
    stmt = select(Client.current_version).where(
        Client.tenant_id == tenant_id, Client.client_id == client_id
    )
    return session.scalars(stmt).one_or_none() is not None


def delete_client(*, session: Session, tenant_id: str, client_id: str) -> bool:
    """Delete the client; its versions go with it (ON DELETE CASCADE). False if unknown."""
    stmt = (
        delete(Client)
        .where(Client.tenant_id == tenant_id, Client.client_id == client_id)
        .returning(Client.client_id)
    )
    return session.execute(stmt).first() is not None


def ping(*, session: Session) -> None:
    session.execute(text("SELECT 1"))


def count_by_meta_model(*, session: Session) -> list[tuple[str, int, int]]:
    """``(meta_model, clients, versions)`` for every meta-model with stored versions, in
    one grouped query: versions stored with it, and clients whose current version is."""
    current = case((ClientVersion.version == Client.current_version, 1), else_=0)
    stmt = (
        select(ClientVersion.meta_model, func.sum(current), func.count())
        .join(
            Client,
            (Client.tenant_id == ClientVersion.tenant_id)
            & (Client.client_id == ClientVersion.client_id),
        )
        .group_by(ClientVersion.meta_model)
        .order_by(ClientVersion.meta_model)
    )
    return [
        (name, int(clients or 0), int(versions))
        for name, clients, versions in session.execute(stmt)
    ]
