"""The v1 routes (``router``, authenticated: the app includes it with ``PrincipalDep``)
and the open probes (``health``). Each parses, calls one use case, returns a wire schema."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from service import usecases
from service.api.deps import (
    ClientId,
    IdempotencyDep,
    RuntimeDep,
    SessionDep,
    Sessions,
    SessionsDep,
    TenantDep,
)
from service.api.schemas import (
    MAX_VERSION,
    AdaptRequest,
    AdaptResponse,
    ClientResponse,
    ErrorResponse,
    PredictionRequest,
    PredictionResponse,
    QueryNumber,
    ReadaptRequest,
    Status,
)
from service.errors import Unavailable
from service.usecases import Runtime

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (404, 408, 409, 413, 422, 503)
}
# what every authenticated router answers (the app includes them with these); 503: the
# key lookup reads the database
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 429, 503)
}
# adaptations' 422s include the guardrails (README "Guardrails")
GUARDED: dict[int | str, dict[str, Any]] = {
    422: {
        "model": ErrorResponse,
        "description": "invalid_input naming the field (including a support size or step "
        "count outside the meta-model's trained_for), or adaptation_diverged: the support "
        "loss ended higher than it started. Nothing is stored.",
    }
}
router = APIRouter(responses=ERRORS)
health = APIRouter(responses={503: {"model": ErrorResponse}})
REPLAYED = "Idempotent-Replayed"  # "true" on the stored answer to an Idempotency-Key's retry
CREATED_HEADERS = {
    REPLAYED: {
        "description": '"true" when this is the stored answer to an earlier request with '
        "the same Idempotency-Key (nothing was created).",
        "schema": {"type": "string"},
    }
}
PREDICTION_HEADERS = {
    "ETag": {
        "description": 'The predicting version\'s identity, quoted: "<version_id>". Never '
        "reused, so a changed ETag means another model (If-None-Match is not honoured).",
        "schema": {"type": "string"},
    }
}


def replayed(created: usecases.idempotency.Created, response: Response) -> Any:
    """The created (or replayed) version, marking a replay on ``response``."""
    if created.replayed:
        response.headers[REPLAYED] = "true"
    return created.version


async def predicted(
    runtime: Runtime, sessions: Sessions, query: usecases.predict.Query
) -> Response:
    """A prediction, answered: started on the event loop where it needs no database read
    (a kept version, a small net), else in a worker thread (the database read and the
    engine's submit); the engine's answer awaited on the event loop (no thread waits for
    it), the body serialised once by pydantic, with the version's ETag."""
    fresh = await runtime.predictables.fresh()  # a kept version may answer
    pending = usecases.predict.start_on_loop(runtime=runtime, query=query) if fresh else None
    outputs = None if pending is None else await usecases.predict.outputs_on_loop(runtime, pending)
    if pending is None or outputs is None:

        def start() -> usecases.predict.Pending:
            with sessions() as session:
                return usecases.predict.start(
                    session=session, runtime=runtime, query=query, fresh=fresh
                )

        pending = await run_in_threadpool(start)
        outputs = await usecases.predict.outputs_of(runtime, pending)
    prediction = usecases.predict.finish(pending, outputs)
    body = PredictionResponse.model_validate(prediction).model_dump_json()
    return Response(
        body, media_type="application/json", headers={"ETag": f'"{prediction.version_id}"'}
    )


@health.get("/healthz", tags=["health"])
def healthz() -> Status:
    """The process is alive."""
    return Status(status="ok")


@health.get("/readyz", tags=["health"])
def readyz(request: Request, session: SessionDep, runtime: RuntimeDep) -> Status:
    """The database answers, the engine is up (an engine process connected) and at least
    one meta-model is registered (else 503); 503 from the moment the server is told to
    stop (SIGTERM), so a load balancer drains it."""
    if request.app.state.stopping.is_set():
        raise Unavailable("the server is shutting down", retry_after=1.0)
    if not runtime.engine.ready:
        raise Unavailable("the engine process is not connected (starting or restarting)", 1.0)
    usecases.clients.readiness(session=session, registry=runtime.registry)
    return Status(status="ready")


@router.post(
    "/v1/clients/{client_id}/adaptations",
    status_code=201,
    tags=["clients"],
    responses={**GUARDED, 201: {"headers": CREATED_HEADERS}},
)
def adapt(
    client_id: ClientId,
    body: AdaptRequest,
    session: SessionDep,
    runtime: RuntimeDep,
    tenant_id: TenantDep,
    idempotency: IdempotencyDep,
    response: Response,
) -> AdaptResponse:
    """Adapt a meta-model to the client's support set; the result is its new version.
    With an ``Idempotency-Key``, a retry answers the first response and adapts nothing.
    Refused (422) outside what the meta-model was meta-trained for, or when the support
    loss rose; settings may store such a version instead, listed in ``warnings``."""
    created = usecases.idempotency.once(
        session=session,
        runtime=runtime,
        tenant_id=tenant_id,
        key=idempotency,
        create=lambda key: usecases.adapt.adapt(
            session=session,
            runtime=runtime,
            tenant_id=tenant_id,
            client_id=client_id,
            meta_model=body.meta_model,
            inputs=body.support.inputs,
            targets=body.support.targets,
            inner_steps=body.inner_steps,
            inner_lr=body.inner_lr,
            out_of_scope_threshold=body.out_of_scope_threshold,
            idempotency=key,
        ),
    )
    return AdaptResponse.model_validate(replayed(created, response))


@router.post(
    "/v1/clients/{client_id}/readaptations",
    status_code=201,
    tags=["clients"],
    responses={**GUARDED, 201: {"headers": CREATED_HEADERS}},
)
def readapt(
    client_id: ClientId,
    session: SessionDep,
    runtime: RuntimeDep,
    tenant_id: TenantDep,
    idempotency: IdempotencyDep,
    response: Response,
    body: Annotated[ReadaptRequest | None, Body()] = None,
) -> AdaptResponse:
    """Adapt a stored support set again to the promoted version of its meta-model (after
    a new version was promoted, say); the result is the client's new version. No body (or
    ``{}``): the current version's support set and the meta-model's defaults."""
    request = body or ReadaptRequest.model_validate({})
    created = usecases.idempotency.once(
        session=session,
        runtime=runtime,
        tenant_id=tenant_id,
        key=idempotency,
        create=lambda key: usecases.adapt.readapt(
            session=session,
            runtime=runtime,
            tenant_id=tenant_id,
            client_id=client_id,
            version=request.version,
            inner_steps=request.inner_steps,
            inner_lr=request.inner_lr,
            out_of_scope_threshold=request.out_of_scope_threshold,
            idempotency=key,
        ),
    )
    return AdaptResponse.model_validate(replayed(created, response))


@router.get(
    "/v1/clients/{client_id}/predictions",
    tags=["clients"],
    response_model=PredictionResponse,
    responses={200: {"headers": PREDICTION_HEADERS}},
)
async def predict_query(
    client_id: ClientId,
    x: Annotated[list[QueryNumber], Query(description="One value per 1-D input.")],
    sessions: SessionsDep,
    runtime: RuntimeDep,
    tenant_id: TenantDep,
    version: Annotated[
        int | None, Query(ge=1, le=MAX_VERSION, description="Default: the current version.")
    ] = None,
) -> Response:
    """Predictions of the current version, or of ``version``, for 1-D inputs:
    ``?x=0.5&x=1.25&version=2``."""
    query = usecases.predict.Query(tenant_id, client_id, [[value] for value in x], version, "x")
    return await predicted(runtime, sessions, query)


@router.post(
    "/v1/clients/{client_id}/predictions",
    tags=["clients"],
    response_model=PredictionResponse,
    responses={200: {"headers": PREDICTION_HEADERS}},
)
async def predict(
    client_id: ClientId,
    body: PredictionRequest,
    sessions: SessionsDep,
    runtime: RuntimeDep,
    tenant_id: TenantDep,
) -> Response:
    """Predictions of the current version, or of ``version``: for classification a label
    and probabilities per input, and for text meta-models an in-scope score, the label
    null below the out-of-scope threshold."""
    query = usecases.predict.Query(
        tenant_id,
        client_id,
        body.inputs,
        body.version,
        out_of_scope_threshold=body.out_of_scope_threshold,
    )
    return await predicted(runtime, sessions, query)


@router.get("/v1/clients/{client_id}", tags=["clients"])
def get_client(client_id: ClientId, session: SessionDep, tenant_id: TenantDep) -> ClientResponse:
    """The current version and the version history (without parameters or support sets)."""
    client = usecases.clients.get(session=session, tenant_id=tenant_id, client_id=client_id)
    return ClientResponse.model_validate(client)


@router.delete(
    "/v1/clients/{client_id}", status_code=204, response_class=Response, tags=["clients"]
)
def delete_client(
    client_id: ClientId, session: SessionDep, runtime: RuntimeDep, tenant_id: TenantDep
) -> None:
    """Delete the client: every version and support set."""
    usecases.clients.delete(
        session=session, engine=runtime.engine, tenant_id=tenant_id, client_id=client_id
    )
