"""``/v1/meta-models``: the promoted version of each meta-model, the registry's versions,
and (admin scope) promotions and uploads."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from service import usecases
from service.api.deps import AdminDep, RuntimeDep, SessionDep
from service.api.schemas import (
    ErrorResponse,
    MetaModelList,
    MetaModelResponse,
    MetaModelVersionList,
    MetaModelVersionResponse,
    PromoteRequest,
    RegisteredResponse,
    UploadRequest,
)
from service.errors import Forbidden

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (404, 409, 422, 503)
}
ADMIN: dict[int | str, dict[str, Any]] = {403: {"model": ErrorResponse}}
router = APIRouter(tags=["meta-models"], responses=ERRORS)
Name = Annotated[str, Path(max_length=128, description="The meta-model's name.")]


@router.get("/v1/meta-models")
def list_meta_models(session: SessionDep, runtime: RuntimeDep) -> MetaModelList:
    """Every meta-model, described by its promoted version (the one new adaptations use)."""
    infos = usecases.meta_models.list_all(session=session, registry=runtime.registry)
    return MetaModelList(meta_models=[MetaModelResponse.model_validate(i) for i in infos])


@router.get("/v1/meta-models/{name}")
def get_meta_model(name: Name, session: SessionDep, runtime: RuntimeDep) -> MetaModelResponse:
    """The meta-model's promoted version (404 for an unknown name)."""
    info = usecases.meta_models.get(session=session, registry=runtime.registry, name=name)
    return MetaModelResponse.model_validate(info)


@router.get("/v1/meta-models/{name}/versions")
def list_versions(name: Name, session: SessionDep) -> MetaModelVersionList:
    """Every registered version of the meta-model, oldest first, the promoted one flagged."""
    infos = usecases.meta_models.versions(session=session, name=name)
    return MetaModelVersionList(
        versions=[MetaModelVersionResponse.model_validate(i) for i in infos]
    )


@router.post("/v1/meta-models/{name}/promote", responses=ADMIN)
def promote(
    name: Name, body: PromoteRequest, session: SessionDep, runtime: RuntimeDep, caller: AdminDep
) -> MetaModelVersionResponse:
    """Make a registered version the one new adaptations and readaptations use (admin).
    Clients adapted from another version keep predicting with theirs. Other replicas see
    the promotion within FASTADAPT_PROMOTION_REFRESH_S."""
    info = usecases.meta_models.promote(
        session=session, registry=runtime.registry, name=name, version=body.version
    )
    return MetaModelVersionResponse.model_validate(info)


@router.post("/v1/meta-models", status_code=201, responses={**ADMIN, 413: {"model": ErrorResponse}})
def upload(
    body: UploadRequest,
    session: SessionDep,
    runtime: RuntimeDep,
    caller: AdminDep,
) -> RegisteredResponse:
    """Register an artifact (config + base64 safetensors + its sha256) as a new version
    (admin). Off (403) unless FASTADAPT_ALLOW_MODEL_UPLOAD=true: model files uploaded
    over HTTP are how TorchServe servers were taken over, so it takes an explicit choice.
    Nothing is unpickled; the sha256 is checked before anything is parsed."""
    if not runtime.settings.allow_model_upload:
        raise Forbidden(
            "uploading meta-models is disabled: register them with `fastadapt meta-models "
            "register`, or set FASTADAPT_ALLOW_MODEL_UPLOAD=true"
        )
    registered = usecases.meta_models.upload(
        session=session,
        registry=runtime.registry,
        config=body.config,
        weights=body.weights,
        sha256=body.sha256,
        promote=body.promote,
    )
    return RegisteredResponse(
        **MetaModelVersionResponse.model_validate(registered.version).model_dump(),
        added=registered.added,
    )
