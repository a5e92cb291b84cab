"""Wire models: what the client sends and what it reads back, mirroring the server's
``service/api/schemas.py`` (a test checks that the fields agree).

Responses ignore fields they do not know, so a newer server does not break an older
client; requests forbid them, as the server does.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

# A JSON number the server accepts: NaN and infinity are refused here, before sending.
Number = Annotated[float, Field(allow_inf_nan=False)]
Label = StrictInt | StrictStr  # a client's class label: 3 stays 3, "3" stays "3"
# A target: a number (regression) or a label (classification). Integers are labels.
Target = StrictInt | Number | StrictStr
# One input on the wire: a row of numbers, a (C, H, W) array, a base64 PNG/JPEG (image
# meta-models) or a text (text meta-models).
WireInput = list[Number] | list[list[list[Number]]] | str
# An in-scope score's threshold (text meta-models): 0 to 1.
Threshold = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- requests --------------------------------------------------------------------------------
class SupportSet(Request):
    inputs: list[WireInput]
    targets: list[Target]


class AdaptRequest(Request):
    meta_model: str
    support: SupportSet
    inner_steps: int | None = None
    inner_lr: Number | None = None
    out_of_scope_threshold: Threshold | None = None


class ReadaptRequest(Request):
    version: int | None = None
    inner_steps: int | None = None
    inner_lr: Number | None = None
    out_of_scope_threshold: Threshold | None = None


class PredictionRequest(Request):
    inputs: list[WireInput]
    version: int | None = None
    out_of_scope_threshold: Threshold | None = None


class RollbackRequest(Request):
    version: int


class ExamplesRequest(Request):
    inputs: list[WireInput]
    targets: list[Target]
    inner_steps: int | None = None
    inner_lr: Number | None = None
    out_of_scope_threshold: Threshold | None = None


# -- responses -------------------------------------------------------------------------------
class AdaptResponse(Response):
    """A new version of a client, made by ``adapt``, ``readapt``, ``rollback`` or
    ``add_examples``."""

    client_id: str
    version: int
    version_id: str = Field(description="The version's identity: never reused (the ETag).")
    meta_model: str
    meta_model_version: str
    support_size: int
    inner_steps: int
    inner_lr: float | None = Field(description="None when the meta-model's rates are learned.")
    support_loss_before: float
    support_loss_after: float
    adapt_ms: float
    labels: list[Label] | None = Field(
        None, description="Classification: the client's labels, in output order."
    )
    origin: str = Field(
        description='How it was made: "adapt", "readapt", "examples", "rollback", "reconcile".'
    )
    source_version: int | None = Field(
        description="The version a readapt, examples, rollback or reconcile started from."
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="What it was stored despite (outside what its meta-model was trained "
        "for, or a support loss that rose), where the server's settings allow it.",
    )
    out_of_scope_threshold: float | None = Field(
        None,
        description="Text meta-models: the in-scope score below which its predictions "
        "answer no label; None: the meta-model's default.",
    )


class ClassPrediction(Response):
    label: Label | None = Field(
        description="The most probable label; None when the in-scope score is below the "
        "out-of-scope threshold (text meta-models: none of the client's labels)."
    )
    probabilities: dict[str, float] = Field(description="Every label of the client: p.")
    in_scope: float | None = Field(
        None,
        description="Text meta-models: how likely the input is one of the client's labels "
        "at all (0 to 1); None for meta-models without an in-scope score.",
    )


class PredictionResponse(Response):
    client_id: str
    version: int
    version_id: str = Field(description="The version's identity: never reused (the ETag).")
    predictions: list[float] | list[list[float]] | list[ClassPrediction] = Field(
        description="One float per input (single-output regression), a list of floats per "
        "input (several outputs), or a label with probabilities per input (classification)."
    )


class VersionResponse(Response):
    version: int
    version_id: str = Field(description="The version's identity: never reused (the ETag).")
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
    origin: str = Field(
        description='How it was made: "adapt", "readapt", "examples", "rollback", "reconcile".'
    )
    source_version: int | None = Field(
        description="The version a readapt, examples, rollback or reconcile started from."
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="What it was stored despite (outside what its meta-model was trained "
        "for, or a support loss that rose), where the server's settings allow it.",
    )
    out_of_scope_threshold: float | None = Field(
        None,
        description="Text meta-models: the in-scope score below which its predictions "
        "answer no label; None: the meta-model's default.",
    )


class ClientResponse(Response):
    """A client's history: its current version and every version, oldest first."""

    client_id: str
    current_version: int
    created_at: datetime
    versions: list[VersionResponse]


class ClientSummary(Response):
    """One client of a listing: its current version and that version's meta-model."""

    client_id: str
    current_version: int
    meta_model: str
    meta_model_version: str
    updated_at: datetime


class ClientList(Response):
    """One page of the tenant's clients, by client id."""

    clients: list[ClientSummary]
    next_cursor: str | None = Field(description="The next page's cursor; None on the last.")


class VersionList(Response):
    """One page of a client's versions, newest first."""

    client_id: str
    current_version: int
    versions: list[VersionResponse]
    next_cursor: str | None = Field(description="The next page's cursor; None on the last.")


class MetaModelResponse(Response):
    name: str
    version: str = Field(description="sha256 of the weights file.")
    family: str
    task_kind: str
    input_shape: list[int]
    output: str
    inner_steps: int = Field(description="Default inner steps.")
    inner_lr: float | None = Field(description="Default inner rate; None when learned.")
    first_order: bool
    adapt: str = Field(description='"all" parameters (MAML) or the "head" (ANIL).')
    learned_lr: str = Field(description='"none", "per_param" (Meta-SGD), "per_layer_per_step".')
    max_way: int | None = Field(description="Classification: the most labels one client may use.")
    accepts_images: bool = Field(description="Inputs may be images (PNG/JPEG).")
    trained_support: list[int] | None = Field(
        description="[min, max] support points (regression) or examples per class it was "
        "meta-trained for; None: not declared."
    )
    trained_inner_steps: list[int] | None = Field(
        description="[min, max] inner_steps it accepts; None: not declared."
    )
    features: list[str] | None = Field(
        description="Tabular: the feature names, in the order of a row; None otherwise."
    )


class MetaModelList(Response):
    meta_models: list[MetaModelResponse]


class ErrorDetail(Response):
    type: str
    message: str
    request_id: str | None = None


class ErrorResponse(Response):
    error: ErrorDetail


# -- bulk requests (one request, many clients) -------------------------------------------------
class BulkPredictionItem(PredictionRequest):
    client_id: str


class BulkPredictionRequest(Request):
    requests: list[BulkPredictionItem]


class BulkAdaptationItem(AdaptRequest):
    client_id: str


class BulkAdaptationRequest(Request):
    adaptations: list[BulkAdaptationItem]


class BulkItemError(Response):
    type: str
    message: str = Field(description="Names the item's field: requests[3].inputs[0]: ...")
    status: int = Field(description="The HTTP status this item alone would have answered.")


class BulkItemFailure(Response):
    """One item of a bulk request that failed: its client keeps what it had."""

    client_id: str
    error: BulkItemError


class BulkPredictionResponse(Response):
    results: list[PredictionResponse | BulkItemFailure] = Field(
        description="One per item, in order: its predictions, or its error."
    )


class BulkAdaptationResponse(Response):
    results: list[AdaptResponse | BulkItemFailure] = Field(
        description="One per item, in order: the client's new version, or its error."
    )
    succeeded: int
    failed: int
