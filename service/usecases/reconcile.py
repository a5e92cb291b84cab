"""Reconcile jobs: re-adapt a tenant's clients of a meta-model onto its promoted version.

``start`` snapshots the stale clients (current version on another version of the
meta-model than the promoted one) as a job's items, in one transaction. Every process
works on them (``service.background``): it ``claim``s a few items, ``run``s them one at
a time (the engine re-adapts the stored support set, with no transaction open), and
records each outcome in the transaction that appends the new version, only while it
still holds the claim and only if the client's current version is still the one the
item was made for (``jobs.append_if_current``). So each stale client gets exactly one
new version, a client deleted meanwhile stays deleted, and one whose re-adaptation fails
keeps its version and is listed in the job with the reason.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from models.checkpoint import MetaModel
from service.errors import Conflict, FastAdaptError, NotFound, Unavailable
from service.store import jobs, repository
from service.store.jobs import Claim
from service.store.tables import Job, utcnow
from service.usecases.adapt import adapted_version
from service.usecases.registry import ModelRegistry
from service.usecases.runtime import Runtime, storing

MAX_LISTED = 100  # failed and skipped clients a job's status lists at most
MAX_REASON = 500  # characters of a reason kept
# READS_THEN_WRITE: a use case here that reads and then writes ends its reads first (a
# rollback), so that its write starts a transaction of its own. On SQLite a transaction
# that read an older snapshot cannot take the write lock once another connection has
# committed (SQLITE_BUSY at once, without the busy timeout's wait): the runners commit
# often. What was read is re-checked by the write (claims, compare-and-swap).


def promoted(*, session: Session, registry: ModelRegistry, name: str) -> MetaModel | None:
    """The version of meta-model ``name`` that new adaptations use (None: unknown name)."""
    try:
        return registry.promoted(session, name)
    except NotFound:
        return None


@dataclass(frozen=True)
class Problem:
    client_id: str
    state: str  # failed | skipped
    reason: str


@dataclass(frozen=True)
class JobStatus:
    job: Job
    rate: float | None  # clients finished per second since the job started
    eta_s: float | None  # seconds left at that rate (0 once finished)
    problems: list[Problem]  # failed clients first, then skipped ones; at most MAX_LISTED

    @property
    def truncated(self) -> bool:
        return len(self.problems) < self.job.failed + self.job.skipped


@storing
def start(
    *, session: Session, registry: ModelRegistry, tenant_id: str, meta_model: str
) -> JobStatus:
    """A job re-adapting the tenant's stale clients of ``meta_model`` (done at once when
    none is stale); 404 for an unknown meta-model, 409 while another job on it runs."""
    model = promoted(session=session, registry=registry, name=meta_model)
    if model is None:
        raise NotFound(f"unknown meta-model {meta_model!r}")
    running = jobs.active_job(session=session, tenant_id=tenant_id, meta_model=meta_model)
    if running is not None:
        raise Conflict(
            f"reconcile job {running.id} of meta-model {meta_model!r} is {running.state}"
        )
    stale = jobs.stale_clients(
        session=session, tenant_id=tenant_id, meta_model=meta_model, target=model.version
    )
    session.rollback()  # end the reads: see READS_THEN_WRITE
    now = utcnow()
    job = Job(
        id=uuid.uuid4().hex,
        tenant_id=tenant_id,
        kind="reconcile",
        meta_model=meta_model,
        target=model.version,
        state="queued" if stale else "done",
        total=len(stale),
        done=0,
        failed=0,
        skipped=0,
        cancel_requested=False,
        created_at=now,
        started_at=None if stale else now,
        finished_at=None if stale else now,
    )
    jobs.add_job(session=session, job=job, items=stale)
    session.commit()
    return JobStatus(job, rate=None, eta_s=None if stale else 0.0, problems=[])


@storing
def get(*, session: Session, tenant_id: str, job_id: str) -> JobStatus:
    """A job's progress, rate, estimate and the clients that failed or were skipped."""
    job = jobs.get_job(session=session, tenant_id=tenant_id, job_id=job_id)
    if job is None:
        raise NotFound(f"unknown job {job_id!r}")
    listed = jobs.problems(session=session, job_id=job.id, limit=MAX_LISTED)
    return status(job, [Problem(*p) for p in listed], now=utcnow())


@storing
def cancel(*, session: Session, tenant_id: str, job_id: str) -> JobStatus:
    """Cancel a job (idempotent): clients not yet re-adapted keep their version."""
    job = jobs.get_job(session=session, tenant_id=tenant_id, job_id=job_id)
    if job is None:
        raise NotFound(f"unknown job {job_id!r}")
    if job.state == "done":
        raise Conflict(f"job {job_id} is already done")
    session.rollback()  # end the reads: see READS_THEN_WRITE
    jobs.cancel(session=session, job_id=job_id)
    session.commit()
    job = jobs.get_job(session=session, tenant_id=tenant_id, job_id=job_id)
    assert job is not None  # a job is never deleted
    listed = jobs.problems(session=session, job_id=job.id, limit=MAX_LISTED)
    return status(job, [Problem(*p) for p in listed], now=utcnow())


