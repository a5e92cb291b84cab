"""The synchronous fast path: an idle CPU engine runs a prediction in the submitting
thread, with the same result, counts and caching as the device worker."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from models.checkpoint import MetaModel
from models.params import from_bytes
from service.engine import AdaptJob, Engine, PredictJob
from service.engine.runner import ModelRunner, PredictWork
from tests.service.engine.helpers import predict
from tests.service.engine.test_engine_core import make_engine, support


@pytest.fixture
def engine(meta_models: dict[str, MetaModel]) -> Iterator[Engine]:
    engine = make_engine(meta_models)
    engine.start()
    yield engine
    engine.stop()


def test_an_idle_engine_answers_in_the_submitting_thread(
    engine: Engine, meta_models: dict[str, MetaModel]
) -> None:
    blob = engine.submit_adapt(AdaptJob("test-sinusoid", *support(5, seed=1), 4, 0.02))
    params = blob.result(timeout=60).params
    before = engine.stats().worker.predict_jobs
    miss = predict(engine, "sinusoid", ("t", "c", "1"), [[0.5], [1.0]], lambda: params)
    assert miss.done()  # loaded after the miss, run at once, and cached
    hit = engine.submit_predict(PredictJob("test-sinusoid", ("t", "c", "1"), [[0.5], [1.0]]))
    assert hit.done()
    expected = meta_models["sinusoid"].predict(from_bytes(params), torch.tensor([[0.5], [1.0]]))
    torch.testing.assert_close(torch.tensor(hit.result()), expected, rtol=1e-5, atol=1e-5)
    assert hit.result() == miss.result()
    stats = engine.stats()
    assert stats.worker.predict_jobs == before + 2
    assert (stats.cache.misses, stats.cache.hits) == (1, 1)


def test_a_busy_engine_queues_the_prediction(engine: Engine) -> None:
    adapted = engine.submit_adapt(AdaptJob("test-sinusoid", *support(5, seed=2), 4, 0.02))
    params = adapted.result(timeout=60).params
    runner = engine.runners["test-sinusoid"]
    adapt, entered, release = runner.adapt, threading.Event(), threading.Event()

    def stuck(works: object) -> object:
        entered.set()
        release.wait(30)
        return adapt(works)  # type: ignore[arg-type]

    runner.adapt = stuck  # type: ignore[assignment,method-assign]
    running = engine.submit_adapt(AdaptJob("test-sinusoid", *support(5, seed=3), 4, 0.02))
    assert entered.wait(30)
    queued = predict(engine, "sinusoid", ("t", "d", "1"), [[0.5]], lambda: params)
    assert not queued.done()  # behind the running batch, not beside it
    release.set()
    running.result(timeout=60)
    queued.result(timeout=60)


@pytest.mark.parametrize("name", ["sinusoid", "classes"])
def test_a_small_mlp_predicts_one_client_in_numpy_as_torch_does(
    name: str, meta_models: dict[str, MetaModel]
) -> None:
    """A small plain MLP on the CPU predicts one client in NumPy (a few microseconds,
    where torch's calls cost several each): the same outputs as its torch forward."""
    runner = ModelRunner(meta_models[name], torch.device("cpu"))
    assert runner.numpy
    flat = torch.randn(sum(runner.sizes), generator=torch.Generator().manual_seed(3)) * 0.5
    fast = runner.view(flat)
    width = runner.input_shape[0]
    rows = [[0.25 * (i + j) - 2.0 for j in range(width)] for i in range(7)]  # (Q, D)
    work = PredictWork(rows, fast, ("t", "c", "u"), None)
    in_numpy = runner.predict_one(work)
    in_torch = runner.predict_one(work._replace(fast=fast._replace(arrays=())))
    torch.testing.assert_close(torch.tensor(in_numpy), torch.tensor(in_torch), rtol=1e-6, atol=1e-6)
    assert not ModelRunner(meta_models["images"], torch.device("cpu")).numpy  # a conv body
