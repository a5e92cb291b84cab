"""The application factory and its lifespan: load meta-models, open the database, run
the engine."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import cast

from anyio import to_thread
from fastapi import Depends, FastAPI
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from models import tasks
from models.checkpoint import MetaModel, discover
from service.api import bulk, docs, errors, jobs, keys, links, metrics, routes, stats, versions
from service.api import meta_models as meta_model_routes
from service.api.deps import get_principal, get_sessions
from service.api.middleware import BodyLimit
from service.api.observe import Observe
from service.auth import Guard
from service.background import Reconciler
from service.engine import Backend, Engine, configure_threads
from service.engine.remote import RemoteEngine
from service.settings import Settings
from service.store.group_commit import GroupCommit
from service.store.rowcache import RowCache
from service.store.session import connect, session_factory
from service.usecases import Runtime, meta_models
from service.usecases.registry import ModelRegistry

log = logging.getLogger(__name__)


def load_meta_models(directory: Path) -> dict[str, MetaModel]:
    """Every artifact directly under ``directory``, by name (checksums verified), without
    a database: for tests and tools; the service registers them (``register_shipped``)."""
    loaded: dict[str, MetaModel] = {}
    for path in discover(directory):
        meta_model = MetaModel.load(path)
        tasks.family(meta_model.config.family)  # a KeyError naming the known families
        if meta_model.name in loaded:
            raise ValueError(f"two artifacts named {meta_model.name!r} under {directory}")
        loaded[meta_model.name] = meta_model
    return loaded


def start_registry(
    settings: Settings, sessions: Callable[[], ContextManager[Session]]
) -> ModelRegistry:
    """Register the shipped artifacts (the start-up rule of ``usecases.meta_models``) and
    load the promoted version of every name, for the engine to warm up. With the database
    down, the service starts anyway (/readyz answers 503) and registers them on the first
    read of the registry that succeeds."""
    registry = ModelRegistry(settings)
    registry.pending = partial(
        meta_models.register_shipped, registry=registry, directory=settings.models_dir
    )
    try:
        with sessions() as session:
            for name in registry.promotions(session):
                model = registry.promoted(session, name)
                log.info("meta-model %s: promoted version %s", name, model.version[:12])
    except SQLAlchemyError as exc:
        log.warning(
            "the database is unavailable (%s): the shipped meta-models are registered once "
            "it answers",
            type(exc).__name__,
        )
    else:
        if not registry.names():
            log.warning("no meta-model is registered: /readyz will answer 503")
    return registry


def startup_sessions(app: FastAPI) -> Callable[[], ContextManager[Session]]:
    """Sessions for start-up work: those requests get (a test's own, when it overrides
    ``get_sessions``, so that what start-up writes is rolled back with the test)."""
    override = app.dependency_overrides.get(get_sessions)
    if override is None:
        return cast(Callable[[], ContextManager[Session]], app.state.sessions)
    return cast(Callable[[], ContextManager[Session]], override())


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    configure_threads(settings.threads)  # torch's, for the whole process (the worker too)
    app.state.stopping.clear()  # serving (again: an app's lifespan may run more than once)
    database = connect(settings.database_url)
    app.state.sessions = session_factory(database)
    registry = start_registry(settings, startup_sessions(app))
    app_metrics: metrics.Metrics | None = app.state.metrics
    observer = None if app_metrics is None else app_metrics.observer
    engine: Backend
    if settings.engine_socket:  # a front of `serve --workers N`: the device is elsewhere
        engine = RemoteEngine(
            dict(loaded_models(registry)),
            settings,
            settings.engine_socket,
            loop=asyncio.get_running_loop(),
        )
    else:
        engine = Engine(dict(loaded_models(registry)), settings, observer=observer)
    registry.engine = engine  # versions the registry unloads leave the device too
    engine.start()
    app.state.runtime = Runtime(
        engine=engine,
        commits=GroupCommit(keep=settings.versions_kept),
        registry=registry,
        settings=settings,
        # off under a test's own session: its commits stay in its transaction
        predictables=RowCache(None if get_sessions in app.dependency_overrides else database),
    )
    if app_metrics is not None:
        app_metrics.attach(app.state.runtime)
    reconciler = app.state.reconciler = Reconciler(app.state.sessions, app.state.runtime)
    # Sync routes wait for the engine in anyio's worker threads (40 by default): give
    # every job the engine may hold a thread, so that under overload the engine's bounded
    # queue refuses (503 + Retry-After) instead of requests queueing for a thread.
    to_thread.current_default_thread_limiter().total_tokens = request_threads(settings)
    # torch and the start-up leave ~300k long-lived objects that every full collection
    # would rescan; per-request garbage triggers those often enough to triple a job's
    # overhead (measured in phase 1). Frozen objects are still freed by reference counting.
    gc.collect()
    gc.freeze()
    reconciler.start()  # after the freeze: its objects are short-lived
    try:
        yield
    finally:
        app.state.stopping.set()
        reconciler.stop()  # before the engine: the client in hand finishes
        engine.stop(timeout=settings.shutdown_timeout_s)  # queued jobs finish, within bounds
        app.state.runtime.predictables.close()
        database.dispose()
        gc.unfreeze()  # back to the collector (tests start many apps in one process)


def stop(app: FastAPI) -> None:
    """The server was told to stop: /readyz answers 503 from now on (requests in flight
    finish; the server closes its listener and, once they are done, runs the lifespan's end)."""
    if not app.state.stopping.is_set():
        app.state.stopping.set()
        log.info("stopping: /readyz answers 503, requests in flight finish")


def loaded_models(registry: ModelRegistry) -> Iterator[tuple[str, MetaModel]]:
    """The versions the registry holds now (the promoted ones at start-up), by sha."""
    for sha in registry.loaded():
        model = registry.cached(sha)
        if model is not None:
            yield sha, model


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
        # one spelling per path: a trailing slash is a 404, not a 307 to the path without
        # it (which a DELETE or POST following it would meet with a 405 or a lost body)
        redirect_slashes=False,
    )
    settings = app.state.settings = Settings() if settings is None else settings
    app.state.stopping = threading.Event()  # set on SIGTERM (``stop``): /readyz answers 503
    app.state.guard = Guard(settings)  # keys needed?, trusted keys, rate limits
    app.state.metrics = metrics.Metrics(settings) if settings.metrics else None
    uploads = {"/v1/meta-models": settings.max_model_upload_bytes}  # when allowed at all
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
        paths=uploads if settings.allow_model_upload else None,
    )
    # outermost (added last): ids, counts and log lines for every answer, 413s included
    app.add_middleware(Observe, api=app, metrics=app.state.metrics, access=settings.access_log)
    errors.install(app)
    docs.install(app)
    links.install(app)  # OpenAPI links: adapt -> predict -> history -> delete
    app.include_router(routes.health)  # open: probes
    authenticated = [Depends(get_principal)]  # every /v1 route: 401 / 429 before the route
    routers = (
        routes.router,
        meta_model_routes.router,
        versions.router,
        jobs.router,
        stats.router,
        keys.router,
        bulk.router,
    )
    for router in routers:
        app.include_router(router, dependencies=authenticated, responses=routes.AUTH_ERRORS)
    if settings.metrics:
        app.include_router(metrics.router, responses=routes.AUTH_ERRORS)  # admin scope
    return app
