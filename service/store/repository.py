"""Repository functions: keyword-only arguments, the caller's transaction, never a commit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Delete,
    Insert,
    Table,
    Update,
    and_,
    bindparam,
    case,
    delete,
    false,
    func,
    inspect,
    not_,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload

from service.errors import NotFound
from service.store.tables import Client, ClientVersion, new_uid, utcnow


def append_versions(
    *, session: Session, rows: Sequence[ClientVersion], keep: int | None = None
) -> None:
    """Store ``rows`` as the next versions of their clients (created if new), in order,
    and make each client's newest current: three statements for the lot, whatever its
    size, and a fourth that deletes, with ``keep``, each client's versions beyond its
    newest ``keep`` (the current one is the newest, so it is never deleted).

    A row with a ``source_version`` (a readapt, rollback, examples or reconcile) was made
    from a stored version: if its client no longer exists (deleted since), it raises
    ``NotFound`` instead of creating the client anew.

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
        if current[key] == 0 and row.source_version is not None:  # created just now
            raise NotFound(f"unknown client {row.client_id!r} (deleted meanwhile)")
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
    if keep is not None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        floors = [{"t": t, "c": c, "v": v - keep} for (t, c), v in current.items() if v > keep]
        if floors:
            connection.execute(_prune_versions(), floors)


def prune_versions(*, session: Session, tenant_id: str, client_id: str, keep: int | None) -> None:
    """Delete the client's versions beyond its newest ``keep`` (None: keep all), as
    ``append_versions`` does, for a version appended otherwise (``jobs.append_if_current``)."""
    if keep is None:
        return
    if keep < 1:
        raise ValueError("keep must be >= 1")
    current = select(Client.current_version).where(
        Client.tenant_id == tenant_id, Client.client_id == client_id
    )
    newest = session.scalars(current).one_or_none()
    if newest is not None and newest > keep:
        session.execute(_prune_versions(), [{"t": tenant_id, "c": client_id, "v": newest - keep}])


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


