"""Meta-model versions on the engine: a runner per version (sha), built on demand from the
job's model, and unloaded on release, but never while a job of it is queued or running."""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest
import torch

from models.checkpoint import MetaModel
from service.engine import Engine, EngineConfig, PredictJob
from tests.service.engine.helpers import adapt_job

XS = [[-2.0], [-0.5], [1.0], [2.5]]
YS = [0.4, -0.2, 0.9, -1.1]


def another_version(model: MetaModel, sha: str) -> MetaModel:
    other = copy.deepcopy(model)
    other.params = {n: t + 0.1 for n, t in other.params.items()}
    other.version = sha
    return other


def test_any_version_runs_on_demand_and_release_unloads_it(
    meta_models: dict[str, MetaModel],
) -> None:
    engine = Engine({"sinusoid": meta_models["sinusoid"]}, EngineConfig(device="cpu"))
    engine.start()
    try:
        newer = another_version(meta_models["sinusoid"], "v2")
        job = adapt_job({"sinusoid": newer}, "sinusoid", XS, YS)
        assert job.meta_model == "v2" and "v2" not in engine.loaded()
        adapted = engine.submit_adapt(job).result(timeout=60)
        assert engine.loaded() == ["test-sinusoid", "v2"]
        expected = newer.adapt(torch.tensor(XS), torch.tensor(YS).reshape(-1, 1), steps=job.steps)
        got = engine.submit_predict(
            PredictJob("v2", ("t", "c", 1), [[0.5]], params=adapted.params, model=newer)
        ).result(timeout=60)
        want = newer.predict(expected.fast, torch.tensor([[0.5]])).tolist()
        assert got[0] == pytest.approx(want[0], rel=1e-5)

        engine.release("v2")
        assert engine.loaded() == ["test-sinusoid"]
        assert not engine.stored(adapted, ("t", "c", 1))  # unloaded: not cached, no error
        with pytest.raises(KeyError, match="not loaded"):  # a job without its model
            engine.submit_predict(PredictJob("v2", ("t", "c", 1), [[0.5]], params=b""))
    finally:
        engine.stop()


def test_a_released_version_stays_until_its_jobs_are_done(
    meta_models: dict[str, MetaModel],
) -> None:
    engine = Engine({"sinusoid": meta_models["sinusoid"]}, EngineConfig(device="cpu"))
    runner = engine.runners["test-sinusoid"]
    started, release = threading.Event(), threading.Event()
    original = runner.adapt

    def blocked(works: Any) -> Any:
        started.set()
        assert release.wait(30)
        return original(works)

    engine.start()  # warmed up: the next adaptation blocks
    runner.adapt = blocked  # type: ignore[method-assign]
    try:
        running = engine.submit_adapt(adapt_job(meta_models, "sinusoid", XS, YS))
        assert started.wait(30)
        engine.release("test-sinusoid")  # its job runs: it stays
        assert engine.loaded() == ["test-sinusoid"]
        release.set()
        running.result(timeout=60)
        engine.stop()  # the done callbacks have run once the worker stopped
        assert engine.loaded() == []
    finally:
        release.set()
        engine.stop()
