"""Wire models: what the API reads and writes, as JSON."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    StrictStr,
    Tag,
)

from service.api.deps import CLIENT_ID_PATTERN, CLIENT_ID_RULE

# A JSON number: no strings, no booleans, no NaN or infinity (Python's json accepts them).
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
# A number in a query string (the text "1.5" is fine there; "nan" and "inf" are not).
QueryNumber = Annotated[float, Field(allow_inf_nan=False)]
Count = Annotated[int, Field(strict=True)]
# An in-scope score's threshold: a JSON number from 0 to 1.
Threshold = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.0, le=1.0)]
THRESHOLD = (
    "Text meta-models: the in-scope score (0 to 1) below which a prediction answers no "
    "label (label null, the probabilities kept). Default: "
)
THRESHOLD_REFUSED = " Refused (422) for a meta-model without an in-scope score (not text)."


def _input_kind(value: Any) -> str:
    if isinstance(value, str):
        return "image"
    if isinstance(value, dict):
        return "object"
    return "array" if isinstance(value, list) and value and isinstance(value[0], list) else "row"


def _target_kind(value: Any) -> str:
    if isinstance(value, str):
        return "label"
    return "integer" if isinstance(value, int) and not isinstance(value, bool) else "number"


# One input: a row of D numbers, an array of the meta-model's (C, H, W) input shape, a
# base64-encoded PNG/JPEG for image meta-models or a text for text meta-models, or an
# object keyed by feature name for meta-models that name their features (tabular). The
# tags only pick the branch whose errors are reported; api/errors.py leaves them out of
# field names.
Input = Annotated[
    Annotated[list[Number], Tag("row")]
    | Annotated[list[list[list[Number]]], Tag("array")]
    | Annotated[str, Tag("image")]
    | Annotated[dict[str, Number], Tag("object")],
    Discriminator(_input_kind),
]
# A target: a number (regression) or a class label, any string or integer (classification).
Target = Annotated[
    Annotated[StrictInt, Tag("integer")]
    | Annotated[Number, Tag("number")]
    | Annotated[StrictStr, Tag("label")],
    Discriminator(_target_kind),
]
UNION_TAGS = frozenset({"row", "array", "image", "object", "integer", "number", "label"})
Label = StrictInt | StrictStr
MAX_VERSION = 2**31 - 1  # the INTEGER column's range
ORIGIN = 'How the version was made: "adapt", "readapt", "examples", "rollback" or "reconcile".'
SOURCE_VERSION = "The version a readapt, examples, rollback or reconcile started from; else null."
STORED_THRESHOLD = (
    "Text meta-models: the in-scope score below which this version's predictions answer "
    "no label; null: its meta-model's default (readapt, examples, rollback and reconcile "
    "keep it)."
)
VERSION_ID = "The version's identity: 32 hex digits, never reused (a client deleted and "
VERSION_ID += "re-created starts at version 1 again, with new ids); predictions' ETag."


def version_id() -> Any:
    """The ``version_id`` field, read from a stored version's ``uid``."""
    return Field(validation_alias=AliasChoices("version_id", "uid"), description=VERSION_ID)


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    model_config = ConfigDict(from_attributes=True)


INPUTS = (
    "inputs: D numbers each, arrays of the input shape, base64 images, texts (text "
    "meta-models: non-empty, at most FASTADAPT_MAX_TEXT_CHARS characters, default 2000, "
    "else 422; the encoder reads the first 256 word pieces and truncates the rest), or "
    "objects keyed by feature name (meta-models that list features)."
)


class SupportSet(Request):
    inputs: list[Input] = Field(description="(K, ...) " + INPUTS)
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
    inner_steps: Count | None = Field(
        None,
        description="Default: the meta-model's; within its trained_inner_steps (with learned "
        "per-step rates, the trained count alone).",
    )
    inner_lr: Number | None = Field(
        None,
        description="Default: the meta-model's; refused when its rates are learned (it adapts "
        "with the rates it meta-learned).",
    )
    out_of_scope_threshold: Threshold | None = Field(
        None,
        description=THRESHOLD + "the meta-model's. Stored with the version; a prediction "
        "request may override it." + THRESHOLD_REFUSED,
    )


