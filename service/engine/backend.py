"""What the use cases need of an engine, wherever it runs.

``Engine`` runs in the serving process; ``RemoteEngine`` sends the same calls to an
engine process (``fastadapt serve --workers N``). Both are a ``Backend``: validated jobs
in, futures out, and the few calls that keep the engine's caches right.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Protocol

from service.engine.core import EngineConfig, EngineStats
from service.engine.jobs import Adapted, AdaptJob, Key, PredictJob


class Backend(Protocol):
    config: EngineConfig

    @property
    def device(self) -> Any: ...  # the device it runs on (a torch.device, or its name)

    @property
    def ready(self) -> bool: ...  # it can take jobs now (an engine process is connected)

    def start(self) -> None: ...
    def stop(self, timeout: float | None = None) -> None: ...
    def submit_adapt(self, job: AdaptJob) -> Future[Adapted]: ...
    def submit_adapt_many(self, jobs: Sequence[AdaptJob]) -> list[Future[Adapted]]: ...
    def submit_predict(
        self, job: PredictJob, on_loop: bool = False
    ) -> Future[list[list[float]]]: ...
    def submit_predict_many(
        self, jobs: Sequence[PredictJob]
    ) -> list[Future[list[list[float]]]]: ...
    def stored(self, adapted: Adapted, key: Key) -> bool: ...
    def ticket(self) -> int: ...
    def forget(self, tenant_id: str, client_id: str) -> None: ...
    def loaded(self) -> list[str]: ...
    def release(self, version: str) -> None: ...
    def stats(self) -> EngineStats: ...
