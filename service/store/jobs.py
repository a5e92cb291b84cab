"""Background jobs and their items: keyword-only arguments, the caller's transaction,
never a commit.

An item is claimed by one process at a time for a lease (``claimed_at``). A claim takes
pending items and items whose lease expired (their process was killed): on PostgreSQL
with ``SELECT ... FOR UPDATE SKIP LOCKED``, so concurrent claimers take different rows
without waiting for each other; SQLite has one writer at a time, so the same ``UPDATE
... RETURNING`` is a claim there too. A process finishes an item only while it still
holds the claim (``finish`` returns False otherwise), in the transaction that appends
the client's new version (``append_if_current``): the item's transition and the version
commit together or not at all, so a client is re-adapted exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Select, Table, case, exists, func, literal, select, tuple_, update
from sqlalchemy.orm import Session

from service.store.tables import Client, ClientVersion, Job, JobItem, UTCDateTime, utcnow

ACTIVE = ("queued", "running")


@dataclass(frozen=True)
class Stale:
    """A client whose current version is on another version of the meta-model."""

    client_id: str
    version: int  # its current version
    sha: str  # that version's meta-model version


@dataclass(frozen=True)
class Claim:
    """An item a process holds, with what it needs of its job."""

    job_id: str
    tenant_id: str
    client_id: str
    meta_model: str
    target: str  # the sha the job re-adapts onto
    from_version: int
    from_sha: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.job_id, self.client_id)


def stale_clients(*, session: Session, tenant_id: str, meta_model: str, target: str) -> list[Stale]:
    """The tenant's clients whose current version was adapted from ``meta_model`` at
    another version than ``target``."""
    stmt = (
        select(ClientVersion.client_id, ClientVersion.version, ClientVersion.meta_model_version)
        .join(
            Client,
            (Client.tenant_id == ClientVersion.tenant_id)
            & (Client.client_id == ClientVersion.client_id)
            & (Client.current_version == ClientVersion.version),
        )
        .where(
            ClientVersion.tenant_id == tenant_id,
            ClientVersion.meta_model == meta_model,
            ClientVersion.meta_model_version != target,
        )
        .order_by(ClientVersion.client_id)
    )
    return [Stale(str(c), int(v), str(s)) for c, v, s in session.execute(stmt)]


def add_job(*, session: Session, job: Job, items: Sequence[Stale]) -> None:
    """Store a job and one pending item per client (one ``executemany``)."""
    session.add(job)
    session.flush()
    if items:
        session.execute(
            _table(JobItem).insert(),
            [
                {
                    "job_id": job.id,
                    "client_id": item.client_id,
                    "from_version": item.version,
                    "from_sha": item.sha,
                    "state": "pending",
                }
                for item in items
            ],
        )


def active_job(*, session: Session, tenant_id: str, meta_model: str) -> Job | None:
    """The tenant's queued or running job on ``meta_model``, if any."""
    stmt = select(Job).where(
        Job.tenant_id == tenant_id, Job.meta_model == meta_model, Job.state.in_(ACTIVE)
    )
    return session.scalars(stmt.limit(1)).first()


def get_job(*, session: Session, tenant_id: str, job_id: str) -> Job | None:
    """The job as stored now, if it is the tenant's (another tenant's job is unknown)."""
    job = session.get(Job, job_id, populate_existing=True)
    return job if job is not None and job.tenant_id == tenant_id else None


def job_state(*, session: Session, job_id: str) -> str | None:
    return session.scalars(select(Job.state).where(Job.id == job_id)).one_or_none()


def problems(*, session: Session, job_id: str, limit: int) -> list[tuple[str, str, str]]:
    """``(client_id, state, reason)`` of the job's failed and skipped items, failed first."""
    stmt = (
        select(JobItem.client_id, JobItem.state, JobItem.error)
        .where(JobItem.job_id == job_id, JobItem.state.in_(("failed", "skipped")))
        .order_by(JobItem.state, JobItem.client_id)
        .limit(limit)
    )
    return [(str(c), str(s), str(e or "")) for c, s, e in session.execute(stmt)]


def claimable(*, session: Session, now: datetime, lease_s: float) -> bool:
    """Whether any item may be claimed now (a read: idle processes poll with this)."""
    return bool(session.scalar(select(exists(_claimable(now, lease_s)))))


def _claimable(now: datetime, lease_s: float) -> Select[str, str]:
    expired = now - timedelta(seconds=lease_s)
    return (
        select(JobItem.job_id, JobItem.client_id)
        .join(Job, Job.id == JobItem.job_id)
        .where(
            Job.state.in_(ACTIVE),
            (JobItem.state == "pending")
            | ((JobItem.state == "claimed") & (JobItem.claimed_at < expired)),
        )
    )


def claim(
    *, session: Session, worker: str, now: datetime, lease_s: float, limit: int
) -> list[Claim]:
    """Claim up to ``limit`` items for ``worker`` (pending ones, or ones whose lease
    expired), oldest job first, and mark their jobs running."""
    chosen = (
        _claimable(now, lease_s)
        .order_by(Job.created_at, JobItem.job_id, JobItem.client_id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=_table(JobItem))
    )
    stmt = (
        update(JobItem)
        .where(tuple_(JobItem.job_id, JobItem.client_id).in_(chosen))
        .values(state="claimed", claimed_by=worker, claimed_at=now)
        .returning(JobItem.job_id, JobItem.client_id, JobItem.from_version, JobItem.from_sha)
        .execution_options(synchronize_session=False)
    )
    rows = session.execute(stmt).all()
    if not rows:
        return []
    ids = sorted({str(row[0]) for row in rows})
    session.execute(
        update(Job)
        .where(Job.id.in_(ids), Job.state == "queued")
        .values(state="running", started_at=now)
        .execution_options(synchronize_session=False)
    )
    jobs = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids)))}
    claims = [
        Claim(
            job_id=str(job_id),
            tenant_id=jobs[job_id].tenant_id,
            client_id=str(client_id),
            meta_model=jobs[job_id].meta_model,
            target=jobs[job_id].target,
            from_version=int(version),
            from_sha=str(sha),
        )
        for job_id, client_id, version, sha in rows
    ]
    return sorted(claims, key=lambda c: c.key)


