"""What every use case may need besides its session: built once, at start-up."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.orm import Session

from service.engine import Engine
from service.errors import NotFound, Unavailable
from service.requests import MetaModels
from service.settings import Settings
from service.store import repository
from service.store.group_commit import GroupCommit
from service.store.tables import DEFAULT_TENANT as DEFAULT_TENANT  # everyone's, without keys

T = TypeVar("T")
WAIT_GRACE_S = 5.0  # waited past a job's deadline, by when the engine has expired it (503)


@dataclass(frozen=True)
class Runtime:
    """The service's long-lived parts (the app's lifespan builds it)."""

    engine: Engine  # owns the device
    commits: GroupCommit  # new versions' shared commits
    meta_models: MetaModels  # loaded at start-up, by name
    settings: Settings

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
