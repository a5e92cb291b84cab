"""The API, one function per endpoint: each builds a ``Call`` (what to send, how to read
the answer) without sending anything. ``Client`` and ``AsyncClient`` only send them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote, urlencode

import httpx
from pydantic import BaseModel

from fastadapt_client.inputs import ImageInput, NumericInput, wire_inputs, wire_targets
from fastadapt_client.models import (
    AdaptRequest,
    AdaptResponse,
    BulkAdaptationItem,
    BulkAdaptationRequest,
    BulkAdaptationResponse,
    BulkPredictionItem,
    BulkPredictionRequest,
    BulkPredictionResponse,
    ClientList,
    ClientResponse,
    ExamplesRequest,
    MetaModelList,
    MetaModelResponse,
    PredictionRequest,
    PredictionResponse,
    ReadaptRequest,
    Request,
    RollbackRequest,
    SupportSet,
    VersionList,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
IDEMPOTENCY_KEY = "Idempotency-Key"


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str  # below the base URL, e.g. /v1/clients/alice
    parse: Callable[[httpx.Response], T]  # reads a success response
    json: dict[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # besides the client's own


def new_idempotency_key() -> str:
    """A fresh key for one logical call: every retry of that call sends the same one."""
    return uuid.uuid4().hex


def _keyed(idempotency_key: str | None) -> dict[str, str]:
    return {IDEMPOTENCY_KEY: idempotency_key or new_idempotency_key()}


def list_meta_models() -> Call[list[MetaModelResponse]]:
    return Call("GET", "/v1/meta-models", lambda r: _reader(MetaModelList)(r).meta_models)


def get_meta_model(name: str) -> Call[MetaModelResponse]:
    return Call("GET", f"/v1/meta-models/{segment(name)}", _reader(MetaModelResponse))


def adapt(
    client_id: str,
    *,
    meta_model: str,
    targets: Sequence[float | int | str] | Any,
    inputs: Sequence[NumericInput] | Any | None = None,
    images: Sequence[ImageInput] | None = None,
    inner_steps: int | None = None,
    inner_lr: float | None = None,
    out_of_scope_threshold: float | None = None,
    idempotency_key: str | None = None,
) -> Call[AdaptResponse]:
    """``idempotency_key``: None makes a fresh one for this call (sent on every retry)."""
    body = AdaptRequest(
        meta_model=meta_model,
        support=SupportSet(
            inputs=wire_inputs(inputs, images, field="support"),
            targets=wire_targets(targets),
        ),
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        out_of_scope_threshold=out_of_scope_threshold,
    )
    path = f"{_client(client_id)}/adaptations"
    return Call("POST", path, _reader(AdaptResponse), _json(body), _keyed(idempotency_key))


def predict(
    client_id: str,
    *,
    inputs: Sequence[NumericInput] | Any | None = None,
    images: Sequence[ImageInput] | None = None,
    version: int | None = None,
    out_of_scope_threshold: float | None = None,
) -> Call[PredictionResponse]:
    body = PredictionRequest(
        inputs=wire_inputs(inputs, images, field="predict"),
        version=version,
        out_of_scope_threshold=out_of_scope_threshold,
    )
    return Call(
        "POST", f"{_client(client_id)}/predictions", _reader(PredictionResponse), _json(body)
    )


def history(client_id: str) -> Call[ClientResponse]:
    return Call("GET", _client(client_id), _reader(ClientResponse))


def readapt(
    client_id: str,
    *,
    version: int | None = None,
    inner_steps: int | None = None,
    inner_lr: float | None = None,
    out_of_scope_threshold: float | None = None,
    idempotency_key: str | None = None,
) -> Call[AdaptResponse]:
    """``idempotency_key``: None makes a fresh one for this call (sent on every retry)."""
    body = ReadaptRequest(
        version=version,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        out_of_scope_threshold=out_of_scope_threshold,
    )
    path = f"{_client(client_id)}/readaptations"
    return Call("POST", path, _reader(AdaptResponse), _json(body), _keyed(idempotency_key))


def list_clients(
    *,
    limit: int | None = None,
    cursor: str | None = None,
    meta_model: str | None = None,
    stale: bool = False,
) -> Call[ClientList]:
    query = _query(
        limit=limit, cursor=cursor, meta_model=meta_model, stale="true" if stale else None
    )
    return Call("GET", f"/v1/clients{query}", _reader(ClientList))


def versions(
    client_id: str, *, limit: int | None = None, cursor: str | None = None
) -> Call[VersionList]:
    query = _query(limit=limit, cursor=cursor)
    return Call("GET", f"{_client(client_id)}/versions{query}", _reader(VersionList))


def rollback(client_id: str, *, version: int) -> Call[AdaptResponse]:
    body = RollbackRequest(version=version)
    return Call("POST", f"{_client(client_id)}/rollback", _reader(AdaptResponse), _json(body))


def add_examples(
    client_id: str,
    *,
    targets: Sequence[float | int | str] | Any,
    inputs: Sequence[NumericInput] | Any | None = None,
    images: Sequence[ImageInput] | None = None,
    inner_steps: int | None = None,
    inner_lr: float | None = None,
    out_of_scope_threshold: float | None = None,
) -> Call[AdaptResponse]:
    body = ExamplesRequest(
        inputs=wire_inputs(inputs, images, field="examples"),
        targets=wire_targets(targets),
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        out_of_scope_threshold=out_of_scope_threshold,
    )
    return Call("POST", f"{_client(client_id)}/examples", _reader(AdaptResponse), _json(body))


def delete(client_id: str) -> Call[None]:
    return Call("DELETE", _client(client_id), lambda _: None)


def predict_batch(
    requests: Sequence[BulkPredictionItem | Mapping[str, Any]],
) -> Call[BulkPredictionResponse]:
    """Many clients' predictions in one request: items as ``BulkPredictionItem`` or
    mappings with ``client_id``, ``inputs`` and optionally ``version``."""
    items = [BulkPredictionItem.model_validate(item) for item in requests]
    body = BulkPredictionRequest(requests=items)
    return Call("POST", "/v1/predictions:batch", _reader(BulkPredictionResponse), _json(body))


def adapt_batch(
    adaptations: Sequence[BulkAdaptationItem | Mapping[str, Any]],
) -> Call[BulkAdaptationResponse]:
    """Many clients' adaptations in one request: items as ``BulkAdaptationItem`` or
    mappings with ``client_id``, ``meta_model``, ``support`` ({"inputs", "targets"}) and
    optionally ``inner_steps`` and ``inner_lr``. Sent without an Idempotency-Key (the
    server does not take one here yet), so it is not retried after a lost connection."""
    items = [BulkAdaptationItem.model_validate(item) for item in adaptations]
    body = BulkAdaptationRequest(adaptations=items)
    return Call("POST", "/v1/adaptations:batch", _reader(BulkAdaptationResponse), _json(body))


def segment(value: str) -> str:
    """One path segment, percent-encoded; ``.`` and ``..`` would change the path itself."""
    if value in ("", ".", ".."):
        raise ValueError(f"{value!r} is not a valid name or client id")
    return quote(value, safe="")


def _client(client_id: str) -> str:
    return f"/v1/clients/{segment(client_id)}"


def _query(**values: str | int | None) -> str:
    """``?a=1&b=x`` of the values that are not None; empty when all are."""
    given = {k: v for k, v in values.items() if v is not None}
    return f"?{urlencode(given)}" if given else ""


def _json(body: Request) -> dict[str, Any]:
    return body.model_dump(mode="json", exclude_none=True)


def _reader(model: type[M]) -> Callable[[httpx.Response], M]:
    def read(response: httpx.Response) -> M:
        return model.model_validate_json(response.content)

    return read
