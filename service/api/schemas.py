"""Wire models: what the API reads and writes, as JSON."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# A JSON number: no strings, no booleans, no NaN or infinity (Python's json accepts them).
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
# A number in a query string (the text "1.5" is fine there; "nan" and "inf" are not).
QueryNumber = Annotated[float, Field(allow_inf_nan=False)]
Count = Annotated[int, Field(strict=True)]
MAX_VERSION = 2**31 - 1  # the INTEGER column's range


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class SupportSet(Request):
    inputs: list[list[Number]] = Field(description="(K, D) inputs, D values each.")
    targets: list[Number] = Field(description="(K,) targets, one per input.")


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


class PredictionRequest(Request):
    inputs: list[list[Number]] = Field(description="(Q, D) inputs, D values each.")
    version: Annotated[int, Field(strict=True, ge=1, le=MAX_VERSION)] | None = Field(
        None, description="Default: the current version."
    )


class PredictionResponse(Response):
    client_id: str
    version: int
    predictions: list[float] | list[list[float]] = Field(
        description="One float per input for single-output regression."
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


class MetaModelList(Response):
    meta_models: list[MetaModelResponse]


class Status(Response):
    status: str


class ErrorDetail(Response):
    type: str
    message: str


class ErrorResponse(Response):
    error: ErrorDetail
