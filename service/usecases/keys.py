"""API keys: create, list, revoke, and who a presented key belongs to."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service import auth
from service.auth import Principal
from service.errors import NotFound, Unauthorized, Unavailable
from service.store import keys as store
from service.store.tables import ApiKey, utcnow

INVALID_KEY = "invalid API key (unknown or revoked)"


@dataclass(frozen=True)
class CreatedKey:
    key: ApiKey
    token: str  # the key itself: shown once, never stored


def create(*, session: Session, tenant_id: str, scope: str) -> CreatedKey:
    """A new key for the tenant (the tenant exists once it has a key)."""
    auth.check_tenant(tenant_id)
    checked = auth.check_scope(scope)
    token = auth.new_token()
    key = ApiKey(
        id=auth.new_key_id(),
        tenant_id=tenant_id,
        scope=checked,
        key_hash=auth.token_hash(token),
        created_at=utcnow(),
        revoked_at=None,
    )
    store.add_key(session=session, key=key)
    session.commit()
    return CreatedKey(key, token)


def list_all(*, session: Session, tenant_id: str | None = None) -> Sequence[ApiKey]:
    if tenant_id is not None:
        auth.check_tenant(tenant_id)
    return store.list_keys(session=session, tenant_id=tenant_id)


def revoke(*, session: Session, key_id: str, tenant_id: str | None = None) -> ApiKey:
    """Revoke the key (of ``tenant_id``, when given: another tenant's key is unknown).
    Revoking a revoked key changes nothing."""
    key = store.get_key(session=session, key_id=key_id, tenant_id=tenant_id)
    if key is None:
        raise NotFound(f"unknown key {key_id!r}")
    store.revoke_key(session=session, key_id=key_id, at=utcnow())
    session.commit()
    session.refresh(key)
    return key


def authenticate(*, session: Session, token: str) -> Principal:
    """The tenant and scope of a presented key, or ``Unauthorized``; the database is read
    by the key's hash, and the hashes compared in constant time."""
    if not auth.well_formed(token):
        raise Unauthorized(INVALID_KEY)
    digest = auth.token_hash(token)
    try:
        key = store.find_by_hash(session=session, key_hash=digest)
        found = None if key is None else (key.id, key.tenant_id, key.scope, key.key_hash)
        revoked = key is not None and key.revoked_at is not None
    except SQLAlchemyError as exc:
        raise Unavailable(
            f"cannot check the API key: the database is unreachable ({type(exc).__name__})",
            retry_after=1.0,
        ) from None
    finally:
        session.close()  # no connection is held for the rest of the request's wait
    if found is None or revoked or not hmac.compare_digest(found[3], digest):
        raise Unauthorized(INVALID_KEY)
    return Principal(tenant_id=found[1], scope=auth.check_scope(found[2]), key_id=found[0])
