"""Repository functions of the meta-model registry: keyword-only arguments, the caller's
transaction, never a commit.

Registering and first promotions are ``INSERT ... ON CONFLICT DO NOTHING`` (SQLite and
PostgreSQL alike), so several replicas starting at once register an artifact once and
never fail on each other's rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import cast

from sqlalchemy import Table, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, undefer

from service.store.tables import MetaModelName, MetaModelVersion


def _insert(
    session: Session, cls: type[MetaModelVersion] | type[MetaModelName]
) -> postgresql.Insert | sqlite.Insert:
    table = cast(Table, cls.__table__)
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def add_version(
    *,
    session: Session,
    sha: str,
    name: str,
    config: str,
    weights: bytes,
    source: str,
    at: datetime,
) -> bool:
    """Register a version unless its sha is already registered; True if this call added it."""
    stmt = (
        _insert(session, MetaModelVersion)
        .values(
            sha=sha,
            name=name,
            config=config,
            weights=weights,
            size_bytes=len(weights),
            source=source,
            registered_at=at,
        )
        .on_conflict_do_nothing(index_elements=["sha"])
        .returning(MetaModelVersion.sha)
    )
    return session.execute(stmt).first() is not None


def get_version(*, session: Session, sha: str, weights: bool = False) -> MetaModelVersion | None:
    """One version's record; its weights only when asked for."""
    options = [undefer(MetaModelVersion.weights)] if weights else []
    return session.get(MetaModelVersion, sha, options=options)


def find_versions(*, session: Session, prefix: str) -> Sequence[str]:
    """The shas that start with ``prefix`` (lower-case hex), at most two."""
    stmt = select(MetaModelVersion.sha).where(MetaModelVersion.sha.startswith(prefix)).limit(2)
    return session.scalars(stmt).all()


def list_versions(*, session: Session, name: str | None = None) -> Sequence[MetaModelVersion]:
    """Registered versions (without weights), of one name or of all, oldest first."""
    stmt = select(MetaModelVersion).order_by(
        MetaModelVersion.name, MetaModelVersion.registered_at, MetaModelVersion.sha
    )
    if name is not None:
        stmt = stmt.where(MetaModelVersion.name == name)
    return session.scalars(stmt).all()


def promoted(*, session: Session) -> Sequence[MetaModelName]:
    """Every name with its promoted version."""
    return session.scalars(select(MetaModelName).order_by(MetaModelName.name)).all()


def promote_if_none(*, session: Session, name: str, sha: str, at: datetime) -> bool:
    """Promote ``sha`` for ``name`` unless the name has a promoted version; True if it did."""
    stmt = (
        _insert(session, MetaModelName)
        .values(name=name, promoted_sha=sha, promoted_at=at)
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(MetaModelName.name)
    )
    return session.execute(stmt).first() is not None


def promote(*, session: Session, name: str, sha: str, at: datetime) -> None:
    """Make ``sha`` the promoted version of ``name`` (whatever it was)."""
    if not promote_if_none(session=session, name=name, sha=sha, at=at):
        session.execute(
            update(MetaModelName)
            .where(MetaModelName.name == name)
            .values(promoted_sha=sha, promoted_at=at)
        )