@cache
def _prune_versions() -> Delete:
    table = _table(ClientVersion)
    return delete(table).where(
        table.c.tenant_id == bindparam("t"),
        table.c.client_id == bindparam("c"),
        table.c.version <= bindparam("v"),
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


@dataclass(frozen=True)
class Predictable:
    """What a prediction needs of a stored version (not its parameters or support set)."""

    version: int
    uid: str
    meta_model_version: str  # the meta-model version's sha
    labels: list[int | str] | None
    out_of_scope_threshold: float | None = None  # None: the meta-model's default


PREDICTABLE = (
    ClientVersion.version,
    ClientVersion.uid,
    ClientVersion.meta_model_version,
    ClientVersion.labels,
    ClientVersion.out_of_scope_threshold,
)


def get_predictable(
    *, session: Session, tenant_id: str, client_id: str, version: int | None = None
) -> Predictable | None:
    """The current version (or ``version``) as a prediction needs it: one query of five
    columns, read as plain rows (no ORM objects), the hot path of every prediction.
    It sees the newest commit of any replica; ``usecases.predict`` keeps what it reads
    only until the database changes (``store.rowcache``)."""
    stmt = select(*PREDICTABLE).where(
        ClientVersion.tenant_id == tenant_id, ClientVersion.client_id == client_id
    )
    if version is not None:
        stmt = stmt.where(ClientVersion.version == version)
    else:
        stmt = stmt.join(Client).where(ClientVersion.version == Client.current_version)
    row = session.execute(stmt).one_or_none()
    return None if row is None else Predictable(*row)


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


# -- listing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientSummary:
    """A client and its current version's meta-model."""

    client_id: str
    current_version: int
    meta_model: str
    meta_model_version: str
    updated_at: datetime


def list_clients(
    *,
    session: Session,
    tenant_id: str,
    after: str | None,
    limit: int,
    meta_model: str | None = None,
    stale_against: Mapping[str, str] | None = None,
) -> list[ClientSummary]:
    """Up to ``limit`` of the tenant's clients, by ``client_id``, after ``after``; only
    those whose current version is of ``meta_model`` (a name), and with ``stale_against``
    (name -> sha) only those whose current version's meta-model sha is not its name's
    entry there (a name without one counts as stale). One indexed query: the primary keys
    order and join it."""
    stmt = (
        select(
            Client.client_id,
            Client.current_version,
            ClientVersion.meta_model,
            ClientVersion.meta_model_version,
            Client.updated_at,
        )
        .join(
            ClientVersion,
            (ClientVersion.tenant_id == Client.tenant_id)
            & (ClientVersion.client_id == Client.client_id)
            & (ClientVersion.version == Client.current_version),
        )
        .where(Client.tenant_id == tenant_id)
        .order_by(Client.client_id)
        .limit(limit)
    )
    if after is not None:
        stmt = stmt.where(Client.client_id > after)
    if meta_model is not None:
        stmt = stmt.where(ClientVersion.meta_model == meta_model)
    if stale_against is not None:
        stmt = stmt.where(not_(_on_any(stale_against)))
    return [ClientSummary(*row) for row in session.execute(stmt)]


def _on_any(shas: Mapping[str, str]) -> ColumnElement[bool]:
    """The current version is on its name's sha in ``shas``."""
    if not shas:
        return false()  # no name has a sha: none is current
    return or_(
        *(
            (ClientVersion.meta_model == name) & (ClientVersion.meta_model_version == sha)
            for name, sha in sorted(shas.items())
        )
    )


def list_versions(
    *,
    session: Session,
    tenant_id: str,
    client_id: str,
    before: int | None,
    limit: int,
) -> list[ClientVersion]:
    """Up to ``limit`` of a client's versions, newest first, older than ``before``
    (without parameters or support sets)."""
    stmt = (
        select(ClientVersion)
        .where(ClientVersion.tenant_id == tenant_id, ClientVersion.client_id == client_id)
        .order_by(ClientVersion.version.desc())
        .limit(limit)
    )
    if before is not None:
        stmt = stmt.where(ClientVersion.version < before)
    return list(session.scalars(stmt))


def current_version(*, session: Session, tenant_id: str, client_id: str) -> int | None:
    """The client's current version number; None if there is no such client."""
    stmt = select(Client.current_version).where(
        Client.tenant_id == tenant_id, Client.client_id == client_id
    )
    return session.scalars(stmt).one_or_none()


# -- bulk (service/usecases/bulk.py) ---------------------------------------------------------
@dataclass(frozen=True)
class VersionRef:
    """What a prediction needs of a version, without loading the whole row."""

    client_id: str
    version: int
    uid: str
    meta_model_version: str
    labels: list[int | str] | None
    out_of_scope_threshold: float | None = None  # None: the meta-model's default


def versions_of(
    *, session: Session, tenant_id: str, wanted: Sequence[tuple[str, int | None]]
) -> dict[tuple[str, int | None], VersionRef]:
    """Many clients' versions in one query: each of ``wanted`` is (client_id, version),
    version ``None`` meaning the current one. The answer is keyed like ``wanted``; what
    was not found is absent."""
    current = sorted({client for client, version in wanted if version is None})
    pinned = sorted({(c, v) for c, v in wanted if v is not None})
    conditions: list[ColumnElement[bool]] = []
    if current:
        conditions.append(
            and_(
                ClientVersion.client_id.in_(current),
                ClientVersion.version == Client.current_version,
            )
        )
    if pinned:
        conditions.append(tuple_(ClientVersion.client_id, ClientVersion.version).in_(pinned))
    if not conditions:
        return {}
    stmt = (
        select(
            ClientVersion.client_id,
            ClientVersion.version,
            ClientVersion.uid,
            ClientVersion.meta_model_version,
            ClientVersion.labels,
            ClientVersion.out_of_scope_threshold,
            Client.current_version,
        )
        .join(Client)
        .where(ClientVersion.tenant_id == tenant_id, or_(*conditions))
    )
    found: dict[tuple[str, int | None], VersionRef] = {}
    for client_id, version, uid, sha, labels, threshold, current_version in session.execute(stmt):
        ref = VersionRef(client_id, version, uid, sha, labels, threshold)
        found[(client_id, version)] = ref
        if version == current_version:
            found[(client_id, None)] = ref
    return found


def params_of(*, session: Session, tenant_id: str, uids: Sequence[str]) -> dict[str, bytes]:
    """The adapted parameters of many versions (of the tenant) by ``uid``, in one query;
    a version deleted meanwhile is absent."""
    if not uids:
        return {}
    stmt = select(ClientVersion.uid, ClientVersion.params).where(
        ClientVersion.tenant_id == tenant_id, ClientVersion.uid.in_(sorted(set(uids)))
    )
    return {str(uid): bytes(params) for uid, params in session.execute(stmt)}
