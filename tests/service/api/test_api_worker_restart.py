"""The engine's worker thread dies under the API: the request it was running gets a 503 with
Retry-After and stores nothing; the restarted worker serves the next ones; stats count it."""

from __future__ import annotations

from typing import Any

from service.engine import Engine
from service.engine.batcher import Job
from tests.service.api.test_api_engine import post_adapt, stats


def test_a_request_in_flight_when_the_worker_dies_gets_503_and_the_next_succeeds(
    make_api: Any,
) -> None:
    api = make_api()
    engine: Engine = api.app.state.runtime.engine
    worker = engine.worker
    run_batch, calls = worker._run_batch, 0

    def dying(batch: list[Job]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected: the device worker's loop failed")
        run_batch(batch)

    worker._run_batch = dying  # type: ignore[method-assign]
    failed = post_adapt(api, "alice")
    assert failed.status_code == 503, failed.text
    assert int(failed.headers["Retry-After"]) >= 1
    assert failed.json()["error"]["type"] == "unavailable"
    assert api.get("/v1/clients/alice").status_code == 404  # nothing stored
    created = post_adapt(api, "alice")
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 1
    predicted = api.post("/v1/clients/alice/predictions", json={"inputs": [[0.5]]})
    assert predicted.status_code == 200, predicted.text
    assert stats(api)["worker_restarts"] == 1
