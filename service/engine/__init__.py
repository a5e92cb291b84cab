"""The engine: owns the device and runs adaptations and predictions off the request threads.

Request threads submit jobs and get futures; one device worker runs them as
micro-batches across clients (``core.Engine``), with an LRU cache of adapted params on
the device. Requests reach torch only through here.
"""

from service.engine.core import Adapted, AdaptJob, DeadlineExceeded, Engine, EngineStats
from service.engine.worker import configure_threads

__all__ = ["AdaptJob", "Adapted", "DeadlineExceeded", "Engine", "EngineStats", "configure_threads"]
