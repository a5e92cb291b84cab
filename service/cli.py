"""The ``fastadapt`` command: serve, migrate, keys, meta-models, reconcile, train, eval."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from sqlalchemy import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service.auth import SCOPES
from service.errors import FastAdaptError
from service.settings import Settings
from service.store import migrate as migrations
from service.store.session import connect, session_factory
from service.store.tables import ApiKey

if TYPE_CHECKING:
    from service.usecases.reconcile import JobStatus

log = logging.getLogger("fastadapt")
STARTUP_FAILED = 3  # the exit status of a server whose start-up failed (uvicorn's)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "train":
        return _train(args[1:])
    if args and args[0] == "eval":
        return _evaluate(args[1:])
    parsed = _parser().parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its 2 INFO lines on every call
    if parsed.command == "serve":
        return serve(host=parsed.host, port=parsed.port, workers=parsed.workers)
    if parsed.command == "_front":
        return serve(fd=parsed.fd)
    if parsed.command == "_engine":
        from service.workers import run_engine

        return run_engine(Settings(), parsed.socket)
    if parsed.command == "keys":
        return keys(parsed)
    if parsed.command == "meta-models":
        return meta_models(parsed)
    if parsed.command == "reconcile":
        return reconcile(parsed)
    return migrate()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastadapt", description="Fast per-client task adaptation with MAML."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve the HTTP API")
    serve.add_argument("--host", help="interface to bind (default: FASTADAPT_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default: FASTADAPT_PORT, 8000)")
    serve.add_argument(
        "--workers",
        type=int,
        help="HTTP front processes (default: FASTADAPT_WORKERS, 1); with 2 or more, one "
        "engine process owns the device and batches across all of them",
    )
    # the children of `serve --workers N` (service.workers), not for direct use
    front = commands.add_parser("_front")
    front.add_argument("--fd", type=int, required=True, help="the inherited listening socket")
    engine = commands.add_parser("_engine")
    engine.add_argument("--socket", required=True, help="the Unix socket to serve fronts on")
    commands.add_parser("migrate", help="apply pending database migrations")
    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a key; it is printed once, last")
    create.add_argument("--tenant", required=True, help="the key's tenant: [a-z0-9_-], 1-64")
    create.add_argument("--scope", choices=SCOPES, default="client", help="default: client")
    listing = actions.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--tenant", help="only this tenant's keys (default: every tenant's)")
    revoke = actions.add_parser("revoke", help="revoke a key: refused within 5 s everywhere")
    revoke.add_argument("id", help="the key's id (key_...), as `fastadapt keys list` shows")
    _meta_models_parser(commands)
    reconcile = commands.add_parser(
        "reconcile",
        help="re-adapt a tenant's clients of a meta-model onto its promoted version "
        "(the serving processes do the work)",
    )
    reconcile.add_argument("name", help="the meta-model")
    reconcile.add_argument("--tenant", required=True, help="whose clients")
    reconcile.add_argument("--wait", action="store_true", help="print progress until it ends")
    commands.add_parser("train", help="meta-train a meta-model (fastadapt train --help)")
    commands.add_parser("eval", help="meta-test a meta-model (fastadapt eval --help)")
    return parser


def serve(
    *,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
    fd: int | None = None,
) -> int:
    """Serve with the environment's settings; SQLite is migrated here, PostgreSQL checked.
    With ``workers`` > 1, as that many front processes and an engine process
    (``service.workers``); with ``fd``, as one of those fronts, on that inherited socket."""
    env = Settings()
    if workers is not None and workers < 1:
        print("fastadapt: --workers must be at least 1", file=sys.stderr)
        return 2
    settings = Settings(
        host=host or env.host, port=port or env.port, workers=workers or env.workers
    )
    if fd is None:
        problem = _prepare_schema(settings)
        if problem:
            print(f"fastadapt: {problem}", file=sys.stderr)
            return 2
        if settings.workers > 1:
            from service.workers import serve_workers

            return serve_workers(settings)
    import socket

    import uvicorn

    from service.app import create_app, stop

    app = create_app(settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            stop(app)  # /readyz answers 503 at once
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            access_log=False,  # uvicorn's own: its lines carry the query string
            log_config=_log_config(access=settings.access_log),
            timeout_graceful_shutdown=settings.shutdown_timeout_s,
        )
    )
    # On SIGTERM uvicorn closes its listener, lets the requests in flight finish (at most
    # shutdown_timeout_s), runs the lifespan's end (the engine drains its queue), then
    # raises the signal again with the handler found here: a graceful stop exits 0.
    if threading.current_thread() is threading.main_thread():  # (signals: main thread only)
        signal.signal(signal.SIGTERM, _stopped)
    server.run(sockets=None if fd is None else [socket.socket(fileno=fd)])
    return 0 if server.started else STARTUP_FAILED


def _stopped(signum: int, frame: FrameType | None) -> None:
    """The graceful stop is over (requests finished, engine drained, database closed): exit
    0 now. ``os._exit`` skips the interpreter's teardown of torch and ~300k objects, which
    took 9-21 s on a loaded 2-core machine, long enough for Docker's grace period to
    SIGKILL a replica that had nothing left to do."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _log_config(*, access: bool) -> dict[str, Any]:
    """uvicorn's logging, plus the ``fastadapt.access`` JSON lines alone on stdout (uvicorn
    applies it when it starts serving)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    if access:
        config["formatters"]["fastadapt.access"] = {"format": "%(message)s"}
        config["handlers"]["fastadapt.access"] = {
            "class": "logging.StreamHandler",
            "formatter": "fastadapt.access",
            "stream": "ext://sys.stdout",
        }
        config["loggers"]["fastadapt.access"] = {
            "handlers": ["fastadapt.access"],
            "level": "INFO",
            "propagate": False,  # not again, prefixed, through the root logger
        }
    return config


def migrate() -> int:
    """Create the database (a SQLite file and its folder too) or bring it up to date."""
    settings = Settings()
    try:
        before = None if _missing(settings) else migrations.current(settings.database_url)
        migrations.upgrade(settings.database_url)
    except SQLAlchemyError as exc:
        print(f"fastadapt: cannot migrate {_shown(settings)}: {exc}", file=sys.stderr)
        return 2
    head = migrations.head()
    if before == head:
        log.info("%s is at revision %s (up to date)", _shown(settings), head)
    else:
        log.info("%s migrated from revision %s to %s", _shown(settings), before or "none", head)
    return 0


def keys(parsed: argparse.Namespace) -> int:
    """``fastadapt keys create|list|revoke`` on the configured database."""
    from service.usecases import keys as usecase  # (imports the engine, hence torch)

    def work(session: Session) -> None:
        if parsed.action == "create":
            created = usecase.create(session=session, tenant_id=parsed.tenant, scope=parsed.scope)
            key = created.key
            print(f"created key {key.id} of tenant {key.tenant_id}, scope {key.scope}")
            print("store it now: it is shown only this once")
            print(created.token)
        elif parsed.action == "list":
            _print_keys(usecase.list_all(session=session, tenant_id=parsed.tenant))
        else:
            key = usecase.revoke(session=session, key_id=parsed.id)
            print(f"revoked key {key.id} of tenant {key.tenant_id}")

    return _on_database(Settings(), work)


def reconcile(parsed: argparse.Namespace, poll_s: float = 1.0) -> int:
    """``fastadapt reconcile NAME --tenant T [--wait]``: start a reconcile job (the servers
    run it; ``--wait`` prints its progress until it is done or cancelled)."""
    from service.usecases import meta_models
    from service.usecases import reconcile as usecase
    from service.usecases.registry import ModelRegistry

    settings = Settings()
    registry = ModelRegistry(settings)  # registers what this install ships, as serve does
    registry.pending = functools.partial(
        meta_models.register_shipped, registry=registry, directory=settings.models_dir
    )

    def work(session: Session) -> None:
        status = usecase.start(
            session=session, registry=registry, tenant_id=parsed.tenant, meta_model=parsed.name
        )
        job = status.job
        job_id = job.id
        print(f"job {job_id}: {job.total} clients of {job.meta_model} onto {job.target[:12]}")
        while parsed.wait:
            _print_job(status)
            if status.job.state in ("done", "cancelled"):
                break
            # End the read before waiting: each poll reads in a transaction of its own. On
            # SQLite (WAL) one kept open sees the snapshot of its first read forever, and
            # expire_all() does not end it.
            session.rollback()
            time.sleep(poll_s)
            status = usecase.get(session=session, tenant_id=parsed.tenant, job_id=job_id)

    return _on_database(settings, work)


def _print_job(status: JobStatus) -> None:
    job = status.job
    rate = "-" if status.rate is None else f"{status.rate:.1f}/s"
    eta = "-" if status.eta_s is None else f"{status.eta_s:.0f} s"
    print(
        f"{job.state}: {job.done} done, {job.failed} failed, {job.skipped} skipped of "
        f"{job.total}; {rate}, {eta} left",
        flush=True,
    )
    if job.state in ("done", "cancelled"):
        for problem in status.problems:
            print(f"  {problem.state} {problem.client_id}: {problem.reason}")


def _print_keys(rows: Sequence[ApiKey]) -> None:
    header = ("id", "tenant", "scope", "created", "revoked")
    table = [header] + [
        (
            key.id,
            key.tenant_id,
            key.scope,
            key.created_at.isoformat(timespec="seconds"),
            key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "-",
        )
        for key in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


# -- fastadapt meta-models (the registry) -----------------------------------------------------
def _meta_models_parser(commands: Any) -> None:
    parser = commands.add_parser("meta-models", help="register, promote and list meta-models")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    register = actions.add_parser(
        "register", help="register an artifact directory (sha256 checked, no pickle)"
    )
    register.add_argument("path", help="a directory with config.json, weights.safetensors")
    register.add_argument("--name", help="register under this name (default: the config's)")
    register.add_argument("--promote", action="store_true", help="make it the promoted one")
    promote = actions.add_parser("promote", help="make a version the one new adaptations use")
    promote.add_argument("name", help="the meta-model's name")
    promote.add_argument("sha", help="the version: its sha256 or a unique prefix (>= 12 hex)")
    listing = actions.add_parser("list", help="list registered versions")
    listing.add_argument("name", nargs="?", help="only this meta-model's versions")


def meta_models(parsed: argparse.Namespace) -> int:
    """``fastadapt meta-models register|promote|list`` on the configured database."""
    from models.checkpoint import MetaModel  # (imports torch)
    from service.usecases import meta_models as usecase
    from service.usecases.registry import ModelRegistry

    settings = Settings()
    registry = ModelRegistry(settings)

    def work(session: Session) -> int | None:
        if parsed.action == "register":
            path = Path(parsed.path).resolve()
            try:
                model = MetaModel.load(path)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                print(f"fastadapt: cannot load {path}: {exc}", file=sys.stderr)
                return 1
            if parsed.name and parsed.name != model.name:
                config = dataclasses.replace(model.config, name=parsed.name)
                model = MetaModel(
                    config,
                    model.params,
                    model.lrs,
                    model.version,
                    model.calibration,
                    model.in_scope,
                )
            done = usecase.register(
                session=session,
                registry=registry,
                model=model,
                source=f"cli:{path}",
                promote=parsed.promote,
            )
            info = done.version
            state = "registered" if done.added else "already registered"
            promoted = ", promoted" if info.promoted else ""
            print(f"{state} meta-model {info.name} version{promoted}:")
            print(info.sha)
        elif parsed.action == "promote":
            info = usecase.promote(
                session=session, registry=registry, name=parsed.name, version=parsed.sha
            )
            print(f"promoted meta-model {info.name} version {info.sha}")
        else:
            rows = usecase.summary(usecase.versions(session=session, name=parsed.name))
            _print_table(("name", "sha256", "bytes", "source", "registered", ""), rows)
        return None

    return _on_database(settings, work)


def _print_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def _prepare_schema(settings: Settings, *, create: bool = True) -> str | None:
    """Bring SQLite up to date; on PostgreSQL only check (replicas must not race to migrate).
    Without ``create`` (every command but ``serve`` and ``migrate``), a SQLite database
    that does not exist, or holds no fastadapt schema, is refused, not created."""
    if not create:
        problem = _missing(settings)
        if problem:
            return problem
    try:
        if settings.is_sqlite:
            if not create and migrations.current(settings.database_url) is None:
                path = _sqlite_path(settings)
                return f"{path} holds no fastadapt database (revision none).{POINTING}"
            migrations.upgrade(settings.database_url)
            return None
        have, want = migrations.current(settings.database_url), migrations.head()
    except SQLAlchemyError as exc:
        return f"cannot reach {_shown(settings)}: {exc}"
    if have != want:
        return (
            f"the schema of {_shown(settings)} is at revision {have or 'none'}, this code needs "
            f"{want}: run `fastadapt migrate` first"
        )
    return None


POINTING = """
  Point FASTADAPT_DATABASE_URL at your database (sqlite:////path/to/fastadapt.db, or the
  postgresql+psycopg:// URL your servers use), or FASTADAPT_DATA_DIR at the folder that
  holds its fastadapt.db: unset, they mean ./data/fastadapt.db under the folder you run
  the command from. `fastadapt migrate` creates a new database there."""


def _sqlite_path(settings: Settings) -> Path | None:
    """The file of a SQLite database (None: another backend, or in memory)."""
    url = make_url(settings.database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).resolve()


def _missing(settings: Settings) -> str | None:
    """Why a command cannot open the configured database without creating it: its SQLite
    file does not exist (None: it does, or the backend creates nothing on connect)."""
    path = _sqlite_path(settings)
    if path is None or path.exists():
        return None
    return f"no database at {path}: this command uses an existing one and creates none.{POINTING}"


def _on_database(settings: Settings, work: Callable[[Session], int | None]) -> int:
    """Run a command's ``work`` on one session of the configured database (its schema
    prepared first): its exit status (0 when it returns None), 1 for a domain error with
    its message, 2 when the database cannot be used, naming the database and the error's
    type only (SQLAlchemy's text quotes statements and their parameters: keys' hashes,
    support sets)."""
    problem = _prepare_schema(settings, create=False)
    if problem:
        print(f"fastadapt: {problem}", file=sys.stderr)
        return 2
    database = connect(settings.database_url)
    try:
        with session_factory(database)() as session:
            return work(session) or 0
    except FastAdaptError as exc:
        print(f"fastadapt: {exc.message}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        print(f"fastadapt: cannot use {_shown(settings)}: {type(exc).__name__}", file=sys.stderr)
        return 2
    finally:
        database.dispose()


def _shown(settings: Settings) -> str:
    return make_url(settings.database_url).render_as_string(hide_password=True)


def _train(argv: list[str]) -> int:
    from models import train

    train.main(argv)
    return 0


def _evaluate(argv: list[str]) -> int:
    from models import evaluate

    evaluate.main(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
