"""The batched engine end to end: batching, exactness, backpressure, deadlines, the cache."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import pytest
import torch

from models.checkpoint import MetaModel
from models.params import from_bytes, nbytes, to_bytes
from service.engine.core import Adapted, AdaptJob, DeadlineExceeded, Engine, EngineConfig
from service.engine.worker import AdaptWork
from service.errors import InvalidInput, Unavailable


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def support(k: int, seed: int) -> tuple[list[list[float]], list[float]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(k, 1, generator=g) * 10 - 5
    amp = float(torch.rand(1, generator=g)) * 4.9 + 0.1
    return x.tolist(), (amp * torch.sin(x - 0.5)).flatten().tolist()


def alone(meta: MetaModel, job: AdaptJob) -> tuple[dict[str, torch.Tensor], float, float]:
    """The reference: ``MetaModel.adapt`` on this request by itself."""
    x = torch.tensor(job.inputs).reshape(len(job.inputs), *meta.config.input_shape)
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
    assert engine.runners["sinusoid"].batched.path == ("bmm" if path == "auto" else "vmap")
    engine.start()
    jobs = []
    for i in range(32):  # support sizes 1..20, default and explicit steps and rates
        x, y = support(1 + i % 20, seed=i)
        steps, lr = (None, None) if i % 3 == 0 else (1 + i % 3, 0.005 * (1 + i % 2))
        jobs.append(AdaptJob("sinusoid", x, y, steps, lr))
    try:
        results = submit_from_threads(engine, jobs)
    finally:
        engine.stop()
    stats = engine.stats().worker
    assert stats.adapt_jobs == 32
    assert stats.adapt_batches < 32
    assert stats.largest_batch > 1
    for job, adapted in zip(jobs, results, strict=True):
        assert_matches_alone(meta_models["sinusoid"], job, adapted)
        assert adapted.steps == (5 if job.steps is None else job.steps)
        assert adapted.lr == (0.01 if job.lr is None else job.lr)


@pytest.mark.parametrize("path", ["auto", "vmap"])  # auto: bmm for the MLPs
@pytest.mark.parametrize("name", ["sinusoid-metasgd", "sinusoid-clipped"])
def test_learned_rates_through_either_kernel(
    meta_models: dict[str, MetaModel], path: str, name: str
) -> None:
    engine = make_engine(meta_models, path=path, max_batch_delay_ms=20.0)
    jobs = [AdaptJob(name, *support(3 + i, seed=i), None, None) for i in range(8)]
    jobs += [AdaptJob(name, *support(4, seed=9), 3, 0.02)]  # rate overridden
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
        AdaptJob(
            "classes", torch.randn(k, 4, generator=g).tolist(), [i % 3 for i in range(k)], 3, 0.1
        )
        for k in (6, 3)
    ]
    for job, adapted in zip(
        jobs, [f.result() for f in map(engine.submit_adapt, jobs)], strict=True
    ):
        assert_matches_alone(meta_models["classes"], job, adapted)
    with pytest.raises(InvalidInput, match=r"support\.targets"):
        engine.submit_adapt(AdaptJob("classes", [[0.0] * 4], [3], None, None))


def test_class_indices_may_be_integral_floats(
    engine: Engine, meta_models: dict[str, MetaModel]
) -> None:
    """The service maps labels to indices as floats (2.0): the same as ints, never bools."""
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)).tolist()
    ints = engine.submit_adapt(AdaptJob("classes", x, [0, 2, 1, 2], 3, 0.1)).result()
    floats = engine.submit_adapt(AdaptJob("classes", x, [0.0, 2.0, 1.0, 2.0], 3, 0.1)).result()
    assert floats.params == ints.params
    for bad in ([0.5], [True], [-1.0], ["1"]):
        with pytest.raises(InvalidInput, match=r"support\.targets"):
            engine.submit_adapt(AdaptJob("classes", [[0.0] * 4], bad, None, None))


def test_a_conv_net_adapts_its_head_through_the_vmap_path(
    engine: Engine, meta_models: dict[str, MetaModel]
) -> None:
    assert engine.runners["images"].batched.path == "vmap"
    g = torch.Generator().manual_seed(0)
    jobs = [  # flat rows of 64 values, as the API sends them; shots 2 and 4 per class
        AdaptJob(
            "images", torch.randn(k, 64, generator=g).tolist(), [i % 3 for i in range(k)], 3, 0.5
        )
        for k in (6, 12)
    ]
    meta = meta_models["images"]
    for job, adapted in zip(
        jobs, [f.result() for f in map(engine.submit_adapt, jobs)], strict=True
    ):
        fast, before, after = alone(meta, job)
        params = from_bytes(adapted.params)
        assert params.keys() == {"head.weight", "head.bias"}
        for name, tensor in fast.items():
            close(params[name], tensor)
        assert (adapted.loss_before, adapted.loss_after) == pytest.approx((before, after), rel=1e-5)
        queries = torch.randn(2, 64, generator=g).tolist()
        blob = functools.partial(bytes, adapted.params)
        got = engine.submit_predict("images", ("t", "img", 1), blob, queries)
        expected = meta.predict(fast, torch.tensor(queries).reshape(2, 1, 8, 8))
        close(torch.tensor(got.result()), expected)
        engine.forget("t", "img")


def test_support_sets_grow_per_client_as_the_artifact_was_trained(
    engine: Engine, meta_models: dict[str, MetaModel]
) -> None:
    meta, plain = meta_models["images-shifted"], meta_models["images"]
    g = torch.Generator().manual_seed(1)
    jobs = [  # 3 rows grow to 15 (<= 20); 6 rows would be 30 and stay as given
        AdaptJob(
            "images-shifted",
            torch.rand(k, 64, generator=g).tolist(),
            [0, 1, 2] * (k // 3),
            None,
            None,
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
        engine.submit_adapt(AdaptJob("sinusoid", *support(5, seed=i), 4, 0.02)).result().params
        for i in range(6)
    ]
    queries = [[[q / 2]] * (i + 1) for i, q in enumerate(range(-5, 1))]  # 1..6 queries each
    futures = [
        engine.submit_predict("sinusoid", ("t", f"c{i}", 1), functools.partial(bytes, blob), q)
        for i, (blob, q) in enumerate(zip(blobs, queries, strict=True))
    ]
    outputs = [f.result(timeout=60) for f in futures]
    for blob, q, out in zip(blobs, queries, outputs, strict=True):
        expected = meta.predict(from_bytes(blob), torch.tensor(q)).tolist()
        assert len(out) == len(q)
        close(torch.tensor(out), torch.tensor(expected))
    stats = engine.stats()
    assert stats.cache.misses == 6 and stats.cache.entries == 6
    again = engine.submit_predict("sinusoid", ("t", "c0", 1), lambda: b"", queries[0]).result()
    assert again == outputs[0]  # a hit: params() was not called
    assert engine.stats().cache.hits == 1


def test_params_are_loaded_once_per_miss_and_a_new_version_is_never_stale(
    engine: Engine,
) -> None:
    v1 = engine.submit_adapt(AdaptJob("sinusoid", *support(5, seed=1), 5, 0.05)).result()
    v2 = engine.submit_adapt(AdaptJob("sinusoid", *support(5, seed=2), 5, 0.05)).result()
    loads: list[int] = []

    def loader(blob: bytes, version: int) -> bytes:
        loads.append(version)
        return blob

    q = [[0.5], [1.5]]
    out1 = engine.submit_predict("sinusoid", ("t", "c", 1), lambda: loader(v1.params, 1), q)
    first = out1.result()
    out2 = engine.submit_predict("sinusoid", ("t", "c", 2), lambda: loader(v2.params, 2), q)
    second = out2.result()
    assert loads == [1, 2]
    assert first != second
    assert engine.submit_predict("sinusoid", ("t", "c", 2), lambda: b"", q).result() == second


def test_forget_means_a_deleted_client_is_never_served_from_the_cache(engine: Engine) -> None:
    blob = engine.submit_adapt(AdaptJob("sinusoid", *support(5, seed=1), 5, 0.05)).result().params
    q = [[0.5]]
    engine.submit_predict("sinusoid", ("t", "c", 1), lambda: blob, q).result()
    engine.submit_predict("sinusoid", ("t", "other", 1), lambda: blob, q).result()
    engine.forget("t", "c")

    def gone() -> bytes:
        raise LookupError("client c was deleted")

    with pytest.raises(LookupError):  # a miss: params() runs, in the submitting thread
        engine.submit_predict("sinusoid", ("t", "c", 1), gone, q)
    engine.submit_predict("sinusoid", ("t", "other", 1), gone, q).result()  # still cached
    assert engine.stats().queued == 0  # the failed load gave its queue slot back


def test_priming_caches_a_new_version_unless_its_client_was_forgotten_since(
    engine: Engine,
) -> None:
    blob = engine.submit_adapt(AdaptJob("sinusoid", *support(5, seed=1), 5, 0.05)).result().params

    def no_load() -> bytes:
        raise AssertionError("a primed version must not be read from the database")

    ticket = engine.ticket()
    assert engine.prime("sinusoid", ("t", "c", 1), blob, ticket)
    engine.submit_predict("sinusoid", ("t", "c", 1), no_load, [[0.5]]).result()
    assert (engine.stats().cache.hits, engine.stats().cache.misses) == (1, 0)

    stale = engine.ticket()  # taken before the write of version 2 ...
    engine.forget("t", "c")  # ... which a delete of the client overtook
    assert not engine.prime("sinusoid", ("t", "c", 2), blob, stale)
    assert engine.stats().cache.entries == 0
    with pytest.raises(ValueError, match="do not fit"):  # params of another meta-model
        engine.prime("classes", ("t", "d", 1), blob, engine.ticket())


def test_a_load_that_races_a_forget_is_not_cached(engine: Engine) -> None:
    blob = engine.submit_adapt(AdaptJob("sinusoid", *support(5, seed=1), 5, 0.05)).result().params
    loading, deleted = threading.Event(), threading.Event()

    def slow_load() -> bytes:  # read before the delete, finished after it
        loading.set()
        deleted.wait(10)
        return blob

    futures: list[Future[list[list[float]]]] = []
    request = threading.Thread(
        target=lambda: futures.append(
            engine.submit_predict("sinusoid", ("t", "c", 1), slow_load, [[0.5]])
        )
    )
    request.start()
    loading.wait(10)
    engine.forget("t", "c")  # the delete commits while the request reads
    deleted.set()
    request.join(10)
    futures[0].result(timeout=10)  # the request made before the delete is answered
    assert engine.stats().cache.entries == 0  # but its params were not cached


def test_a_full_queue_refuses_at_once_with_retry_after(meta_models: dict[str, MetaModel]) -> None:
    engine = make_engine(meta_models, queue_size=4)  # not started: nothing drains
    job = AdaptJob("sinusoid", *support(3, seed=0), None, None)
    futures = [engine.submit_adapt(job) for _ in range(4)]
    started = time.monotonic()
    with pytest.raises(Unavailable) as refused:
        engine.submit_adapt(job)
    with pytest.raises(Unavailable):  # a prediction miss needs a slot as well
        engine.submit_predict("sinusoid", ("t", "c", 1), lambda: b"", [[0.0]])
    assert time.monotonic() - started < 5.0  # refused, not blocked
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1.0
    assert engine.stats().rejected == 2
    engine.start()
    assert all(isinstance(f.result(timeout=60), Adapted) for f in futures)
    engine.stop()


def test_a_job_past_its_deadline_fails_cleanly(meta_models: dict[str, MetaModel]) -> None:
    engine = make_engine(meta_models, job_timeout_s=0.05)
    late = engine.submit_adapt(AdaptJob("sinusoid", *support(3, seed=0), None, None))
    time.sleep(0.1)
    engine.start()
    try:
        with pytest.raises(DeadlineExceeded):
            late.result(timeout=10)
        assert isinstance(late.exception(), Unavailable)  # a 503 with Retry-After
        fresh = engine.submit_adapt(AdaptJob("sinusoid", *support(3, seed=0), None, None))
        assert isinstance(fresh.result(timeout=10), Adapted)  # the engine carries on
        assert engine.stats().expired == 1
    finally:
        engine.stop()


def test_bad_jobs_are_domain_errors_before_they_reach_torch(engine: Engine) -> None:
    x, y = support(3, seed=0)
    bad = [
        (AdaptJob("nope", x, y, None, None), "meta_model"),
        (AdaptJob("sinusoid", [], [], None, None), "support.inputs"),
        (AdaptJob("sinusoid", [[1.0, 2.0]] * 3, y, None, None), "support.inputs"),
        (AdaptJob("sinusoid", [[1.0], [2.0, 3.0]], y[:2], None, None), "support.inputs"),
        (AdaptJob("sinusoid", [[float("nan")]] * 3, y, None, None), "support.inputs"),
        (AdaptJob("sinusoid", x, y[:2], None, None), "support.targets"),
        (AdaptJob("sinusoid", x, [float("inf")] * 3, None, None), "support.targets"),
        (AdaptJob("sinusoid", x, y, -1, None), "inner_steps"),
        (AdaptJob("sinusoid", x, y, None, float("nan")), "inner_lr"),
    ]
    for job, field in bad:
        with pytest.raises(InvalidInput, match=field):
            engine.submit_adapt(job)
    with pytest.raises(InvalidInput, match="inputs"):
        engine.submit_predict("sinusoid", ("t", "c", 1), lambda: b"", [[1.0, 2.0]])


def test_stored_params_of_another_shape_are_refused(
    engine: Engine, meta_models: dict[str, MetaModel]
) -> None:
    wrong = to_bytes(meta_models["classes"].params)
    with pytest.raises(ValueError, match="do not fit"):
        engine.submit_predict("sinusoid", ("t", "c", 1), lambda: wrong, [[0.0]])
    assert engine.stats().queued == 0
    blob = engine.submit_adapt(AdaptJob("sinusoid", *support(5, seed=1), 5, 0.05)).result().params
    assert engine.submit_predict("sinusoid", ("t", "c", 1), lambda: blob, [[0.0]]).result()


def test_a_failing_job_does_not_fail_its_batch(
    meta_models: dict[str, MetaModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(meta_models)
    runner = engine.runners["sinusoid"]
    real = runner.adapt

    def fragile(works: list[AdaptWork]) -> list[Adapted]:
        if any(w.steps == 13 for w in works):
            raise RuntimeError("boom")
        return real(works)

    monkeypatch.setattr(runner, "adapt", fragile)
    jobs = [AdaptJob("sinusoid", *support(3, seed=i), 13 if i == 2 else 2, 0.01) for i in range(4)]
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
        engine.submit_adapt(AdaptJob("sinusoid", *support(3, seed=i), 2, 0.01)) for i in range(3)
    ]
    engine.start()
    engine.stop()
    assert all(isinstance(f.result(timeout=0), Adapted) for f in queued)
    with pytest.raises(Unavailable):
        engine.submit_adapt(AdaptJob("sinusoid", *support(3, seed=0), 2, 0.01))
    never = make_engine(meta_models)
    orphan = never.submit_adapt(AdaptJob("sinusoid", *support(3, seed=0), 2, 0.01))
    never.stop()  # never started: queued jobs fail instead of hanging
    assert isinstance(orphan.exception(timeout=0), Unavailable)


def test_cache_evicts_by_bytes(meta_models: dict[str, MetaModel]) -> None:
    one = nbytes(meta_models["sinusoid"].params)
    engine = make_engine(meta_models, cache_bytes=2 * one)
    engine.start()
    try:
        blob = engine.submit_adapt(AdaptJob("sinusoid", *support(3, seed=0), 1, 0.01)).result()
        for i in range(3):
            engine.submit_predict(
                "sinusoid", ("t", f"c{i}", 1), lambda: blob.params, [[0.0]]
            ).result()
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
