"""The batched engine behind the API: backpressure (503 + Retry-After), deadlines, the
stats route, and the params cache primed by adaptations."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from anyio import to_thread
from fastapi.testclient import TestClient

from service.engine import Engine
from tests.service.sgd_reference import Reference

XS = [[-4.0], [-2.5], [-1.0], [0.0], [1.5], [3.0]]
YS = [0.7, -0.5, -1.6, -0.9, 1.2, 0.3]
BODY = {"meta_model": "sinusoid", "support": {"inputs": XS, "targets": YS}}


def post_adapt(api: TestClient, client_id: str, body: dict[str, Any] = BODY) -> httpx.Response:
    return api.post(f"/v1/clients/{client_id}/adaptations", json=body)


def stats(api: TestClient) -> dict[str, Any]:
    response = api.get("/v1/engine/stats")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@contextmanager
def blocked_worker(engine: Engine) -> Iterator[tuple[threading.Event, threading.Event]]:
    """The device worker blocks inside its next sinusoid adaptation until ``release``
    is set; ``started`` is set once it is blocked there."""
    runner = next(r for r in engine.runners.values() if r.name == "sinusoid")
    original = runner.adapt
    started, release = threading.Event(), threading.Event()

    def adapt(works: Any) -> Any:
        started.set()
        assert release.wait(30)
        return original(works)

    runner.adapt = adapt  # type: ignore[method-assign]
    try:
        yield started, release
    finally:
        release.set()
        runner.adapt = original  # type: ignore[method-assign]


def test_a_full_queue_answers_503_at_once_with_retry_after(make_api: Any) -> None:
    api = make_api(queue_size=1)
    engine: Engine = api.app.state.runtime.engine  # type: ignore[attr-defined]
    with ThreadPoolExecutor(2) as pool, blocked_worker(engine) as (started, release):
        running = pool.submit(post_adapt, api, "a")  # taken by the worker, which blocks
        assert started.wait(10)
        queued = pool.submit(post_adapt, api, "b")  # fills the one queue slot
        wait_for(lambda: engine.stats().queued == 1)
        refused = post_adapt(api, "c")
        assert refused.status_code == 503
        assert int(refused.headers["Retry-After"]) >= 1
        error = refused.json()["error"]
        assert error["type"] == "unavailable" and "queue is full" in error["message"]
        release.set()
        assert running.result().status_code == 201
        assert queued.result().status_code == 201
    counters = stats(api)
    assert (counters["rejected"], counters["expired"], counters["queued"]) == (1, 0, 0)
    assert api.get("/v1/clients/c").status_code == 404  # nothing stored for the refused one


def test_a_job_past_its_deadline_answers_503(make_api: Any) -> None:
    api = make_api(job_timeout_s=0.2)
    engine: Engine = api.app.state.runtime.engine  # type: ignore[attr-defined]
    with ThreadPoolExecutor(2) as pool, blocked_worker(engine) as (started, release):
        running = pool.submit(post_adapt, api, "a")
        assert started.wait(10)
        late: Future[httpx.Response] = pool.submit(post_adapt, api, "b")
        wait_for(lambda: engine.stats().queued == 1)
        time.sleep(0.3)  # past b's deadline while it waits
        release.set()
        assert running.result().status_code == 201  # started in time: it finishes
        response = late.result()
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["error"]["type"] == "unavailable"
    assert "deadline" in response.json()["error"]["message"]
    assert stats(api)["expired"] == 1
    assert api.get("/v1/clients/b").status_code == 404


def test_stats_count_batches_and_the_cache(api: TestClient) -> None:
    before = stats(api)
    assert before["device"] == "cpu" and before["threads"] == 1
    assert before["max_batch_size"] >= 1 and before["queue_size"] >= 1
    assert post_adapt(api, "alice").status_code == 201
    for _ in range(2):
        response = api.post("/v1/clients/alice/predictions", json={"inputs": [[0.5]]})
        assert response.status_code == 200
    after = stats(api)
    assert after["adapt"]["jobs"] == before["adapt"]["jobs"] + 1
    assert after["predict"]["jobs"] == before["predict"]["jobs"] + 2
    assert after["adapt"]["mean_batch"] >= 1.0
    assert after["commits"]["rows"] == before["commits"]["rows"] + 1
    cache = after["cache"]
    assert cache["hits"] - before["cache"]["hits"] == 2  # primed by the adaptation
    assert cache["misses"] == before["cache"]["misses"]
    assert 0 < cache["bytes"] <= cache["capacity_bytes"] and cache["entries"] >= 1


def test_a_primed_client_is_never_served_after_delete_or_a_new_version(
    api: TestClient, reference: Reference
) -> None:
    """A deleted client's cached params are gone, and a client re-created under the same
    id (version 1 again) is served its new params, never the old version 1."""
    assert post_adapt(api, "alice").status_code == 201
    first = api.post("/v1/clients/alice/predictions", json={"inputs": [[1.0]]}).json()
    assert api.delete("/v1/clients/alice").status_code == 204
    assert api.post("/v1/clients/alice/predictions", json={"inputs": [[1.0]]}).status_code == 404

    other = [-y for y in YS]
    body = {"meta_model": "sinusoid", "support": {"inputs": XS, "targets": other}}
    created = post_adapt(api, "alice", body).json()
    assert created["version"] == 1
    again = api.post("/v1/clients/alice/predictions", json={"inputs": [[1.0]]}).json()
    fast, _, _ = reference.adapt(XS, other, steps=5, lr=0.01)
    assert again["predictions"] == pytest.approx(reference.predict(fast, [[1.0]]), abs=1e-5)
    assert again["predictions"] != pytest.approx(first["predictions"], abs=1e-3)


def test_the_lifespan_sizes_the_thread_pool_and_freezes_the_start_up_heap(make_api: Any) -> None:
    """Every job the engine may hold gets a request thread (so the queue, not anyio's
    limiter, refuses under overload); the heap is frozen while serving, then unfrozen."""
    api = make_api(queue_size=100, max_batch_size=28)
    portal = api.portal
    assert portal is not None
    tokens = portal.call(lambda: to_thread.current_default_thread_limiter().total_tokens)
    assert tokens == 128
    assert gc.get_freeze_count() > 0
    api.__exit__(None, None, None)
    assert gc.get_freeze_count() == 0
