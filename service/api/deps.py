"""Dependencies as ``Annotated`` aliases: a route's signature reads as its contract.

``RuntimeDep`` carries the service's long-lived parts (engine, commits, meta-models,
settings), which the lifespan builds once. They are ``async def`` although none awaits:
FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop each, which at
high concurrency cost the event loop more than parsing the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, cast

from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session, sessionmaker

from service.usecases import DEFAULT_TENANT, Runtime

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


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for the request, closed after it (on the event loop: a session connects
    lazily, in the route's thread, and closing only hands its connection back to the
    pool, rolling back a read-only transaction at most)."""
    sessions = cast(sessionmaker[Session], request.app.state.sessions)
    with sessions() as session:
        yield session


async def get_tenant() -> str:
    """Everyone is the default tenant until API keys arrive."""
    return DEFAULT_TENANT


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SessionDep = Annotated[Session, Depends(get_session)]
TenantDep = Annotated[str, Depends(get_tenant)]
ClientId = Annotated[str, Path(pattern=CLIENT_ID_PATTERN, description=CLIENT_ID_RULE)]
