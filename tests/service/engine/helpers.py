"""Jobs for engine tests, made the way the service makes them: through ``service.requests``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from functools import cache

from models.checkpoint import MetaModel
from service import requests
from service.engine import AdaptJob, Engine, Key, NotCached, PredictJob
from service.settings import Settings


@cache
def settings() -> Settings:
    return Settings()


def adapt_job(
    meta_models: Mapping[str, MetaModel],
    name: str,
    inputs: Sequence[list[float]],
    targets: Sequence[float | int],
    steps: int | None = None,
    lr: float | None = None,
) -> AdaptJob:
    """A validated job: the meta-model's defaults filled in, labels made class indices."""
    return requests.adaptation(
        model=requests.known_meta_model(meta_models, name),
        settings=settings(),
        inputs=inputs,
        targets=targets,
        inner_steps=steps,
        inner_lr=lr,
    ).job


def predict(
    engine: Engine,
    name: str,
    key: Key,
    inputs: Sequence[Sequence[float]],
    load: Callable[[], bytes],
) -> Future[list[list[float]]]:
    """As the prediction use case does it: from the cache, else ``load()`` and again.
    ``name`` is a tiny meta-model's (its version is ``test-<name>``)."""
    try:
        return engine.submit_predict(PredictJob(f"test-{name}", key, inputs))
    except NotCached as miss:
        return engine.submit_predict(miss.loaded(load()))
