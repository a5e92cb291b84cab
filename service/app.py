"""The application factory and its lifespan: load meta-models, open the database, run
the engine."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from models.checkpoint import MetaModel, discover
from service.api import errors, routes
from service.api.middleware import BodyLimit
from service.engine import Engine
from service.settings import Settings
from service.store.session import connect, session_factory

log = logging.getLogger(__name__)


def load_meta_models(directory: Path) -> dict[str, MetaModel]:
    """Every artifact directly under ``directory``, by name (checksums verified)."""
    loaded: dict[str, MetaModel] = {}
    for path in discover(directory):
        meta_model = MetaModel.load(path)
        if meta_model.name in loaded:
            raise ValueError(f"two artifacts named {meta_model.name!r} under {directory}")
        loaded[meta_model.name] = meta_model
        log.info("loaded meta-model %s@%s from %s", meta_model.name, meta_model.version[:12], path)
    if not loaded:
        log.warning("no meta-model artifacts under %s: /readyz will answer 503", directory)
    return loaded


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    meta_models = load_meta_models(settings.models_dir)
    database = connect(settings.database_url)
    engine = Engine(meta_models, settings)
    engine.start()
    app.state.meta_models = meta_models
    app.state.sessions = session_factory(database)
    app.state.engine = engine
    try:
        yield
    finally:
        engine.stop()
        database.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app; ``settings`` default to the ``FASTADAPT_*`` environment."""
    app = FastAPI(
        title="fastadapt",
        summary="Fast per-client task adaptation with MAML.",
        version="1",
        lifespan=lifespan,
    )
    app.state.settings = Settings() if settings is None else settings
    app.add_middleware(BodyLimit, max_bytes=app.state.settings.max_body_bytes)
    errors.install(app)
    app.include_router(routes.router)
    return app