def status(job: Job, problems: list[Problem], *, now: datetime) -> JobStatus:
    finished = job.done + job.failed + job.skipped
    end = job.finished_at or now
    elapsed = (end - job.started_at).total_seconds() if job.started_at else 0.0
    rate = finished / elapsed if finished and elapsed > 0 else None
    eta: float | None
    if job.state in ("done", "cancelled"):
        eta = 0.0
    else:
        eta = (job.total - finished) / rate if rate else None
    return JobStatus(job, rate=rate, eta_s=eta, problems=problems)


# -- the work (every process's background runner) ---------------------------------------------
@storing
def claimable(*, session: Session, lease_s: float) -> bool:
    """Whether there is work to claim (a read: an idle process polls with it)."""
    try:
        return jobs.claimable(session=session, now=utcnow(), lease_s=lease_s)
    finally:
        session.rollback()


@storing
def claim(*, session: Session, worker: str, lease_s: float, limit: int) -> list[Claim]:
    claims = jobs.claim(session=session, worker=worker, now=utcnow(), lease_s=lease_s, limit=limit)
    session.commit()
    return claims


@storing
def renew(*, session: Session, worker: str, claims: list[Claim]) -> None:
    """The heartbeat: extend the lease of the claims still to run."""
    jobs.renew(session=session, worker=worker, keys=[c.key for c in claims], now=utcnow())
    session.commit()


@storing
def release(*, session: Session, worker: str, claims: list[Claim]) -> None:
    """Hand claims back unrun (on shutdown, or when the engine is busy)."""
    jobs.release(session=session, worker=worker, keys=[c.key for c in claims])
    session.commit()


@storing
def run(*, session: Session, runtime: Runtime, worker: str, claim: Claim) -> str:
    """Re-adapt one claimed client onto the promoted version and record the outcome:
    "done", "failed", "skipped", "released" (cancelled job, or the engine unavailable:
    back to pending) or "lost" (the lease expired and another process took it over)."""
    if jobs.job_state(session=session, job_id=claim.job_id) != "running":
        session.rollback()  # end the reads: see READS_THEN_WRITE
        held = jobs.release(session=session, worker=worker, keys=[claim.key])
        session.commit()
        return "released" if held else "lost"
    model = promoted(session=session, registry=runtime.registry, name=claim.meta_model)
    if model is None or model.version != claim.target:
        now_at = "not loaded" if model is None else f"now at {model.version[:12]}"
        reason = f"meta-model {claim.meta_model!r} is {now_at}, not the job's version"
        return _record(session, worker, claim, "skipped", reason)
    source = jobs.support_set(
        session=session,
        tenant_id=claim.tenant_id,
        client_id=claim.client_id,
        version=claim.from_version,
    )
    if source is None or source[0] != claim.from_sha:
        return _record(session, worker, claim, "skipped", "the client was deleted")
    inputs = json.loads(source[1])  # as the client sent them: rows, arrays or images
    targets = json.loads(source[2])
    session.close()  # no transaction is open while the engine works
    try:
        row, adapted = adapted_version(
            runtime=runtime,
            model=model,
            tenant_id=claim.tenant_id,
            client_id=claim.client_id,
            inputs=inputs,
            targets=targets,
            out_of_scope_threshold=source[3],  # the version's, kept
        )
    except Unavailable:
        jobs.release(session=session, worker=worker, keys=[claim.key])
        session.commit()
        return "released"
    except FastAdaptError as exc:  # messages name fields and limits, never support data
        return _record(session, worker, claim, "failed", f"{exc.type}: {exc.message}")
    if not (adapted.loss_after <= adapted.loss_before and math.isfinite(adapted.loss_after)):
        reason = (
            f"the re-adaptation made the support loss worse ({adapted.loss_before:g} -> "
            f"{adapted.loss_after:g}); the client keeps version {claim.from_version}"
        )
        return _record(session, worker, claim, "failed", reason)
    row.origin, row.source_version = "reconcile", claim.from_version
    to_version = claim.from_version + 1
    if not jobs.finish(
        session=session,
        worker=worker,
        job_id=claim.job_id,
        client_id=claim.client_id,
        state="done",
        to_version=to_version,
    ):
        session.rollback()
        return "lost"
    if not jobs.append_if_current(
        session=session, row=row, expected_version=claim.from_version, expected_sha=claim.from_sha
    ):
        session.rollback()
        exists = repository.client_exists(
            session=session, tenant_id=claim.tenant_id, client_id=claim.client_id
        )
        reason = "the client was adapted again meanwhile" if exists else "the client was deleted"
        return _record(session, worker, claim, "skipped", reason)
    repository.prune_versions(  # retention, as every other new version is pruned
        session=session,
        tenant_id=claim.tenant_id,
        client_id=claim.client_id,
        keep=runtime.commits.keep,
    )
    session.commit()
    session.expunge(row)
    runtime.engine.stored(adapted, (claim.tenant_id, claim.client_id, row.uid))
    return "done"


def _record(session: Session, worker: str, claim: Claim, state: str, reason: str) -> str:
    session.rollback()  # end the reads: see READS_THEN_WRITE
    if not jobs.finish(
        session=session,
        worker=worker,
        job_id=claim.job_id,
        client_id=claim.client_id,
        state=state,
        error=reason[:MAX_REASON],
    ):
        session.rollback()
        return "lost"
    session.commit()
    return state
