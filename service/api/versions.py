"""Client versions users manage: ``GET /v1/clients`` and ``/v1/clients/{id}/versions``
(cursor-paginated), ``POST /v1/clients/{id}/rollback`` and ``/v1/clients/{id}/examples``.
Each parses, calls one use case, returns a wire schema."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from service import usecases
from service.api.deps import ClientId, IdempotencyDep, RuntimeDep, SessionDep, TenantDep
from service.api.routes import CREATED_HEADERS, replayed
from service.api.schemas import (
    AdaptResponse,
    ClientList,
    ClientSummary,
    ErrorResponse,
    ExamplesRequest,
    RollbackRequest,
    VersionList,
    VersionResponse,
)

MAX_PAGE = 500


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


router = APIRouter(tags=["clients"])
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"Items per page, 1-{MAX_PAGE}.")]
Cursor = Annotated[
    str | None,
    Query(max_length=1024, description="The previous page's next_cursor; none: the first page."),
]


@router.get("/v1/clients", responses=_errors(422, 503))
def list_clients(
    session: SessionDep,
    runtime: RuntimeDep,
    tenant_id: TenantDep,
    limit: Limit = 50,
    cursor: Cursor = None,
    meta_model: Annotated[
        str | None,
        Query(max_length=128, description="Only clients whose current version is of it."),
    ] = None,
    stale: Annotated[
        bool,
        Query(
            description="Only clients whose current version is on an older meta-model version "
            "than the one new adaptations of its name use (readapt them to catch up)."
        ),
    ] = False,
) -> ClientList:
    """The tenant's clients, by client_id, a page at a time: follow ``next_cursor`` until
    it is null. A client created or deleted meanwhile may or may not be listed; every
    client that exists throughout is listed exactly once."""
    page = usecases.versions.list_clients(
        session=session,
        runtime=runtime,
        tenant_id=tenant_id,
        limit=limit,
        cursor=cursor,
        meta_model=meta_model,
        stale=stale,
    )
    return ClientList(
        clients=[ClientSummary.model_validate(item) for item in page.items],
        next_cursor=page.next_cursor,
    )


@router.get("/v1/clients/{client_id}/versions", responses=_errors(404, 422, 503))
def list_versions(
    client_id: ClientId,
    session: SessionDep,
    tenant_id: TenantDep,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> VersionList:
    """The client's stored versions, newest first, a page at a time (without parameters
    or support sets). Versions beyond the newest ``FASTADAPT_VERSIONS_KEPT`` are gone."""
    current, page = usecases.versions.list_versions(
        session=session, tenant_id=tenant_id, client_id=client_id, limit=limit, cursor=cursor
    )
    return VersionList(
        client_id=client_id,
        current_version=current,
        versions=[VersionResponse.model_validate(row) for row in page.items],
        next_cursor=page.next_cursor,
    )


@router.post(
    "/v1/clients/{client_id}/rollback",
    status_code=201,
    responses={**_errors(404, 408, 409, 413, 422, 503), 201: {"headers": CREATED_HEADERS}},
)
def rollback(
    client_id: ClientId,
    body: RollbackRequest,
    session: SessionDep,
    runtime: RuntimeDep,
    tenant_id: TenantDep,
    idempotency: IdempotencyDep,
    response: Response,
) -> AdaptResponse:
    """Make an older version current again: a new version copies its parameters, support
    set, labels and meta-model (``origin`` "rollback", ``source_version`` that version),
    so the history stays append-only. 404 for a version that is not stored (never made,
    or pruned). With an ``Idempotency-Key``, a retry answers the first response."""
    created = usecases.idempotency.once(
        session=session,
        runtime=runtime,
        tenant_id=tenant_id,
        key=idempotency,
        create=lambda key: usecases.versions.rollback(
            session=session,
            runtime=runtime,
            tenant_id=tenant_id,
            client_id=client_id,
            version=body.version,
            idempotency=key,
        ),
    )
    return AdaptResponse.model_validate(replayed(created, response))


@router.post(
    "/v1/clients/{client_id}/examples",
    status_code=201,
    responses={**_errors(404, 408, 409, 413, 422, 503), 201: {"headers": CREATED_HEADERS}},
)
def add_examples(
    client_id: ClientId,
    body: ExamplesRequest,
    session: SessionDep,
    runtime: RuntimeDep,
    tenant_id: TenantDep,
    idempotency: IdempotencyDep,
    response: Response,
) -> AdaptResponse:
    """Add examples to the current version's support set and adapt the whole set anew
    from the meta-model's initialisation (same meta-model name, its inner-loop defaults
    unless given): the result is the client's new version (``origin`` "examples"). The
    combined set is bounded by ``FASTADAPT_MAX_SUPPORT`` (422 naming ``inputs`` above);
    classification labels may be new, up to the meta-model's ``max_way``. With an
    ``Idempotency-Key``, a retry answers the first response and adapts nothing."""
    created = usecases.idempotency.once(
        session=session,
        runtime=runtime,
        tenant_id=tenant_id,
        key=idempotency,
        create=lambda key: usecases.versions.add_examples(
            session=session,
            runtime=runtime,
            tenant_id=tenant_id,
            client_id=client_id,
            inputs=body.inputs,
            targets=body.targets,
            inner_steps=body.inner_steps,
            inner_lr=body.inner_lr,
            out_of_scope_threshold=body.out_of_scope_threshold,
            idempotency=key,
        ),
    )
    return AdaptResponse.model_validate(replayed(created, response))
