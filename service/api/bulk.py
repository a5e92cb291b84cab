"""Bulk routes: many clients' predictions or adaptations in one request (README "Bulk
requests"). Authenticated like every /v1 router (the app includes it with the principal):
every item is a client of the caller's tenant."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header

from service import usecases
from service.api.deps import RuntimeDep, SessionDep, TenantDep
from service.api.schemas import (
    AdaptResponse,
    BulkAdaptationRequest,
    BulkAdaptationResponse,
    BulkItemError,
    BulkItemFailure,
    BulkPredictionRequest,
    BulkPredictionResponse,
    ErrorResponse,
    PredictionResponse,
)
from service.errors import InvalidInput, status_of
from service.usecases.bulk import AdaptItem, Failed, PredictItem

# what the request as a whole may answer (an item's 404, 409 or 422 is in its result)
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (408, 413, 422, 503)
}
router = APIRouter(responses=ERRORS, tags=["bulk"])
WHOLE = (
    "The request as a whole: 422 naming the field (no items, more than FASTADAPT_MAX_BULK, "
    "a malformed item), 413 (the body, or a bulk prediction's inputs in all, too large). "
    "An item's own errors are in its result, not here."
)


def failure(failed: Failed) -> BulkItemFailure:
    error = failed.error
    return BulkItemFailure(
        client_id=failed.client_id,
        error=BulkItemError(type=error.type, message=error.message, status=status_of(error)),
    )


@router.post("/v1/predictions:batch", responses={422: {"description": WHOLE}})
def predict_batch(
    body: BulkPredictionRequest, session: SessionDep, runtime: RuntimeDep, tenant_id: TenantDep
) -> BulkPredictionResponse:
    """Predictions of many clients (of the caller's tenant) in one request, one engine
    pass: one result per item, in order, each the item's predictions (as
    ``POST /v1/clients/{client_id}/predictions`` answers them) or its error (an unknown
    client: ``not_found``, status 404; invalid inputs: ``invalid_input`` naming
    ``requests[i].inputs[j]``, status 422). 200 whenever the request itself is valid."""
    results = usecases.bulk.predict_many(
        session=session,
        runtime=runtime,
        tenant_id=tenant_id,
        items=[
            PredictItem(r.client_id, r.inputs, r.version, r.out_of_scope_threshold)
            for r in body.requests
        ],
    )
    return BulkPredictionResponse(
        results=[
            failure(r) if isinstance(r, Failed) else PredictionResponse.model_validate(r)
            for r in results
        ]
    )


@router.post(
    "/v1/adaptations:batch",
    responses={
        200: {
            "description": "Multi-status: one result per item, in order; each item's new "
            "version or its error (``succeeded`` and ``failed`` count them). 200 even when "
            "some or every item failed."
        },
        422: {"description": WHOLE + " Also: an Idempotency-Key (not supported here yet)."},
    },
)
def adapt_batch(
    body: BulkAdaptationRequest,
    session: SessionDep,
    runtime: RuntimeDep,
    tenant_id: TenantDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Not supported on bulk adaptations yet: refused (422) rather than "
            "ignored, so a retry is never mistaken for a safe one.",
        ),
    ] = None,
) -> BulkAdaptationResponse:
    """Adapt many clients (of the caller's tenant) in one request: each item as
    ``POST /v1/clients/{client_id}/adaptations`` (the promoted version of its meta-model,
    the same guardrails), each client one new version, every successful item's version
    stored in one transaction. An item's error (invalid input naming
    ``adaptations[i]...``, a diverged adaptation, a client repeated in the batch) fails
    that item alone: its client keeps its current version."""
    if idempotency_key is not None:
        raise InvalidInput(
            "Idempotency-Key",
            "not supported on bulk adaptations yet; a retried batch adapts its clients again",
        )
    results = usecases.bulk.adapt_many(
        session=session,
        runtime=runtime,
        tenant_id=tenant_id,
        items=[
            AdaptItem(
                a.client_id,
                a.meta_model,
                a.support.inputs,
                a.support.targets,
                a.inner_steps,
                a.inner_lr,
                a.out_of_scope_threshold,
            )
            for a in body.adaptations
        ],
    )
    answers: list[Any] = [
        failure(r) if isinstance(r, Failed) else AdaptResponse.model_validate(r) for r in results
    ]
    failed = sum(isinstance(r, Failed) for r in results)
    return BulkAdaptationResponse(results=answers, succeeded=len(results) - failed, failed=failed)
