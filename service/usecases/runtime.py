"""What every use case may need besides its session: built once, at start-up."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from service.engine import Backend
from service.errors import Conflict, NotFound, Unavailable
from service.settings import Settings
from service.store import repository
from service.store.group_commit import GroupCommit
from service.store.repository import Predictable
from service.store.rowcache import RowCache
from service.store.tables import DEFAULT_TENANT as DEFAULT_TENANT  # everyone's, without keys
from service.usecases.registry import ModelRegistry

T = TypeVar("T")
P = ParamSpec("P")
WAIT_GRACE_S = 5.0  # waited past a job's deadline, by when the engine has expired it (503)
DATABASE_RETRY_AFTER_S = 5.0  # Retry-After while the database is unreachable
IN_FLIGHT_RETRY_AFTER_S = 1.0  # Retry-After of a duplicate of a request still in flight
log = logging.getLogger(__name__)


class InFlight:
    """The ``Idempotency-Key`` s this process is serving now, per tenant: a duplicate that
    arrives meanwhile is refused with a retryable 409 instead of adapting twice. (Across
    processes the database's unique key on the version decides, and the loser replays.)"""

    def __init__(self) -> None:
        self._held: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, tenant_id: str, key: str) -> Iterator[None]:
        held = (tenant_id, key)
        with self._lock:
            if held in self._held:
                raise Conflict(
                    "a request with this Idempotency-Key is still in progress; retry to "
                    "get its response",
                    retry_after=IN_FLIGHT_RETRY_AFTER_S,
                )
            self._held.add(held)
        try:
            yield
        finally:
            with self._lock:
                self._held.discard(held)


@dataclass(frozen=True)
class Runtime:
    """The service's long-lived parts (the app's lifespan builds it)."""

    engine: Backend  # owns the device (here, or an engine process)
    commits: GroupCommit  # new versions' shared commits
    registry: ModelRegistry  # meta-model versions: promoted by name, loaded by sha
    settings: Settings
    in_flight: InFlight = field(default_factory=InFlight)  # idempotency keys being served
    # (tenant, client, version or None: the current one) -> what a prediction reads of it,
    # kept until the database changes (SQLite; off elsewhere: every prediction queries)
    predictables: RowCache[tuple[str, str, int | None], Predictable] = field(
        default_factory=lambda: RowCache(None)
    )

    def wait(self, future: Future[T]) -> T:
        """The engine's answer, or ``Unavailable`` once it is overdue."""
        limit = self.settings.job_timeout_s + WAIT_GRACE_S
        try:
            return future.result(timeout=limit)
        except TimeoutError:
            future.cancel()
            raise Unavailable(
                f"the engine did not answer within {limit:g} s", retry_after=1.0
            ) from None


def missing(*, session: Session, tenant_id: str, client_id: str, version: int | None) -> NotFound:
    """The 404 for a version that was not found: of an unknown client, or of a known one."""
    if version is not None and repository.client_exists(
        session=session, tenant_id=tenant_id, client_id=client_id
    ):
        return NotFound(f"client {client_id!r} has no version {version}")
    return NotFound(f"unknown client {client_id!r}")


def database_down(exc: SQLAlchemyError) -> bool:
    """The database cannot be reached or used now (refused, dropped or invalidated
    connections, a full pool, a server shutting down), as opposed to a bug in a query."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def storing(use_case: Callable[P, T]) -> Callable[P, T]:
    """A use case that reads or writes the database: while the database is down it raises
    ``Unavailable`` (503 with Retry-After) instead of SQLAlchemy's error. The message and
    the log name only the error's type: SQLAlchemy's text quotes statements and their
    parameters (support sets). The engine reconnects by itself (``pool_pre_ping``)."""

    @functools.wraps(use_case)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return use_case(*args, **kwargs)
        except SQLAlchemyError as exc:
            if not database_down(exc):
                raise
            cause = type(getattr(exc, "orig", None) or exc).__name__
            log.warning("%s: the database is unavailable (%s)", use_case.__name__, cause)
            raise Unavailable(
                f"the database is unavailable ({cause}); retry later",
                retry_after=DATABASE_RETRY_AFTER_S,
            ) from None

    return guarded
