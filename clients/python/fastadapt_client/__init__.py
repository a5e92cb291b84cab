"""A typed client of the fastadapt REST API: ``Client`` (sync) and ``AsyncClient``.

from fastadapt_client import Client

with Client("http://127.0.0.1:8000", api_key="...") as api:
    api.adapt("alice", meta_model="sinusoid", inputs=[[0.5], [1.5]], targets=[0.4, 1.0])
    api.predict("alice", inputs=[[1.0]]).predictions
"""

from fastadapt_client.calls import Call
from fastadapt_client.client import AsyncClient, Client, __version__
from fastadapt_client.errors import (
    APIError,
    Conflict,
    FastAdaptError,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    TransportError,
    Unauthorized,
    Unavailable,
)
from fastadapt_client.models import (
    AdaptResponse,
    BulkAdaptationItem,
    BulkAdaptationResponse,
    BulkItemError,
    BulkItemFailure,
    BulkPredictionItem,
    BulkPredictionResponse,
    ClassPrediction,
    ClientList,
    ClientResponse,
    ClientSummary,
    MetaModelResponse,
    PredictionResponse,
    VersionList,
    VersionResponse,
)
from fastadapt_client.retry import RetryPolicy

__all__ = [
    "APIError",
    "AdaptResponse",
    "AsyncClient",
    "BulkAdaptationItem",
    "BulkAdaptationResponse",
    "BulkItemError",
    "BulkItemFailure",
    "BulkPredictionItem",
    "BulkPredictionResponse",
    "Call",
    "ClassPrediction",
    "Client",
    "ClientList",
    "ClientResponse",
    "ClientSummary",
    "Conflict",
    "FastAdaptError",
    "Forbidden",
    "InvalidInput",
    "MetaModelResponse",
    "NotFound",
    "PayloadTooLarge",
    "PredictionResponse",
    "RateLimited",
    "RetryPolicy",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "VersionList",
    "VersionResponse",
    "__version__",
]
