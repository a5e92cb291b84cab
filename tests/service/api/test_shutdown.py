"""What a replica told to stop does before it stops: /readyz answers 503 at once (a load
balancer drains it) while the requests that still arrive are served."""

from __future__ import annotations

from typing import Any

from service.app import stop
from tests.service.api.test_api_engine import post_adapt


def test_readyz_answers_503_from_the_moment_the_server_is_told_to_stop(make_api: Any) -> None:
    api = make_api()
    assert api.get("/readyz").status_code == 200
    stop(api.app)
    response = api.get("/readyz")
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["error"] == {
        "type": "unavailable",
        "message": "the server is shutting down",
        "request_id": response.headers["X-Request-ID"],
    }
    assert api.get("/healthz").status_code == 200  # alive: drained, not restarted
    assert post_adapt(api, "late").status_code == 201  # what still arrives is served
