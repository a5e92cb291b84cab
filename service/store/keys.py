"""Repository functions for API keys: keyword-only, the caller's transaction, no commit."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.store.tables import ApiKey


def add_key(*, session: Session, key: ApiKey) -> None:
    session.add(key)
    session.flush()


def find_by_hash(*, session: Session, key_hash: str) -> ApiKey | None:
    """The key whose SHA-256 is ``key_hash``, revoked or not."""
    return session.scalars(select(ApiKey).where(ApiKey.key_hash == key_hash)).one_or_none()


def list_keys(*, session: Session, tenant_id: str | None = None) -> Sequence[ApiKey]:
    """Every key (of ``tenant_id``, if given), oldest first."""
    stmt = select(ApiKey).order_by(ApiKey.tenant_id, ApiKey.created_at, ApiKey.id)
    if tenant_id is not None:
        stmt = stmt.where(ApiKey.tenant_id == tenant_id)
    return session.scalars(stmt).all()


def get_key(*, session: Session, key_id: str, tenant_id: str | None = None) -> ApiKey | None:
    """The key ``key_id`` (only if it is ``tenant_id``'s, when given)."""
    key = session.get(ApiKey, key_id)
    if key is None or (tenant_id is not None and key.tenant_id != tenant_id):
        return None
    return key


def revoke_key(*, session: Session, key_id: str, at: datetime) -> None:
    """Mark the key revoked at ``at``, unless it already was (the first time stands)."""
    session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=at)
        .execution_options(synchronize_session="fetch")
    )
