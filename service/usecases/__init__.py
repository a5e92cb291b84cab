"""Use cases: one transaction each, and the only place that commits (new versions commit
through ``GroupCommit``, which shares one transaction among concurrent adaptations).

Heavy work (adaptation, prediction) runs on the engine with no database transaction
open, so a slow adaptation never holds a lock, and a failed or rejected one leaves the
client's previous version current and intact. Requests arrive validated, as the typed
objects of ``service.requests``.
"""

from service.usecases import (
    adapt,
    bulk,
    census,
    clients,
    idempotency,
    keys,
    meta_models,
    predict,
    reconcile,
    registry,
    versions,
)
from service.usecases.runtime import DEFAULT_TENANT, Runtime

__all__ = [
    "DEFAULT_TENANT",
    "Runtime",
    "adapt",
    "bulk",
    "census",
    "clients",
    "idempotency",
    "keys",
    "meta_models",
    "predict",
    "reconcile",
    "registry",
    "versions",
]
