"""The application factory and its lifespan: load meta-models, open the database, run
the engine."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from anyio import to_thread
from fastapi import Depends, FastAPI

from models import tasks
from models.checkpoint import MetaModel, discover
from service.api import docs, errors, keys, links, metrics, routes, stats, versions
from service.api.deps import get_principal
from service.api.middleware import BodyLimit
from service.api.observe import Observe
from service.auth import Guard
from service.engine import Engine, configure_threads
from service.settings import Settings
from service.store.group_commit import GroupCommit
from service.store.session import connect, session_factory
from service.usecases import Runtime

log = logging.getLogger(__name__)


def load_meta_models(directory: Path) -> dict[str, MetaModel]:
    """Every artifact directly under ``directory``, by name (checksums verified)."""
    loaded: dict[str, MetaModel] = {}
    for path in discover(directory):
        meta_model = MetaModel.load(path)
        tasks.family(meta_model.config.family)  # a KeyError naming the known families
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
    configure_threads(settings.threads)  # torch's, for the whole process (the worker too)
    meta_models = load_meta_models(settings.models_dir)
    database = connect(settings.database_url)
    app_metrics: metrics.Metrics | None = app.state.metrics
    observer = None if app_metrics is None else app_metrics.observer
    engine = Engine(meta_models, settings, observer=observer)
    engine.start()
    app.state.sessions = session_factory(database)
    app.state.runtime = Runtime(
        engine=engine,
        commits=GroupCommit(keep=settings.versions_kept),
        meta_models=meta_models,
        settings=settings,
    )
    if app_metrics is not None:
        app_metrics.attach(app.state.runtime)
    # Sync routes wait for the engine in anyio's worker threads (40 by default): give
    # every job the engine may hold a thread, so that under overload the engine's bounded
    # queue refuses (503 + Retry-After) instead of requests queueing for a thread.
    to_thread.current_default_thread_limiter().total_tokens = request_threads(settings)
    # torch and the start-up leave ~300k long-lived objects that every full collection
    # would rescan; per-request garbage triggers those often enough to triple a job's
    # overhead (measured in phase 1). Frozen objects are still freed by reference counting.
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        engine.stop()
        database.dispose()
        gc.unfreeze()  # back to the collector (tests start many apps in one process)


def request_threads(settings: Settings) -> int:
    """Threads that may run requests at once: every queued job plus a running batch."""
    return settings.queue_size + settings.max_batch_size


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app; ``settings`` default to the ``FASTADAPT_*`` environment."""
    app = FastAPI(
        title="fastadapt",
        summary="Fast per-client task adaptation with MAML.",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # docs.install serves /docs and /redoc with local assets
        redoc_url=None,
    )
    settings = app.state.settings = Settings() if settings is None else settings
    app.state.guard = Guard(settings)  # keys needed?, trusted keys, rate limits
    app.state.metrics = metrics.Metrics(settings) if settings.metrics else None
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    # outermost (added last): ids, counts and log lines for every answer, 413s included
    app.add_middleware(Observe, api=app, metrics=app.state.metrics, access=settings.access_log)
    errors.install(app)
    docs.install(app)
    links.install(app)  # OpenAPI links: adapt -> predict -> history -> delete
    app.include_router(routes.health)  # open: probes
    authenticated = [Depends(get_principal)]  # every /v1 route: 401 / 429 before the route
    for router in (routes.router, stats.router, keys.router, versions.router):
        app.include_router(router, dependencies=authenticated, responses=routes.AUTH_ERRORS)
    if settings.metrics:
        app.include_router(metrics.router, responses=routes.AUTH_ERRORS)  # admin scope
    return app