class ReadaptRequest(Request):
    version: Annotated[int, Field(strict=True, ge=1, le=MAX_VERSION)] | None = Field(
        None, description="Whose support set to adapt again. Default: the current version's."
    )
    inner_steps: Count | None = Field(
        None,
        description="Default: the meta-model's; within its trained_inner_steps (with learned "
        "per-step rates, the trained count alone).",
    )
    inner_lr: Number | None = Field(
        None,
        description="Default: the meta-model's; refused when its rates are learned (it adapts "
        "with the rates it meta-learned).",
    )
    out_of_scope_threshold: Threshold | None = Field(
        None, description=THRESHOLD + "the version's." + THRESHOLD_REFUSED
    )


class AdaptResponse(Response):
    client_id: str
    version: int
    version_id: str = version_id()
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
    origin: str = Field(description=ORIGIN)
    source_version: int | None = Field(description=SOURCE_VERSION)
    warnings: list[str] = Field(
        default_factory=list,
        description="What this version did outside what its meta-model was meta-trained for, "
        "or a support loss that rose; stored only where the settings allow it (empty: none).",
    )
    out_of_scope_threshold: float | None = Field(None, description=STORED_THRESHOLD)


class PredictionRequest(Request):
    inputs: list[Input] = Field(description="(Q, ...) " + INPUTS)
    version: Annotated[int, Field(strict=True, ge=1, le=MAX_VERSION)] | None = Field(
        None, description="Default: the current version."
    )
    out_of_scope_threshold: Threshold | None = Field(
        None,
        description=THRESHOLD + "the version's, else its meta-model's (0.5 unless its "
        "config sets one). Applies to this request only." + THRESHOLD_REFUSED,
    )


class ClassPrediction(Response):
    label: Label | None = Field(
        description="The most probable of the client's labels; null when the in-scope "
        "score is below the out-of-scope threshold (none of the client's labels)."
    )
    probabilities: dict[str, float] = Field(description="Every label of the client: p.")
    in_scope: float | None = Field(
        None,
        description="Text meta-models: how likely the input is one of the client's labels "
        "at all (0 to 1); null for meta-models without an in-scope score.",
    )


class PredictionResponse(Response):
    client_id: str
    version: int
    version_id: str = version_id()
    predictions: list[float] | list[list[float]] | list[ClassPrediction] = Field(
        description="One float per input for single-output regression; a label with "
        "probabilities per input for classification."
    )


class VersionResponse(Response):
    version: int
    version_id: str = version_id()
    meta_model: str
    meta_model_version: str
    support_size: int
    inner_steps: int
    inner_lr: float | None
    support_loss_before: float
    support_loss_after: float
    adapt_ms: float
    labels: list[Label] | None = None
    warnings: list[str] = Field(
        default_factory=list, description="As in the adaptation's response (empty: none)."
    )
    out_of_scope_threshold: float | None = Field(None, description=STORED_THRESHOLD)
    created_at: datetime
    origin: str = Field(description=ORIGIN)
    source_version: int | None = Field(description=SOURCE_VERSION)


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
    features: list[str] | None = Field(
        description="Tabular: the feature names, in the order of a row; inputs may also be "
        "objects keyed by them. null when the meta-model names none."
    )
    trained_support: list[int] | None = Field(
        description="[min, max] support points (regression) or examples per class "
        "(classification) it was meta-trained for; null: not declared, not checked."
    )
    trained_inner_steps: list[int] | None = Field(
        description="[min, max] inner_steps it accepts; null: not declared, not checked."
    )


class MetaModelList(Response):
    meta_models: list[MetaModelResponse]


class MetaModelVersionResponse(Response):
    name: str
    sha: str = Field(description="sha256 of the weights: the version's identity.")
    size_bytes: int = Field(description="Size of the weights (safetensors).")
    source: str = Field(description='Where it came from: "shipped:<path>", "cli:<path>", "api".')
    registered_at: datetime
    promoted: bool = Field(description="Whether new adaptations of this name use it.")


class MetaModelVersionList(Response):
    versions: list[MetaModelVersionResponse]


