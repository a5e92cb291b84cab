"""Dependencies as ``Annotated`` aliases: a route's signature reads as its contract.

They are ``async def`` although none awaits: FastAPI runs a plain ``def`` dependency
in its thread pool, a thread hop each, which at high concurrency cost the event loop
more than parsing the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, cast

from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session, sessionmaker

from service.engine import Engine
from service.settings import Settings
from service.store.group_commit import GroupCommit
from service.usecases import DEFAULT_TENANT, MetaModels

CLIENT_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"


async def get_settings(request: Request) -> Settings:
    return cast(Settings, request.app.state.settings)


async def get_engine(request: Request) -> Engine:
    return cast(Engine, request.app.state.engine)


async def get_commits(request: Request) -> GroupCommit:
    return cast(GroupCommit, request.app.state.commits)


async def get_meta_models(request: Request) -> MetaModels:
    return cast(MetaModels, request.app.state.meta_models)


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


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
CommitsDep = Annotated[GroupCommit, Depends(get_commits)]
MetaModelsDep = Annotated[MetaModels, Depends(get_meta_models)]
SessionDep = Annotated[Session, Depends(get_session)]
TenantDep = Annotated[str, Depends(get_tenant)]
ClientId = Annotated[
    str, Path(pattern=CLIENT_ID_PATTERN, description="1-128 characters of [A-Za-z0-9._-].")
]
