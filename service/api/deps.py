"""Dependencies as ``Annotated`` aliases: a route's signature reads as its contract.

``RuntimeDep`` carries the service's long-lived parts (engine, commits, meta-models,
settings), which the lifespan builds once. ``PrincipalDep`` authenticates a request (the
app includes every /v1 router with it, so no /v1 route is open by omission); ``TenantDep``
is the caller's tenant and ``AdminDep`` refuses keys without the admin scope. They are
``async def`` although few await: FastAPI runs a plain ``def`` dependency in its thread
pool, a thread hop each, which at high concurrency cost the event loop more than parsing
the request (a key lookup that misses the cache is the one hop, into a worker thread).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from functools import partial
from typing import Annotated, cast

from anyio import to_thread
from fastapi import Depends, Header, Path, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service import usecases
from service.auth import Guard, Principal, token_hash
from service.errors import Forbidden, Unauthorized
from service.usecases import DEFAULT_TENANT, Runtime
from service.usecases.idempotency import IdempotencyKey

# 1-128 characters of [A-Za-z0-9._-], but not "." or "..": URLs resolve those as path
# segments ("/v1/clients/../x" is "/v1/x"), so such a client would be unreachable. Spelled
# without a lookahead, which pydantic's regex engine lacks: one character that is not a
# dot, two that are not both dots, or three or more.
CLIENT_ID_PATTERN = (
    r"^(?:[A-Za-z0-9_-]|[A-Za-z0-9_-][A-Za-z0-9._-]|\.[A-Za-z0-9_-]|[A-Za-z0-9._-]{3,128})$"
)
CLIENT_ID_RULE = '1-128 characters of [A-Za-z0-9._-], other than "." and "..".'


async def get_runtime(request: Request) -> Runtime:
    return cast(Runtime, request.app.state.runtime)


Sessions = Callable[[], AbstractContextManager[Session]]  # ``with sessions() as session:``


async def get_sessions(request: Request) -> Sessions:
    """How a request opens sessions: the app's factory (a test overrides it with one that
    answers the session of its own transaction). Routes that may need no session at all
    (a prediction of a kept version) take this instead of ``SessionDep``: a generator
    dependency costs its exit stack on every request."""
    return cast(Sessions, request.app.state.sessions)


async def get_session(
    sessions: Annotated[Sessions, Depends(get_sessions)],
) -> AsyncIterator[Session]:
    """A session for the request, closed after it (on the event loop: a session connects
    lazily, in the route's thread, and closing only hands its connection back to the
    pool, rolling back a read-only transaction at most)."""
    with sessions() as session:
        yield session


bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key (`fastadapt keys create`), as `Authorization: Bearer fa_...`. "
    "Optional only on a server bound to loopback with FASTADAPT_AUTH=auto.",
)
OPEN = Principal(tenant_id=DEFAULT_TENANT, scope="admin", key_id=None)  # no keys: loopback


async def get_principal(
    request: Request,
    sessions: Annotated[Sessions, Depends(get_sessions)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> Principal:
    """The caller: its key's tenant and scope (401 without a valid key, or with an invalid
    one even where keys are optional), within its tenant's rate limit (429). A key found
    in the database is trusted for ``auth_cache_s``; only a miss reads the database, in a
    worker thread. Sets ``request.state.tenant_id`` and ``request.state.key_id`` (None
    without a key) for the access log."""
    guard = cast(Guard, request.app.state.guard)
    if credentials is None:  # without keys (loopback only), everyone is the default tenant
        if guard.required_for(request.scope.get("server")):
            raise Unauthorized("missing API key: send Authorization: Bearer <key>")
        principal = OPEN
    else:  # a key, when sent, is checked even where keys are optional
        principal = await _principal_of(guard, sessions, credentials.credentials)
    request.state.tenant_id = principal.tenant_id
    request.state.key_id = principal.key_id
    guard.limits.take(principal.tenant_id)
    return principal


async def _principal_of(guard: Guard, sessions: Sessions, token: str) -> Principal:
    """The key's principal: trusted from the cache, else looked up once for every request
    that misses it meanwhile (when a busy key's entry expires, its concurrent requests
    would otherwise each read the database in a thread of their own)."""
    digest = token_hash(token)
    cached = guard.keys.get(digest)
    if cached is not None:
        return cached
    lookup = guard.lookups.get(digest)
    if lookup is None:
        lookup = asyncio.ensure_future(_look_up(guard, sessions, token, digest))
        guard.lookups[digest] = lookup
        lookup.add_done_callback(lambda _: guard.lookups.pop(digest, None))
    return await asyncio.shield(lookup)  # a caller that goes away leaves it to the others


async def _look_up(guard: Guard, sessions: Sessions, token: str, digest: str) -> Principal:
    principal = await to_thread.run_sync(partial(_authenticate, sessions, token))
    guard.keys.put(digest, principal)
    return principal


def _authenticate(sessions: Sessions, token: str) -> Principal:
    with sessions() as session:
        return usecases.keys.authenticate(session=session, token=token)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_tenant(principal: PrincipalDep) -> str:
    """The caller's tenant: client ids are scoped to it."""
    return principal.tenant_id


async def require_admin(principal: PrincipalDep) -> Principal:
    """The caller, if its key has the admin scope (else 403)."""
    if not principal.is_admin:
        raise Forbidden("this needs an API key with the admin scope")
    return principal


async def get_idempotency(
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Makes retrying safe: a retry with the same key and body answers "
            "the first response (`Idempotent-Replayed: true`) and creates nothing; the same "
            "key with another request is 422; while the first is in progress, 409 with "
            "Retry-After. 1-255 printable ASCII characters, per tenant; kept for "
            "FASTADAPT_IDEMPOTENCY_TTL_S.",
        ),
    ] = None,
) -> IdempotencyKey | None:
    """The request's ``Idempotency-Key``, validated, with the hash of the request it names
    (the body is read here; FastAPI reuses it)."""
    if idempotency_key is None:
        return None
    body = await request.body()
    return usecases.idempotency.key_of(
        idempotency_key, method=request.method, path=request.url.path, body=body
    )


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
IdempotencyDep = Annotated[IdempotencyKey | None, Depends(get_idempotency)]
SessionDep = Annotated[Session, Depends(get_session)]
SessionsDep = Annotated[Sessions, Depends(get_sessions)]
TenantDep = Annotated[str, Depends(get_tenant)]
AdminDep = Annotated[Principal, Depends(require_admin)]
ClientId = Annotated[str, Path(pattern=CLIENT_ID_PATTERN, description=CLIENT_ID_RULE)]
