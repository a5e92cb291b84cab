"""Many jobs per call (what bulk endpoints use) and predictions run at once by an idle
engine: one gathered forward over the clients' stacked params, equal to each client's
own prediction; misses, errors and a full queue reported per job or for the lot."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import wait
from typing import Any

import pytest
import torch

from models.checkpoint import MetaModel
from models.params import from_bytes
from service.engine import AdaptJob, Engine, EngineConfig, NotCached, PredictJob
from service.engine.worker import DoneFuture
from service.errors import Unavailable
from tests.service.engine.helpers import adapt_job


def close(actual: Any, expected: Any) -> None:
    """Within 1e-6 (relative, and absolute near 0): float sums in another order or batch
    shape differ in the last bits, another client's outputs by far more."""
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=1e-6, atol=1e-6)


def support(k: int, seed: int, features: int = 1) -> tuple[list[list[float]], list[float]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(k, features, generator=g) * 10 - 5
    amp = float(torch.rand(1, generator=g)) * 4.9 + 0.1
    return x.tolist(), (amp * torch.sin(x[:, 0] - 0.5)).tolist()


@pytest.fixture
def engine(meta_models: dict[str, MetaModel]) -> Iterator[Engine]:
    engine = Engine(meta_models, EngineConfig(device="cpu", queue_size=8))
    engine.start()
    yield engine
    engine.stop()


def adapted_clients(engine: Engine, n: int, steps: int = 3) -> list[bytes]:
    """n sinusoid clients adapted and cached as ("t", "c<i>", "1")."""
    blobs = []
    for i in range(n):
        adapted = engine.submit_adapt(
            AdaptJob("test-sinusoid", *support(5, seed=i), steps, 0.05)
        ).result(timeout=60)
        assert engine.stored(adapted, ("t", f"c{i}", "1"))
        blobs.append(adapted.params)
    return blobs


def block_worker(engine: Engine, version: str) -> tuple[threading.Event, threading.Event]:
    """The next adaptation of ``version`` holds the device until ``release`` is set."""
    runner = engine.runners[version]
    original, started, release = runner.adapt, threading.Event(), threading.Event()

    def blocked(works: Any) -> Any:
        started.set()
        assert release.wait(30)
        return original(works)

    runner.adapt = blocked  # type: ignore[method-assign]
    return started, release


def test_many_predictions_are_one_gathered_forward_equal_to_each_alone(
    engine: Engine, meta_models: dict[str, MetaModel]
) -> None:
    meta = meta_models["sinusoid"]
    blobs = adapted_clients(engine, 6)
    queries = [[[q / 2]] * (i + 1) for i, q in enumerate(range(-5, 1))]  # 1..6 queries each
    jobs = [PredictJob("test-sinusoid", ("t", f"c{i}", "1"), q) for i, q in enumerate(queries)]
    before = engine.stats().worker.batch_sizes.get("predict", {}).get(6, 0)
    together = [f.result(timeout=60) for f in engine.submit_predict_many(jobs)]
    assert engine.stats().worker.batch_sizes["predict"][6] == before + 1  # one pass
    alone = [engine.submit_predict(job).result(timeout=60) for job in jobs]  # idle: at once
    for blob, q, many, one in zip(blobs, queries, together, alone, strict=True):
        expected = meta.predict(from_bytes(blob), torch.tensor(q)).tolist()
        assert len(many) == len(one) == len(q)
        close(many, expected)
        close(one, expected)
        close(many, one)
    with pytest.raises(AssertionError):  # the tolerance still tells clients apart
        close(together[1][:1], together[0][:1])


@pytest.mark.parametrize("name", ["sinusoid-metasgd", "classes", "images"])
def test_an_idle_engine_answers_at_once_as_the_meta_model_would(
    engine: Engine, meta_models: dict[str, MetaModel], name: str
) -> None:
    meta = meta_models[name]
    shape = meta.config.input_shape
    g = torch.Generator().manual_seed(7)
    if name == "images":
        inputs: Any = torch.rand(4, *shape, generator=g)
        targets: list[Any] = [0, 1, 0, 1]
    else:
        inputs = (torch.rand(4, *shape, generator=g) * 4 - 2).tolist()
        targets = [0, 1, 2, 0] if name == "classes" else [0.5, -0.5, 1.0, 0.0]
    if name == "images":  # as service.requests hands images over: a tensor
        inner = meta.config.inner
        job = AdaptJob(meta.version, inputs, targets, inner.steps, inner.lr)
    else:
        job = adapt_job(meta_models, name, inputs, targets)
    adapted = engine.submit_adapt(job).result(timeout=60)
    assert engine.stored(adapted, ("t", name, "1"))
    future = engine.submit_predict(PredictJob(meta.version, ("t", name, "1"), inputs))
    assert isinstance(future, DoneFuture)  # run in this thread: nothing queued or running
    expected = meta.predict(from_bytes(adapted.params), torch.as_tensor(inputs)).tolist()
    close(future.result(), expected)


def test_a_miss_fails_only_its_own_future_and_loads_many_at_once(engine: Engine) -> None:
    blobs = adapted_clients(engine, 2)
    q = [[0.5], [1.5]]
    cached = engine.submit_predict(PredictJob("test-sinusoid", ("t", "c0", "1"), q)).result()
    jobs = [
        PredictJob("test-sinusoid", ("t", "c0", "1"), q),
        PredictJob("test-sinusoid", ("t", "new", "1"), q),
        PredictJob("missing-version", ("t", "c0", "1"), q),
    ]
    hit, miss, unknown = engine.submit_predict_many(jobs)
    close(hit.result(), cached)
    error = miss.exception()
    assert isinstance(error, NotCached)
    assert isinstance(unknown.exception(), KeyError)
    (loaded,) = engine.submit_predict_many([error.loaded(blobs[1])])
    again = engine.submit_predict(PredictJob("test-sinusoid", ("t", "new", "1"), q))
    close(again.result(), loaded.result(timeout=60))  # cached by the load: no NotCached


def test_many_jobs_queue_behind_a_busy_device_as_one_batch(
    engine: Engine, meta_models: dict[str, MetaModel]
) -> None:
    adapted_clients(engine, 4)
    started, release = block_worker(engine, "test-sinusoid")
    try:
        busy = engine.submit_adapt(AdaptJob("test-sinusoid", *support(5, seed=9), 2, 0.05))
        assert started.wait(30)
        q = [[0.25]]
        jobs = [PredictJob("test-sinusoid", ("t", f"c{i}", "1"), q) for i in range(4)]
        queued = engine.submit_predict_many(jobs)
        single = engine.submit_predict(jobs[0])  # the device is busy: queued too
        assert not any(f.done() for f in [*queued, single])
        assert len(engine.batcher) == 5
        with pytest.raises(Unavailable):  # 5 queued of 8: no room for 4 more, none taken
            engine.submit_predict_many(jobs)
        assert len(engine.batcher) == 5
        release.set()
        done, _ = wait([busy, *queued, single], timeout=60)
        assert len(done) == 6
        assert engine.stats().worker.batch_sizes["predict"].get(5) == 1  # one gathered pass
        close(single.result(), queued[0].result())
    finally:
        release.set()


def test_many_adaptations_run_as_one_batch_equal_to_each_alone(engine: Engine) -> None:
    jobs = [AdaptJob("test-sinusoid", *support(4 + i, seed=i), 3, 0.05) for i in range(5)]
    before = engine.stats().worker.batch_sizes.get("adapt", {}).get(5, 0)
    together = [f.result(timeout=60) for f in engine.submit_adapt_many(jobs)]
    assert engine.stats().worker.batch_sizes["adapt"][5] == before + 1
    for job, many in zip(jobs, together, strict=True):
        one = engine.submit_adapt(job).result(timeout=60)
        close(many.loss_after, one.loss_after)
        for name, tensor in from_bytes(many.params).items():
            close(tensor, from_bytes(one.params)[name])
    (unknown,) = engine.submit_adapt_many([AdaptJob("missing-version", [[0.0]], [0.0], 1, 0.1)])
    assert isinstance(unknown.exception(), KeyError)


def test_a_done_future_behaves_as_any_done_future() -> None:
    future = DoneFuture([[1.0]])
    assert future.done() and not future.cancel() and future.exception() is None
    seen: list[Any] = []
    future.add_done_callback(lambda f: seen.append(f.result()))
    assert seen == [[[1.0]]]
    assert wait([future, DoneFuture(2)], timeout=1).not_done == set()

    async def awaited() -> Any:
        return await asyncio.wrap_future(future)

    assert asyncio.run(awaited()) == [[1.0]]


def test_a_stopped_engine_refuses_predictions(engine: Engine) -> None:
    adapted_clients(engine, 1)
    engine.stop()
    job = PredictJob("test-sinusoid", ("t", "c0", "1"), [[0.5]])
    with pytest.raises(Unavailable):
        engine.submit_predict(job)
    with pytest.raises(Unavailable):
        engine.submit_predict_many([job])
