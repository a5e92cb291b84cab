"""The batched engine end to end: batching, exactness, backpressure, deadlines, the cache."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import replace
from functools import partial

import pytest
import torch

from models.checkpoint import MetaModel
from models.params import from_bytes, nbytes, to_bytes
from service.engine import (
    Adapted,
    AdaptJob,
    DeadlineExceeded,
    Engine,
    EngineConfig,
    NotCached,
    PredictJob,
)
from service.engine.runner import AdaptWork
from service.errors import Unavailable
from tests.service.engine.helpers import adapt_job, predict


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def support(k: int, seed: int) -> tuple[list[list[float]], list[float]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(k, 1, generator=g) * 10 - 5
    amp = float(torch.rand(1, generator=g)) * 4.9 + 0.1
    return x.tolist(), (amp * torch.sin(x - 0.5)).flatten().tolist()


def alone(meta: MetaModel, job: AdaptJob) -> tuple[dict[str, torch.Tensor], float, float]:
    """The reference: ``MetaModel.adapt`` on this request by itself."""
    x = torch.as_tensor(job.inputs, dtype=torch.float32)
    x = x.reshape(len(job.inputs), *meta.config.input_shape)
    if meta.config.kind == "classification":
        y = torch.tensor(job.targets, dtype=torch.long)
    else:
        y = torch.tensor(job.targets).reshape(len(job.targets), 1)
    result = meta.adapt(x, y, steps=job.steps, lr=job.lr)
    return result.fast, float(result.loss_before), float(result.loss_after)


def assert_matches_alone(meta: MetaModel, job: AdaptJob, adapted: Adapted) -> None:
    fast, before, after = alone(meta, job)
    params = from_bytes(adapted.params)
    assert params.keys() == fast.keys()
    for name, tensor in fast.items():
        close(params[name], tensor)
    assert adapted.loss_before == pytest.approx(before, rel=1e-5, abs=1e-6)
    assert adapted.loss_after == pytest.approx(after, rel=1e-5, abs=1e-6)


def make_engine(meta_models: dict[str, MetaModel], **overrides: object) -> Engine:
    config = EngineConfig(device="cpu", **overrides)  # type: ignore[arg-type]
    return Engine(meta_models, config)


@pytest.fixture
def engine(meta_models: dict[str, MetaModel]) -> Iterator[Engine]:
    engine = make_engine(meta_models, max_batch_delay_ms=20.0)
    engine.start()
    yield engine
    engine.stop()


def submit_from_threads(engine: Engine, jobs: list[AdaptJob]) -> list[Adapted]:
    """Each job from its own thread, all released at once."""
    barrier = threading.Barrier(len(jobs))
    futures: list[Future[Adapted] | None] = [None] * len(jobs)

    def client(i: int) -> None:
        barrier.wait()
        futures[i] = engine.submit_adapt(jobs[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [f.result(timeout=60) for f in futures if f is not None]


@pytest.mark.parametrize("path", ["auto", "vmap"])  # auto: bmm for the MLPs
def test_concurrent_jobs_run_as_batches_and_each_matches_its_lone_run(
    meta_models: dict[str, MetaModel], path: str
) -> None:
    engine = make_engine(meta_models, path=path, max_batch_delay_ms=20.0)
    assert engine.runners["test-sinusoid"].batched.path == ("bmm" if path == "auto" else "vmap")
    engine.start()
    jobs, asked = [], []
    for i in range(32):  # support sizes 1..20, default and explicit steps and rates
        x, y = support(1 + i % 20, seed=i)
        steps, lr = (None, None) if i % 3 == 0 else (1 + i % 3, 0.005 * (1 + i % 2))
        jobs.append(adapt_job(meta_models, "sinusoid", x, y, steps, lr))
        asked.append((steps, lr))
    try:
        results = submit_from_threads(engine, jobs)
    finally:
        engine.stop()
    stats = engine.stats().worker
    assert stats.adapt_jobs == 32
    assert stats.adapt_batches < 32
    assert stats.largest_batch > 1
    for job, (steps, lr), adapted in zip(jobs, asked, results, strict=True):
        assert_matches_alone(meta_models["sinusoid"], job, adapted)
        assert adapted.steps == (5 if steps is None else steps)
        assert adapted.lr == (0.01 if lr is None else lr)


@pytest.mark.parametrize("path", ["auto", "vmap"])  # auto: bmm for the MLPs
@pytest.mark.parametrize("name", ["sinusoid-metasgd", "sinusoid-clipped"])
def test_learned_rates_through_either_kernel(
    meta_models: dict[str, MetaModel], path: str, name: str
) -> None:
    engine = make_engine(meta_models, path=path, max_batch_delay_ms=20.0)
    jobs = [adapt_job(meta_models, name, *support(3 + i, seed=i)) for i in range(8)]
    jobs += [
        AdaptJob(f"test-{name}", *support(4, seed=9), 3, 0.02)
    ]  # rate overridden (not via the API)
    futures = [engine.submit_adapt(job) for job in jobs]  # queued before the worker starts
    engine.start()
    try:
        results = [f.result(timeout=60) for f in futures]
    finally:
        engine.stop()
    for job, adapted in zip(jobs, results, strict=True):
        assert_matches_alone(meta_models[name], job, adapted)
    assert [r.lr for r in results] == [None] * 8 + [0.02]
    # learned-rate jobs and rate-overriding jobs never share a batch: at least two batches
    assert engine.stats().worker.adapt_batches >= 2


def test_a_classifier_adapts_with_class_indices(
    engine: Engine, meta_models: dict[str, MetaModel]
) -> None:
    g = torch.Generator().manual_seed(0)
    jobs = [
        adapt_job(
            meta_models,
            "classes",
            torch.randn(k, 4, generator=g).tolist(),
            [i % 3 for i in range(k)],
            3,
            0.1,
        )
        for k in (6, 3)
    ]
    for job, adapted in zip(
        jobs, [f.result() for f in map(engine.submit_adapt, jobs)], strict=True
    ):
        assert_matches_alone(meta_models["classes"], job, adapted)


def test_a_conv_net_adapts_its_head_through_the_vmap_path(
    engine: Engine, meta_models: dict[str, MetaModel]
) -> None:
    assert engine.runners["test-images"].batched.path == "vmap"
    g = torch.Generator().manual_seed(0)
    jobs = [  # flat rows of 64 values, as the API sends them; shots 2 and 4 per class
        adapt_job(
            meta_models,
            "images",
            torch.randn(k, 64, generator=g).tolist(),
            [i % 3 for i in range(k)],
            3,
            0.5,
        )
        for k in (6, 12)
    ]
    jobs.append(replace(jobs[0], inputs=torch.tensor(jobs[0].inputs).reshape(6, 1, 8, 8)))
    meta = meta_models["images"]
    results = [f.result() for f in map(engine.submit_adapt, jobs)]
    assert results[2].params == results[0].params  # a tensor of the input shape: the same
    for job, adapted in zip(jobs, results, strict=True):
        fast, before, after = alone(meta, job)
        params = from_bytes(adapted.params)
        assert params.keys() == {"head.weight", "head.bias"}
        for name, tensor in fast.items():
            close(params[name], tensor)
        assert (adapted.loss_before, adapted.loss_after) == pytest.approx((before, after), rel=1e-5)
        queries = torch.randn(2, 64, generator=g).tolist()
        got = predict(engine, "images", ("t", "img", "1"), queries, partial(bytes, adapted.params))
        expected = meta.predict(fast, torch.tensor(queries).reshape(2, 1, 8, 8))
        close(torch.tensor(got.result()), expected)
        engine.forget("t", "img")


def test_support_sets_grow_per_client_as_the_artifact_was_trained(
    engine: Engine, meta_models: dict[str, MetaModel]
) -> None:
    meta, plain = meta_models["images-shifted"], meta_models["images"]
    g = torch.Generator().manual_seed(1)
    jobs = [  # 3 rows grow to 15 (<= 20); 6 rows would be 30 and stay as given
        adapt_job(
            meta_models,
            "images-shifted",
            torch.rand(k, 64, generator=g).tolist(),
            [0, 1, 2] * (k // 3),
        )
        for k in (3, 6)
    ]
    results = submit_from_threads(engine, jobs)
    for job, adapted in zip(jobs, results, strict=True):
        assert_matches_alone(meta, job, adapted)  # MetaModel.adapt grows the set itself
    small = torch.tensor(jobs[0].inputs).reshape(3, 1, 8, 8)
    unshifted = plain.adapt(small, torch.tensor([0, 1, 2])).fast["head.weight"]
    assert not torch.allclose(from_bytes(results[0].params)["head.weight"], unshifted)


def test_predictions_batch_across_clients_and_equal_single_ones(
    engine: Engine, meta_models: dict[str, MetaModel]
) -> None:
    meta = meta_models["sinusoid"]
    blobs = [
        engine.submit_adapt(AdaptJob("test-sinusoid", *support(5, seed=i), 4, 0.02)).result().params
        for i in range(6)
    ]
    queries = [[[q / 2]] * (i + 1) for i, q in enumerate(range(-5, 1))]  # 1..6 queries each
    futures = [
        predict(engine, "sinusoid", ("t", f"c{i}", "1"), q, lambda blob=blob: blob)
        for i, (blob, q) in enumerate(zip(blobs, queries, strict=True))
    ]
    outputs = [f.result(timeout=60) for f in futures]
    for blob, q, out in zip(blobs, queries, outputs, strict=True):
        expected = meta.predict(from_bytes(blob), torch.tensor(q)).tolist()
        assert len(out) == len(q)
        close(torch.tensor(out), torch.tensor(expected))
    stats = engine.stats()
    assert stats.cache.misses == 6 and stats.cache.entries == 6
    again = engine.submit_predict(
        PredictJob("test-sinusoid", ("t", "c0", "1"), queries[0])
    ).result()
    # a hit: no NotCached, nothing loaded; equal within float rounding (a batch of one and
    # a batch of six may sum in another order), which still tells clients apart
    torch.testing.assert_close(torch.tensor(again), torch.tensor(outputs[0]), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(torch.tensor(outputs[1][:1]), torch.tensor(outputs[0][:1]))
    assert engine.stats().cache.hits == 1


def test_params_are_loaded_once_per_miss_and_a_new_version_is_never_stale(
    engine: Engine,
) -> None:
    v1 = engine.submit_adapt(AdaptJob("test-sinusoid", *support(5, seed=1), 5, 0.05)).result()
    v2 = engine.submit_adapt(AdaptJob("test-sinusoid", *support(5, seed=2), 5, 0.05)).result()
    loads: list[int] = []

    def loader(blob: bytes, version: int) -> bytes:
        loads.append(version)
        return blob

    q = [[0.5], [1.5]]
    first = predict(engine, "sinusoid", ("t", "c", "1"), q, lambda: loader(v1.params, 1)).result()
    second = predict(engine, "sinusoid", ("t", "c", "2"), q, lambda: loader(v2.params, 2)).result()
    assert loads == [1, 2]
    assert first != second
    hit = engine.submit_predict(PredictJob("test-sinusoid", ("t", "c", "2"), q)).result()
    torch.testing.assert_close(torch.tensor(hit), torch.tensor(second), rtol=1e-6, atol=1e-6)


def test_params_given_without_a_miss_are_used_but_never_cached(engine: Engine) -> None:
    blob = (
        engine.submit_adapt(AdaptJob("test-sinusoid", *support(5, seed=1), 5, 0.05)).result().params
    )
    job = PredictJob("test-sinusoid", ("t", "c", "1"), [[0.5]], params=blob)
    assert (
        engine.submit_predict(job).result()
        == predict(engine, "sinusoid", ("t", "d", "1"), [[0.5]], lambda: blob).result()
    )
    assert engine.stats().cache.entries == 1  # d's, loaded after its miss


def test_forget_means_a_deleted_client_is_never_served_from_the_cache(engine: Engine) -> None:
    blob = (
        engine.submit_adapt(AdaptJob("test-sinusoid", *support(5, seed=1), 5, 0.05)).result().params
    )
    q = [[0.5]]
    predict(engine, "sinusoid", ("t", "c", "1"), q, lambda: blob).result()
    predict(engine, "sinusoid", ("t", "other", "1"), q, lambda: blob).result()
    engine.forget("t", "c")
    with pytest.raises(NotCached):  # a miss: refused at once; the caller reads the store
        engine.submit_predict(PredictJob("test-sinusoid", ("t", "c", "1"), q))
    engine.submit_predict(
        PredictJob("test-sinusoid", ("t", "other", "1"), q)
    ).result()  # still cached
    assert engine.stats().queued == 0  # the refusal queued nothing


def test_an_adaptation_is_cached_once_stored_unless_its_client_was_forgotten_since(
    meta_models: dict[str, MetaModel],
) -> None:
    """The cache's safety rule: a delete after an adaptation started keeps its params out
    of the cache (a client re-created under the same id must never get them)."""
    engine = make_engine(meta_models)
    kept = engine.submit_adapt(AdaptJob("test-sinusoid", *support(5, seed=1), 5, 0.05))
    overtaken = engine.submit_adapt(AdaptJob("test-sinusoid", *support(5, seed=2), 5, 0.05))
    engine.forget("t", "d")  # d is deleted while its adaptation waits for the worker
    engine.start()
    try:
        blob = kept.result(timeout=60)
        assert engine.stored(blob, ("t", "c", "1"))
        no_read = PredictJob("test-sinusoid", ("t", "c", "1"), [[0.5]])
        engine.submit_predict(no_read).result()  # cached: no NotCached
        assert (engine.stats().cache.hits, engine.stats().cache.misses) == (1, 0)

        assert not engine.stored(overtaken.result(timeout=60), ("t", "d", "1"))
        later = engine.submit_adapt(AdaptJob("test-sinusoid", *support(5, seed=3), 5, 0.05))
        stale = later.result(timeout=60)  # adapted before c's delete, stored after it
        engine.forget("t", "c")
        assert not engine.stored(stale, ("t", "c", "2"))
        assert engine.stats().cache.entries == 0
        with pytest.raises(ValueError, match="do not fit"):  # params of another meta-model
            engine.stored(replace(blob, meta_model="test-classes"), ("t", "e", "1"))
    finally:
        engine.stop()


def test_a_load_that_races_a_forget_is_not_cached(engine: Engine) -> None:
    blob = (
        engine.submit_adapt(AdaptJob("test-sinusoid", *support(5, seed=1), 5, 0.05)).result().params
    )
    with pytest.raises(NotCached) as miss:  # the miss, before the store is read ...
        engine.submit_predict(PredictJob("test-sinusoid", ("t", "c", "1"), [[0.5]]))
    engine.forget("t", "c")  # ... the delete commits while the request reads ...
    loaded = engine.submit_predict(miss.value.loaded(blob))  # ... and it submits again
    loaded.result(timeout=10)  # the request made before the delete is answered
    assert engine.stats().cache.entries == 0  # but its params were not cached


def test_a_full_queue_refuses_at_once_with_retry_after(meta_models: dict[str, MetaModel]) -> None:
    engine = make_engine(meta_models, queue_size=4)  # not started: nothing drains
    job = adapt_job(meta_models, "sinusoid", *support(3, seed=0))
    futures = [engine.submit_adapt(job) for _ in range(4)]
    started = time.monotonic()
    with pytest.raises(Unavailable) as refused:
        engine.submit_adapt(job)
    with pytest.raises(Unavailable):  # a prediction miss is refused before any read
        engine.submit_predict(PredictJob("test-sinusoid", ("t", "c", "1"), [[0.0]]))
    assert time.monotonic() - started < 5.0  # refused, not blocked
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1.0
    assert engine.stats().rejected == 2
    engine.start()
    assert all(isinstance(f.result(timeout=60), Adapted) for f in futures)
    engine.stop()


def test_a_job_past_its_deadline_fails_cleanly(meta_models: dict[str, MetaModel]) -> None:
    engine = make_engine(meta_models, job_timeout_s=0.05)
    job = adapt_job(meta_models, "sinusoid", *support(3, seed=0))
    late = engine.submit_adapt(job)
    time.sleep(0.1)
    engine.start()
    try:
        with pytest.raises(DeadlineExceeded):
            late.result(timeout=10)
        assert isinstance(late.exception(), Unavailable)  # a 503 with Retry-After
        fresh = engine.submit_adapt(job)
        assert isinstance(fresh.result(timeout=10), Adapted)  # the engine carries on
        assert engine.stats().expired == 1
    finally:
        engine.stop()


def test_stored_params_of_another_shape_are_refused(
    engine: Engine, meta_models: dict[str, MetaModel]
) -> None:
    wrong = to_bytes(meta_models["classes"].params)
    with pytest.raises(ValueError, match="do not fit"):
        predict(engine, "sinusoid", ("t", "c", "1"), [[0.0]], lambda: wrong)
    assert engine.stats().queued == 0
    blob = (
        engine.submit_adapt(AdaptJob("test-sinusoid", *support(5, seed=1), 5, 0.05)).result().params
    )
    assert predict(engine, "sinusoid", ("t", "c", "1"), [[0.0]], lambda: blob).result()


def test_a_failing_job_does_not_fail_its_batch(
    meta_models: dict[str, MetaModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(meta_models)
    runner = engine.runners["test-sinusoid"]
    real = runner.adapt

    def fragile(works: list[AdaptWork]) -> list[Adapted]:
        if any(w.job.steps == 13 for w in works):
            raise RuntimeError("boom")
        return real(works)

    monkeypatch.setattr(runner, "adapt", fragile)
    jobs = [
        AdaptJob("test-sinusoid", *support(3, seed=i), 13 if i == 2 else 2, 0.01) for i in range(4)
    ]
    futures = [engine.submit_adapt(job) for job in jobs]
    engine.start()
    try:
        with pytest.raises(RuntimeError, match="boom"):
            futures[2].result(timeout=10)
        assert all(isinstance(futures[i].result(timeout=10), Adapted) for i in (0, 1, 3))
        assert engine.stats().worker.failed_jobs == 1
    finally:
        engine.stop()


def test_stop_drains_queued_jobs_and_refuses_new_ones(meta_models: dict[str, MetaModel]) -> None:
    engine = make_engine(meta_models)
    queued = [
        engine.submit_adapt(AdaptJob("test-sinusoid", *support(3, seed=i), 2, 0.01))
        for i in range(3)
    ]
    engine.start()
    engine.stop()
    assert all(isinstance(f.result(timeout=0), Adapted) for f in queued)
    with pytest.raises(Unavailable):
        engine.submit_adapt(AdaptJob("test-sinusoid", *support(3, seed=0), 2, 0.01))
    never = make_engine(meta_models)
    orphan = never.submit_adapt(AdaptJob("test-sinusoid", *support(3, seed=0), 2, 0.01))
    never.stop()  # never started: queued jobs fail instead of hanging
    assert isinstance(orphan.exception(timeout=0), Unavailable)


def test_cache_evicts_by_bytes(meta_models: dict[str, MetaModel]) -> None:
    one = nbytes(meta_models["sinusoid"].params)
    engine = make_engine(meta_models, cache_bytes=2 * one)
    engine.start()
    try:
        blob = engine.submit_adapt(AdaptJob("test-sinusoid", *support(3, seed=0), 1, 0.01)).result()
        for i in range(3):
            predict(engine, "sinusoid", ("t", f"c{i}", "1"), [[0.0]], lambda: blob.params).result()
        stats = engine.stats().cache
        assert (stats.entries, stats.evictions, stats.bytes) == (2, 1, 2 * one)
    finally:
        engine.stop()


def test_the_device_setting(meta_models: dict[str, MetaModel]) -> None:
    auto = Engine(meta_models, EngineConfig(device="auto"))
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            Engine(meta_models, EngineConfig(device="cuda"))


def test_the_config_reads_any_settings_object() -> None:
    class Settings:  # the service's Settings has these names, and others
        device = "cpu"
        max_batch_size = 8
        max_batch_delay_ms = 1.5
        database_url = "sqlite://"

    config = EngineConfig.of(Settings())
    assert (config.device, config.max_batch_size, config.max_batch_delay_ms) == ("cpu", 8, 1.5)
    assert config.queue_size == EngineConfig().queue_size


def test_the_engine_uses_the_meta_models_own_learner_on_its_own_copy(
    meta_models: dict[str, MetaModel],
) -> None:
    engine = make_engine(meta_models)
    meta, runner = meta_models["images"], engine.runners["test-images"]
    learner = runner.batched.learner
    assert type(learner) is type(meta.learner) and learner.loss is meta.learner.loss
    assert learner.inner == meta.learner.inner
    assert learner.net is not meta.net  # a copy: the caller's meta-model is never moved
    state, copied = meta.net.state_dict(), learner.net.state_dict()
    assert state.keys() == copied.keys()
    assert all(torch.equal(state[n], copied[n]) for n in state)
