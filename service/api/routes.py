"""The v1 routes (``router``, authenticated: the app includes it with ``PrincipalDep``)
and the open probes (``health``). Each parses, calls one use case, returns a wire schema."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response

from service import usecases
from service.api.deps import ClientId, RuntimeDep, SessionDep, TenantDep
from service.api.schemas import (
    MAX_VERSION,
    AdaptRequest,
    AdaptResponse,
    ClientResponse,
    ErrorResponse,
    MetaModelList,
    MetaModelResponse,
    PredictionRequest,
    PredictionResponse,
    QueryNumber,
    ReadaptRequest,
    Status,
)

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (404, 408, 409, 413, 422, 503)
}
# what every authenticated router answers (the app includes them with these); 503: the
# key lookup reads the database
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 429, 503)
}
router = APIRouter(responses=ERRORS)
health = APIRouter(responses={503: {"model": ErrorResponse}})


@health.get("/healthz", tags=["health"])
def healthz() -> Status:
    """The process is alive."""
    return Status(status="ok")


@health.get("/readyz", tags=["health"])
def readyz(session: SessionDep, runtime: RuntimeDep) -> Status:
    """The database answers and at least one meta-model is loaded (else 503)."""
    usecases.clients.readiness(session=session, meta_models=runtime.meta_models)
    return Status(status="ready")


@router.get("/v1/meta-models", tags=["meta-models"])
def list_meta_models(runtime: RuntimeDep) -> MetaModelList:
    infos = usecases.meta_models.list_all(runtime.meta_models)
    return MetaModelList(meta_models=[MetaModelResponse.model_validate(i) for i in infos])


@router.get("/v1/meta-models/{name}", tags=["meta-models"])
def get_meta_model(name: str, runtime: RuntimeDep) -> MetaModelResponse:
    return MetaModelResponse.model_validate(usecases.meta_models.get(runtime.meta_models, name))


@router.post("/v1/clients/{client_id}/adaptations", status_code=201, tags=["clients"])
def adapt(
    client_id: ClientId,
    body: AdaptRequest,
    session: SessionDep,
    runtime: RuntimeDep,
    tenant_id: TenantDep,
) -> AdaptResponse:
    """Adapt a meta-model to the client's support set; the result is its new version."""
    version = usecases.adapt.adapt(
        session=session,
        runtime=runtime,
        tenant_id=tenant_id,
        client_id=client_id,
        meta_model=body.meta_model,
        inputs=body.support.inputs,
        targets=body.support.targets,
        inner_steps=body.inner_steps,
        inner_lr=body.inner_lr,
    )
    return AdaptResponse.model_validate(version)


@router.post("/v1/clients/{client_id}/readaptations", status_code=201, tags=["clients"])
def readapt(
    client_id: ClientId,
    session: SessionDep,
    runtime: RuntimeDep,
    tenant_id: TenantDep,
    body: Annotated[ReadaptRequest | None, Body()] = None,
) -> AdaptResponse:
    """Adapt a stored support set again to the meta-model as loaded now (after its
    artifact was replaced, say); the result is the client's new version. No body (or
    ``{}``): the current version's support set and the meta-model's defaults."""
    body = body or ReadaptRequest.model_validate({})
    version = usecases.adapt.readapt(
        session=session,
        runtime=runtime,
        tenant_id=tenant_id,
        client_id=client_id,
        version=body.version,
        inner_steps=body.inner_steps,
        inner_lr=body.inner_lr,
    )
    return AdaptResponse.model_validate(version)


@router.get("/v1/clients/{client_id}/predictions", tags=["clients"])
def predict_query(
    client_id: ClientId,
    x: Annotated[list[QueryNumber], Query(description="One value per 1-D input.")],
    session: SessionDep,
    runtime: RuntimeDep,
    tenant_id: TenantDep,
    version: Annotated[
        int | None, Query(ge=1, le=MAX_VERSION, description="Default: the current version.")
    ] = None,
) -> PredictionResponse:
    """Predictions of the current version, or of ``version``, for 1-D inputs:
    ``?x=0.5&x=1.25&version=2``."""
    prediction = usecases.predict.predict(
        session=session,
        runtime=runtime,
        tenant_id=tenant_id,
        client_id=client_id,
        inputs=[[value] for value in x],
        version=version,
        field="x",
    )
    return PredictionResponse.model_validate(prediction)


@router.post("/v1/clients/{client_id}/predictions", tags=["clients"])
def predict(
    client_id: ClientId,
    body: PredictionRequest,
    session: SessionDep,
    runtime: RuntimeDep,
    tenant_id: TenantDep,
) -> PredictionResponse:
    """Predictions of the current version, or of ``version``."""
    prediction = usecases.predict.predict(
        session=session,
        runtime=runtime,
        tenant_id=tenant_id,
        client_id=client_id,
        inputs=body.inputs,
        version=body.version,
    )
    return PredictionResponse.model_validate(prediction)


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
