"""Reconcile jobs: start one (admin scope), watch it, cancel it (admin scope). A job of
another tenant is unknown (404)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from service import usecases
from service.api.deps import AdminDep, RuntimeDep, SessionDep, TenantDep
from service.api.schemas import ErrorResponse, JobProblem, JobResponse
from service.usecases.reconcile import JobStatus

router = APIRouter(tags=["jobs"], responses={404: {"model": ErrorResponse}})
JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="32 hex digits.")]
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorResponse},
    409: {"model": ErrorResponse},
}


def job_response(status: JobStatus) -> JobResponse:
    job = status.job
    return JobResponse(
        id=job.id,
        kind=job.kind,
        meta_model=job.meta_model,
        target=job.target,
        state=job.state,  # type: ignore[arg-type]
        total=job.total,
        done=job.done,
        failed=job.failed,
        skipped=job.skipped,
        rate=status.rate,
        eta_s=status.eta_s,
        problems=[JobProblem.model_validate(p) for p in status.problems],
        problems_truncated=status.truncated,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


@router.post(
    "/v1/meta-models/{name}/reconcile",
    status_code=202,
    responses={**ADMIN_ERRORS, 503: {"model": ErrorResponse}},
)
def start_reconcile(
    name: str, session: SessionDep, runtime: RuntimeDep, caller: AdminDep
) -> JobResponse:
    """Re-adapt, in the background, every client of the caller's tenant whose current
    version was adapted from another version of meta-model ``name`` than the promoted
    one, from its stored support set. Every server process shares the work, one client
    at a time at most ``FASTADAPT_RECONCILE_RATE`` per second each; the job survives
    restarts. 202 with the job (done at once when no client is stale); 404 for an
    unknown meta-model; 409 while a job on it is queued or running."""
    status = usecases.reconcile.start(
        session=session,
        registry=runtime.registry,
        tenant_id=caller.tenant_id,
        meta_model=name,
    )
    return job_response(status)


@router.get("/v1/jobs/{job_id}", responses={503: {"model": ErrorResponse}})
def get_job(job_id: JobId, session: SessionDep, tenant_id: TenantDep) -> JobResponse:
    """A job's progress: counts, rate (clients/s), estimated seconds left, and the
    clients that failed (with the reason; they keep their version) or were skipped."""
    return job_response(usecases.reconcile.get(session=session, tenant_id=tenant_id, job_id=job_id))


@router.post("/v1/jobs/{job_id}/cancel", responses=ADMIN_ERRORS)
def cancel_job(job_id: JobId, session: SessionDep, caller: AdminDep) -> JobResponse:
    """Cancel a queued or running job (again: no change). Clients already re-adapted keep
    their new version, one in progress may still finish, the rest keep theirs. 409 once
    the job is done."""
    status = usecases.reconcile.cancel(session=session, tenant_id=caller.tenant_id, job_id=job_id)
    return job_response(status)
