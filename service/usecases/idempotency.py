"""Safe retries: a POST that creates a version, sent with an ``Idempotency-Key``, is done
once; a retry with the same key and the same request answers the original response.

The key and the request's hash (method, path, canonical JSON body) are stored on the
version row itself, inserted in the same group commit as the version: an acknowledged
version always has its key recorded, and a version that was not stored has none, so
there is no second table to keep in step and nothing to clean up when a client is deleted.
Keys are unique per tenant (a database constraint), so two processes racing with the
same key cannot both store a version: the loser's insert fails and it replays the
winner's. Within one process, a duplicate that arrives while the first is in flight is
refused at once with a retryable 409 (``Runtime.in_flight``).

A stored key replays for ``idempotency_ttl_s`` after its version was made; after that it
is released (the old version keeps its data, not the key) and the request runs anew. A
key vanishes with its version: when the client is deleted (or the version pruned).

Any use case that creates a version adopts this by taking ``idempotency`` and calling
``stamp(row, idempotency)`` before appending the row; its route wraps the call in
``once`` (see ``service/api/routes.py``'s ``adapt``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session

from service.errors import Conflict, InvalidInput
from service.store import repository
from service.store.tables import ClientVersion, utcnow
from service.usecases.runtime import Runtime, storing

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class IdempotencyKey:
    key: str  # as the client sent it: 1-255 printable ASCII characters
    request_hash: str  # sha256 hex of the method, the path and the canonical body


@dataclass(frozen=True)
class Created:
    version: ClientVersion
    replayed: bool  # True: the stored answer to an earlier request with the same key


def key_of(header: str | None, *, method: str, path: str, body: bytes) -> IdempotencyKey | None:
    """The validated key of a request (None without the header); 422 naming the header."""
    if header is None:
        return None
    if not 1 <= len(header) <= MAX_KEY_LENGTH:
        raise InvalidInput(HEADER, f"must be 1-{MAX_KEY_LENGTH} characters long")
    if not all(" " <= c <= "~" for c in header):
        raise InvalidInput(HEADER, "must be printable ASCII characters")
    return IdempotencyKey(header, request_hash(method=method, path=path, body=body))


def request_hash(*, method: str, path: str, body: bytes) -> str:
    """sha256 of the method, the path and the body as canonical JSON (keys sorted, no
    spaces), so the same request re-encoded hashes the same; a body that is not JSON is
    hashed as it is (the request is refused anyway)."""
    try:
        canonical = json.dumps(
            json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    except (ValueError, RecursionError):
        canonical = body
    digest = hashlib.sha256(f"{method.upper()}\n{path}\n".encode())
    digest.update(canonical)
    return digest.hexdigest()


def stamp(row: ClientVersion, idempotency: IdempotencyKey | None) -> ClientVersion:
    """Record on a new version the key of the request that makes it (stored with it)."""
    if idempotency is not None:
        row.idempotency_key = idempotency.key
        row.request_hash = idempotency.request_hash
    return row


@storing
def once(
    *,
    session: Session,
    runtime: Runtime,
    tenant_id: str,
    key: IdempotencyKey | None,
    create: Callable[[IdempotencyKey | None], ClientVersion],
) -> Created:
    """``create(key)`` (a use case that stamps its new version with ``key``), unless a
    version was already made with this key: then that version, ``replayed``. The same key
    with another request is 422; while a request with it is in flight here, 409."""
    if key is None:
        return Created(create(None), replayed=False)
    with runtime.in_flight.hold(tenant_id, key.key):
        found = _stored(session=session, runtime=runtime, tenant_id=tenant_id, key=key)
        session.close()  # create() appends through the group commit: nothing pending
        if found is not None:
            return Created(found, replayed=True)
        try:
            return Created(create(key), replayed=False)
        except Conflict:  # another process stored the key first: its answer is ours
            found = _stored(session=session, runtime=runtime, tenant_id=tenant_id, key=key)
            session.close()
            if found is None:
                raise
            return Created(found, replayed=True)


def _stored(
    *, session: Session, runtime: Runtime, tenant_id: str, key: IdempotencyKey
) -> ClientVersion | None:
    """The live version made with ``key``; an expired one's key is released (committed)."""
    row = repository.find_idempotent(session=session, tenant_id=tenant_id, idempotency_key=key.key)
    if row is None:
        return None
    cutoff = utcnow() - timedelta(seconds=runtime.settings.idempotency_ttl_s)
    if row.created_at < cutoff:
        repository.release_idempotency_key(
            session=session, tenant_id=tenant_id, idempotency_key=key.key, made_before=cutoff
        )
        session.commit()
        return None
    if row.request_hash != key.request_hash:
        raise InvalidInput(
            HEADER,
            f"was already used with a different request (version {row.version} of client "
            f"{row.client_id!r}); send a new key for a new request",
        )
    return row
