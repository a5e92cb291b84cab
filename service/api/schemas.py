"""Wire models: what the API reads and writes, as JSON."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictInt, StrictStr, Tag

# A JSON number: no strings, no booleans, no NaN or infinity (Python's json accepts them).
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
# A number in a query string (the text "1.5" is fine there; "nan" and "inf" are not).
QueryNumber = Annotated[float, Field(allow_inf_nan=False)]
Count = Annotated[int, Field(strict=True)]


def _input_kind(value: Any) -> str:
    if isinstance(value, str):
        return "image"
    return "array" if isinstance(value, list) and value and isinstance(value[0], list) else "row"


def _target_kind(value: Any) -> str:
    if isinstance(value, str):
        return "label"
    return "integer" if isinstance(value, int) and not isinstance(value, bool) else "number"


# One input: a row of D numbers, an array of the meta-model's (C, H, W) input shape, or a
# base64-encoded PNG/JPEG for image meta-models. The tags only pick the branch whose
# errors are reported; api/errors.py leaves them out of field names.
Input = Annotated[
    Annotated[list[Number], Tag("row")]
    | Annotated[list[list[list[Number]]], Tag("array")]
    | Annotated[str, Tag("image")],
    Discriminator(_input_kind),
]
# A target: a number (regression) or a class label, any string or integer (classification).
Target = Annotated[
    Annotated[StrictInt, Tag("integer")]
    | Annotated[Number, Tag("number")]
    | Annotated[StrictStr, Tag("label")],
    Discriminator(_target_kind),
]
UNION_TAGS = frozenset({"row", "array", "image", "integer", "number", "label"})
Label = StrictInt | StrictStr
MAX_VERSION = 2**31 - 1  # the INTEGER column's range


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class SupportSet(Request):
    inputs: list[Input] = Field(
        description="(K, ...) inputs: D numbers each, arrays of the input shape, or base64 images."
    )
    targets: list[Target] = Field(
        description="(K,) targets: numbers (regression) or labels, strings or integers."
    )


class AdaptRequest(Request):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "meta_model": "sinusoid",
                    "support": {"inputs": [[-2.0], [0.5], [3.0]], "targets": [-1.2, 0.9, 0.4]},
                }
            ]
        }
    )

    meta_model: str = Field(description="Name of a loaded meta-model.")
    support: SupportSet
    inner_steps: Count | None = Field(None, description="Default: the meta-model's.")
    inner_lr: Number | None = Field(
        None, description="Default: the meta-model's; not allowed when its rates are learned."
    )


class ReadaptRequest(Request):
    version: Annotated[int, Field(strict=True, ge=1, le=MAX_VERSION)] | None = Field(
        None, description="Whose support set to adapt again. Default: the current version's."
    )
    inner_steps: Count | None = Field(None, description="Default: the meta-model's.")
    inner_lr: Number | None = Field(
        None, description="Default: the meta-model's; not allowed when its rates are learned."
    )


class AdaptResponse(Response):
    client_id: str
    version: int
    meta_model: str
    meta_model_version: str
    support_size: int
    inner_steps: int
    inner_lr: float | None = Field(description="null when the meta-model's rates are learned.")
    support_loss_before: float
    support_loss_after: float
    adapt_ms: float
    labels: list[Label] | None = Field(
        None, description="Classification: the client's labels, in output order."
    )


class PredictionRequest(Request):
    inputs: list[Input] = Field(
        description="(Q, ...) inputs: D numbers each, arrays of the input shape, or base64 images."
    )
    version: Annotated[int, Field(strict=True, ge=1, le=MAX_VERSION)] | None = Field(
        None, description="Default: the current version."
    )


class ClassPrediction(Response):
    label: Label
    probabilities: dict[str, float] = Field(description="Every label of the client: p.")


class PredictionResponse(Response):
    client_id: str
    version: int
    predictions: list[float] | list[list[float]] | list[ClassPrediction] = Field(
        description="One float per input for single-output regression; a label with "
        "probabilities per input for classification."
    )


class VersionResponse(Response):
    version: int
    meta_model: str
    meta_model_version: str
    support_size: int
    inner_steps: int
    inner_lr: float | None
    support_loss_before: float
    support_loss_after: float
    adapt_ms: float
    labels: list[Label] | None = None
    created_at: datetime


class ClientResponse(Response):
    client_id: str
    current_version: int
    created_at: datetime
    versions: list[VersionResponse]


class MetaModelResponse(Response):
    name: str
    version: str = Field(description="sha256 of the weights file.")
    family: str
    task_kind: str
    input_shape: list[int]
    output: str
    inner_steps: int = Field(description="Default inner steps.")
    inner_lr: float | None = Field(description="Default inner rate; null when learned.")
    first_order: bool
    adapt: str = Field(description='"all" parameters (MAML) or the "head" (ANIL).')
    learned_lr: str = Field(description='"none", "per_param" (Meta-SGD), "per_layer_per_step".')
    max_way: int | None = Field(description="Classification: the most labels one client may use.")
    accepts_images: bool = Field(description="Inputs may be base64 PNG/JPEG images.")


class MetaModelList(Response):
    meta_models: list[MetaModelResponse]


class Status(Response):
    status: str


class ErrorDetail(Response):
    type: str
    message: str
    request_id: str | None = Field(
        description="The response's X-Request-ID: quote it when reporting a problem."
    )


class ErrorResponse(Response):
    error: ErrorDetail


# -- API keys --------------------------------------------------------------------------------
class KeyRequest(Request):
    scope: Literal["client", "admin"] = Field(
        "client", description="client: adapt, predict, read, delete; admin: also the keys."
    )


class KeyResponse(Response):
    id: str = Field(description="The key's public id (for listing and revoking).")
    tenant_id: str
    scope: str
    created_at: datetime
    revoked_at: datetime | None


class CreatedKeyResponse(KeyResponse):
    key: str = Field(description="The key itself: shown this once, only its hash is stored.")


class KeyList(Response):
    keys: list[KeyResponse]


# -- reconcile jobs ----------------------------------------------------------------------------
class JobProblem(Response):
    client_id: str
    state: Literal["failed", "skipped"] = Field(
        description="failed: its re-adaptation was refused or diverged, and it keeps its "
        "version; skipped: deleted or adapted again meanwhile, or the promoted version changed."
    )
    reason: str


class JobResponse(Response):
    id: str = Field(description="The job's id (32 hex digits).")
    kind: str = Field(description='"reconcile".')
    meta_model: str
    target: str = Field(description="The meta-model version (sha256) clients are moved onto.")
    state: Literal["queued", "running", "done", "cancelled"]
    total: int = Field(description="Stale clients when the job was created.")
    done: int = Field(description="Clients re-adapted: each has one new version.")
    failed: int
    skipped: int
    rate: float | None = Field(description="Clients finished per second since the job started.")
    eta_s: float | None = Field(description="Estimated seconds left (0 once finished).")
    problems: list[JobProblem] = Field(
        description="Failed clients with the reason, then skipped ones (at most 100)."
    )
    problems_truncated: bool = Field(description="More failed or skipped clients than listed.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
