"""``/v1/keys``: the caller's tenant's API keys (admin scope)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from service import usecases
from service.api.deps import AdminDep, SessionDep
from service.api.schemas import CreatedKeyResponse, ErrorResponse, KeyList, KeyRequest, KeyResponse
from service.auth import KEY_ID_PATTERN

router = APIRouter(tags=["keys"], responses={c: {"model": ErrorResponse} for c in (403, 503)})
KeyId = Annotated[str, Path(pattern=KEY_ID_PATTERN, description="key_ and 16 hex digits.")]


@router.get("/v1/keys")
def list_keys(session: SessionDep, caller: AdminDep) -> KeyList:
    """The tenant's keys, revoked ones too (never the keys themselves)."""
    keys = usecases.keys.list_all(session=session, tenant_id=caller.tenant_id)
    return KeyList(keys=[KeyResponse.model_validate(key) for key in keys])


@router.post(
    "/v1/keys",
    status_code=201,
    responses={c: {"model": ErrorResponse} for c in (408, 413)},  # the body's time and size
)
def create_key(body: KeyRequest, session: SessionDep, caller: AdminDep) -> CreatedKeyResponse:
    """A new key of the caller's tenant; the response is the only time it is shown."""
    created = usecases.keys.create(session=session, tenant_id=caller.tenant_id, scope=body.scope)
    listed = KeyResponse.model_validate(created.key)
    return CreatedKeyResponse(**listed.model_dump(), key=created.token)


@router.delete(
    "/v1/keys/{key_id}",
    status_code=204,
    response_class=Response,
    responses={404: {"model": ErrorResponse, "description": "No such key in the tenant."}},
)
def revoke_key(key_id: KeyId, session: SessionDep, caller: AdminDep) -> None:
    """Revoke one of the tenant's keys: every replica refuses it within 5 s."""
    usecases.keys.revoke(session=session, key_id=key_id, tenant_id=caller.tenant_id)