def renew(*, session: Session, worker: str, keys: Sequence[tuple[str, str]], now: datetime) -> int:
    """Extend the lease of the items ``worker`` still holds (a heartbeat); how many."""
    if not keys:
        return 0
    stmt = (
        update(JobItem)
        .where(
            tuple_(JobItem.job_id, JobItem.client_id).in_(list(keys)),
            JobItem.state == "claimed",
            JobItem.claimed_by == worker,
        )
        .values(claimed_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


def release(*, session: Session, worker: str, keys: Sequence[tuple[str, str]]) -> int:
    """Hand the items ``worker`` still holds back (pending), for anyone to claim."""
    if not keys:
        return 0
    stmt = (
        update(JobItem)
        .where(
            tuple_(JobItem.job_id, JobItem.client_id).in_(list(keys)),
            JobItem.state == "claimed",
            JobItem.claimed_by == worker,
        )
        .values(state="pending", claimed_by=None, claimed_at=None)
        .execution_options(synchronize_session=False)
    )
    return int(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


def finish(
    *,
    session: Session,
    worker: str,
    job_id: str,
    client_id: str,
    state: str,
    error: str | None = None,
    to_version: int | None = None,
) -> bool:
    """Record an item's outcome (done, failed or skipped) and count it in its job, if
    ``worker`` still holds it (False: its lease expired and another process took it).
    The job is done when every item is. Locks the item's row, then the job's."""
    stmt = (
        update(JobItem)
        .where(
            JobItem.job_id == job_id,
            JobItem.client_id == client_id,
            JobItem.state == "claimed",
            JobItem.claimed_by == worker,
        )
        .values(state=state, error=error, to_version=to_version)
        .returning(JobItem.client_id)
        .execution_options(synchronize_session=False)
    )
    if session.execute(stmt).first() is None:
        return False
    counter = {"done": Job.done, "failed": Job.failed, "skipped": Job.skipped}[state]
    counted = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values({counter: counter + 1})
        .returning(Job.total, Job.done, Job.failed, Job.skipped, Job.state)
        .execution_options(synchronize_session=False)
    ).one()
    total, done, failed, skipped, job_state_now = counted
    if done + failed + skipped >= total and job_state_now in ACTIVE:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(state="done", finished_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return True


def cancel(*, session: Session, job_id: str) -> None:
    """Stop a queued or running job: its unclaimed items are never claimed; an item a
    process is re-adapting now still finishes. One statement (a write first)."""
    active = Job.state.in_(ACTIVE)
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            state=case((active, "cancelled"), else_=Job.state),
            finished_at=case((active, literal(utcnow(), UTCDateTime())), else_=Job.finished_at),
            cancel_requested=True,
        )
        .execution_options(synchronize_session=False)
    )


def append_if_current(
    *, session: Session, row: ClientVersion, expected_version: int, expected_sha: str
) -> bool:
    """Append ``row`` as version ``expected_version + 1`` of its client, if the client
    still exists and its current version is still ``expected_version``, adapted from
    ``expected_sha`` (a compare-and-swap: False, and nothing written, otherwise). Unlike
    ``repository.append_versions`` it never creates a client: a client deleted meanwhile
    stays deleted. The conditional ``UPDATE`` locks the client's row (on SQLite, the
    database) until the transaction ends, so a concurrent adaptation waits for it."""
    table = _table(Client)
    versions = _table(ClientVersion)
    same = (
        select(versions.c.version)
        .where(
            versions.c.tenant_id == row.tenant_id,
            versions.c.client_id == row.client_id,
            versions.c.version == expected_version,
            versions.c.meta_model_version == expected_sha,  # not a re-created namesake
        )
        .exists()
    )
    swapped = session.execute(
        update(table)
        .where(
            table.c.tenant_id == row.tenant_id,
            table.c.client_id == row.client_id,
            table.c.current_version == expected_version,
            same,
        )
        .values(current_version=expected_version + 1, updated_at=utcnow())
        .returning(table.c.current_version)
    ).first()
    if swapped is None:
        return False
    row.version = expected_version + 1
    session.add(row)
    session.flush()
    return True


def support_set(
    *, session: Session, tenant_id: str, client_id: str, version: int
) -> tuple[str, str, str, float | None] | None:
    """``(meta_model_version, support_inputs, support_targets, out_of_scope_threshold)``
    of one version, in one query (JSON text as the client sent it)."""
    stmt = select(
        ClientVersion.meta_model_version,
        ClientVersion.support_inputs,
        ClientVersion.support_targets,
        ClientVersion.out_of_scope_threshold,
    ).where(
        ClientVersion.tenant_id == tenant_id,
        ClientVersion.client_id == client_id,
        ClientVersion.version == version,
    )
    found = session.execute(stmt).first()
    if found is None:
        return None
    return str(found[0]), str(found[1]), str(found[2]), found[3]


def count_items(*, session: Session, job_id: str) -> dict[str, int]:
    """How many of the job's items are in each state."""
    stmt = (
        select(JobItem.state, func.count()).where(JobItem.job_id == job_id).group_by(JobItem.state)
    )
    return {str(state): int(n) for state, n in session.execute(stmt)}


def _table(cls: type[Client] | type[ClientVersion] | type[JobItem]) -> Table:
    return cast(Table, cls.__table__)