class RegisteredResponse(MetaModelVersionResponse):
    added: bool = Field(description="False when this sha was already registered.")


class PromoteRequest(Request):
    version: str = Field(
        pattern=r"^[0-9a-fA-F]{12,64}$",
        description="The version to promote: its sha256, or a unique prefix of >= 12 hex digits.",
    )


class UploadRequest(Request):
    config: dict[str, Any] = Field(description="The artifact's config.json, as an object.")
    weights: str = Field(description="weights.safetensors, base64-encoded.")
    sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="sha256 of the weights, checked before use."
    )
    promote: bool = Field(False, description="Promote it once registered.")


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


# -- client versions -------------------------------------------------------------------------
class ClientSummary(Response):
    client_id: str
    current_version: int
    meta_model: str = Field(description="The current version's meta-model.")
    meta_model_version: str = Field(description="The sha256 it was adapted from.")
    updated_at: datetime = Field(description="When its newest version was stored.")


class ClientList(Response):
    clients: list[ClientSummary] = Field(description="By client_id.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )


class VersionList(Response):
    client_id: str
    current_version: int
    versions: list[VersionResponse] = Field(description="Newest first.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next (older) page; null on the last page."
    )


class RollbackRequest(Request):
    version: Annotated[int, Field(strict=True, ge=1, le=MAX_VERSION)] = Field(
        description="The stored version to make current again (as a new version)."
    )


class ExamplesRequest(Request):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"inputs": [[1.5], [-0.5]], "targets": [0.8, -0.3]}]}
    )

    inputs: list[Input] = Field(description="(N, ...) new inputs, as in a support set.")
    targets: list[Target] = Field(description="(N,) their targets.")
    inner_steps: Count | None = Field(None, description="Default: the meta-model's.")
    inner_lr: Number | None = Field(
        None, description="Default: the meta-model's; not allowed when its rates are learned."
    )
    out_of_scope_threshold: Threshold | None = Field(
        None, description=THRESHOLD + "the current version's." + THRESHOLD_REFUSED
    )


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


# -- bulk requests (service/api/bulk.py) -------------------------------------------------------
BULK_LIMIT = "At most FASTADAPT_MAX_BULK items (default 256), else 422 naming the field."


class BulkPredictionItem(PredictionRequest):
    client_id: str = Field(pattern=CLIENT_ID_PATTERN, description=CLIENT_ID_RULE)


class BulkPredictionRequest(Request):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "requests": [
                        {"client_id": "alice", "inputs": [[0.5], [1.25]]},
                        {"client_id": "bob", "inputs": [[-1.0]], "version": 2},
                    ]
                }
            ]
        }
    )

    requests: list[BulkPredictionItem] = Field(
        description="One item per client (a client may appear more than once). "
        + BULK_LIMIT
        + " Their inputs, all items together, at most FASTADAPT_MAX_PREDICT_BATCH (else 413)."
    )


class BulkAdaptationItem(AdaptRequest):
    client_id: str = Field(pattern=CLIENT_ID_PATTERN, description=CLIENT_ID_RULE)


class BulkAdaptationRequest(Request):
    adaptations: list[BulkAdaptationItem] = Field(
        description="One item per client: a client appearing again in the same batch fails "
        "that item (422 naming its client_id). " + BULK_LIMIT
    )


class BulkItemError(Response):
    type: str = Field(description="As in an error body: not_found, invalid_input, ...")
    message: str = Field(description="Names the item's field: requests[3].inputs[0]: ...")
    status: int = Field(description="The HTTP status this item alone would have answered.")


class BulkItemFailure(Response):
    client_id: str
    error: BulkItemError


class BulkPredictionResponse(Response):
    results: list[PredictionResponse | BulkItemFailure] = Field(
        description="One per item, in the request's order: its predictions, or its error."
    )


class BulkAdaptationResponse(Response):
    results: list[AdaptResponse | BulkItemFailure] = Field(
        description="One per item, in the request's order: the client's new version, or its "
        "error (that client keeps its current version)."
    )
    succeeded: int = Field(description="Items whose version was stored.")
    failed: int = Field(description="Items refused: each has an error.")
