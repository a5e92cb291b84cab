"""Repository functions: keyword-only arguments, the caller's transaction, never a commit."""

from __future__ import annotations

from sqlalchemy import delete, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload

from service.store.tables import Client, ClientVersion, utcnow


def lock_client(*, session: Session, tenant_id: str, client_id: str) -> int:
    """Create the client if it is new, lock its row until the transaction ends, and
    return its current version (0 for a new client).

    One ``INSERT ... ON CONFLICT DO UPDATE`` does both on PostgreSQL (the row lock) and
    on SQLite (the first write of a transaction takes the database's write lock), so two
    racing adaptations of a client serialise here instead of both reading version N.
    """
    now = utcnow()
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    stmt = (
        insert(Client)
        .values(
            tenant_id=tenant_id,
            client_id=client_id,
            current_version=0,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_update(index_elements=["tenant_id", "client_id"], set_={"updated_at": now})
        .returning(Client.current_version)
    )
    return int(session.execute(stmt).scalar_one())


def append_version(*, session: Session, row: ClientVersion) -> ClientVersion:
    """Store ``row`` as the next version of its client (created if new) and make it current."""
    current = lock_client(session=session, tenant_id=row.tenant_id, client_id=row.client_id)
    row.version = current + 1
    session.add(row)
    session.flush()
    session.execute(
        update(Client)
        .where(Client.tenant_id == row.tenant_id, Client.client_id == row.client_id)
        .values(current_version=row.version)
    )
    return row


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


def load_params(*, session: Session, tenant_id: str, client_id: str, version: int) -> bytes | None:
    """The adapted parameters (safetensors bytes) of one version."""
    stmt = select(ClientVersion.params).where(
        ClientVersion.tenant_id == tenant_id,
        ClientVersion.client_id == client_id,
        ClientVersion.version == version,
    )
    return session.scalars(stmt).one_or_none()


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
