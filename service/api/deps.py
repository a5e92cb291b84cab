"""Dependencies as ``Annotated`` aliases: a route's signature reads as its contract."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, cast

from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session, sessionmaker

from service.engine import Engine
from service.settings import Settings
from service.usecases import DEFAULT_TENANT, MetaModels

CLIENT_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"


def get_settings(request: Request) -> Settings:
    return cast(Settings, request.app.state.settings)


def get_engine(request: Request) -> Engine:
    return cast(Engine, request.app.state.engine)


def get_meta_models(request: Request) -> MetaModels:
    return cast(MetaModels, request.app.state.meta_models)


def get_session(request: Request) -> Iterator[Session]:
    sessions = cast(sessionmaker[Session], request.app.state.sessions)
    with sessions() as session:
        yield session


def get_tenant() -> str:
    """Everyone is the default tenant until API keys arrive."""
    return DEFAULT_TENANT


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
MetaModelsDep = Annotated[MetaModels, Depends(get_meta_models)]
SessionDep = Annotated[Session, Depends(get_session)]
TenantDep = Annotated[str, Depends(get_tenant)]
ClientId = Annotated[
    str, Path(pattern=CLIENT_ID_PATTERN, description="1-128 characters of [A-Za-z0-9._-].")
]
