"""The engine: owns the device and runs adaptations and predictions off the request threads.

Its contract is narrow: ``submit_adapt(job)`` and ``submit_predict(job)`` take jobs that
``service.requests`` validated and answer futures; ``stored(adapted, key)`` says where an
adaptation's params were stored, and ``forget(tenant, client)`` that a client is gone.
One device worker runs jobs as micro-batches across clients, with an LRU cache of adapted
params on the device; the cache, its tickets and the batching are the engine's own
business, and it never reads the database. Requests reach torch only through here.
"""

from service.engine.backend import Backend
from service.engine.batcher import DeadlineExceeded
from service.engine.core import Engine, EngineConfig, EngineStats
from service.engine.device import configure_threads
from service.engine.jobs import Adapted, AdaptJob, Inputs, Key, NotCached, PredictJob
from service.engine.observer import EngineObserver

__all__ = [
    "AdaptJob",
    "Adapted",
    "Backend",
    "DeadlineExceeded",
    "Engine",
    "EngineConfig",
    "EngineObserver",
    "EngineStats",
    "Inputs",
    "Key",
    "NotCached",
    "PredictJob",
    "configure_threads",
]
