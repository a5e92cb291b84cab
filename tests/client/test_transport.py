"""The client against stub transports: retries (429/503 honouring Retry-After, lost
connections for GET and DELETE only), the error mapping, headers and the wire shape. No
test sleeps: the clients' ``sleep`` is injected."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import pytest
from fastadapt_client import (
    APIError,
    AsyncClient,
    Client,
    Conflict,
    FastAdaptError,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    TransportError,
    Unauthorized,
    Unavailable,
)

URL = "http://fastadapt.test"
HISTORY = {
    "client_id": "alice",
    "current_version": 1,
    "created_at": "2024-05-01T12:00:00Z",
    "versions": [],
}
ADAPTED = {
    "client_id": "alice",
    "version": 1,
    "version_id": "0123456789abcdef0123456789abcdef",
    "meta_model": "sinusoid",
    "meta_model_version": "abc",
    "support_size": 1,
    "inner_steps": 5,
    "inner_lr": 0.01,
    "support_loss_before": 1.0,
    "support_loss_after": 0.5,
    "adapt_ms": 3.0,
    "labels": None,
    "origin": "adapt",
    "source_version": None,
    "warnings": [],
}
Reply = httpx.Response | Exception


class Stub:
    """Answers the given replies in order (an exception is raised as the transport's) and
    records the requests."""

    def __init__(self, replies: Iterable[Reply]) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def client(self, **options: Any) -> tuple[Client, list[float]]:
        waits: list[float] = []
        client = Client(URL, transport=httpx.MockTransport(self), sleep=waits.append, **options)
        return client, waits

    def async_client(self, **options: Any) -> tuple[AsyncClient, list[float]]:
        waits: list[float] = []

        async def sleep(seconds: float) -> None:
            waits.append(seconds)

        transport = httpx.MockTransport(self)
        return AsyncClient(URL, transport=transport, sleep=sleep, **options), waits


def error(status: int, type_: str = "x", headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"type": type_, "message": f"status {status}", "request_id": "req-1"}}
    return httpx.Response(status, json=body, headers=headers)


def history(api: Client) -> Any:
    return api.history("alice")


def adapt(api: Client) -> Any:
    return api.adapt("alice", meta_model="sinusoid", inputs=[[0.0]], targets=[0.0])


# -- retries ---------------------------------------------------------------------------------
def test_429_waits_as_long_as_retry_after_says() -> None:
    stub = Stub(
        [error(429, "rate_limited", {"Retry-After": "3"}), httpx.Response(200, json=HISTORY)]
    )
    api, waits = stub.client()
    assert history(api).client_id == "alice"
    assert waits == [3.0] and len(stub.requests) == 2


def test_a_post_is_retried_after_429_and_503_the_server_did_not_do_it() -> None:
    replies = [
        error(429, headers={"Retry-After": "1"}),
        error(503),
        httpx.Response(201, json=ADAPTED),
    ]
    stub = Stub(replies)
    api, waits = stub.client()
    assert adapt(api).version == 1
    assert waits == [1.0, 1.0]  # Retry-After, then the backoff of a second retry
    assert [r.content for r in stub.requests] == [stub.requests[0].content] * 3


def test_503_without_retry_after_backs_off_then_gives_up_after_max_retries() -> None:
    stub = Stub([error(503, "unavailable")] * 4)
    api, waits = stub.client(max_retries=3)
    with pytest.raises(Unavailable) as caught:
        history(api)
    assert waits == [0.5, 1.0, 2.0] and len(stub.requests) == 4
    assert (caught.value.status, caught.value.type, caught.value.request_id) == (
        503,
        "unavailable",
        "req-1",
    )


def test_a_retry_after_past_the_total_wait_is_not_waited_for() -> None:
    stub = Stub([error(429, headers={"Retry-After": "120"})])
    api, waits = stub.client(max_retry_wait=30)
    with pytest.raises(RateLimited) as caught:
        history(api)
    assert waits == [] and caught.value.retry_after == 120.0


def test_the_waits_of_one_call_add_up_to_at_most_max_retry_wait() -> None:
    stub = Stub([error(503, headers={"Retry-After": "4"})] * 3)
    api, waits = stub.client(max_retries=5, max_retry_wait=10)
    with pytest.raises(Unavailable):
        history(api)
    assert waits == [4.0, 4.0]  # a third 4 s would make 12 s


def test_retry_after_as_an_http_date() -> None:
    when = email.utils.formatdate(time.time() + 5, usegmt=True)
    stub = Stub([error(503, headers={"Retry-After": when}), httpx.Response(200, json=HISTORY)])
    api, waits = stub.client()
    history(api)
    assert len(waits) == 1 and 3.0 <= waits[0] <= 5.0


def test_max_retries_zero_turns_retrying_off() -> None:
    stub = Stub([error(429, headers={"Retry-After": "1"})])
    api, waits = stub.client(max_retries=0)
    with pytest.raises(RateLimited):
        history(api)
    assert waits == []


@pytest.mark.parametrize(
    "lost",
    [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("gone")],
)
def test_a_get_and_a_delete_are_retried_after_a_lost_connection(lost: Exception) -> None:
    stub = Stub([lost, httpx.Response(200, json=HISTORY), lost, httpx.Response(204)])
    api, waits = stub.client()
    assert history(api).client_id == "alice"
    api.delete("alice")
    assert waits == [0.5, 0.5] and [r.method for r in stub.requests] == ["GET"] * 2 + ["DELETE"] * 2


@pytest.mark.parametrize("lost", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow")])
def test_a_post_without_an_idempotency_key_is_never_retried_after_a_lost_connection(
    lost: Exception,
) -> None:
    stub = Stub([lost, httpx.Response(200, json={})])
    api, waits = stub.client()
    with pytest.raises(TransportError) as caught:
        api.predict("alice", inputs=[[0.0]])
    assert caught.value.__cause__ is lost and caught.value.status is None
    assert waits == [] and len(stub.requests) == 1
    assert "Idempotency-Key" not in stub.requests[0].headers


@pytest.mark.parametrize("lost", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow")])
def test_adapt_and_readapt_send_one_key_per_call_and_retry_with_it(lost: Exception) -> None:
    stub = Stub(
        [
            lost,
            error(409, "conflict", {"Retry-After": "1"}),  # the first try is still running
            httpx.Response(201, json=ADAPTED, headers={"Idempotent-Replayed": "true"}),
            httpx.Response(201, json=ADAPTED),  # a second call
            lost,
            httpx.Response(201, json=ADAPTED),  # readapt, retried
        ]
    )
    api, waits = stub.client(max_retries=3)
    assert adapt(api).version == 1
    adapt(api)
    api.readapt("alice", idempotency_key="mine")
    keys = [r.headers["Idempotency-Key"] for r in stub.requests]
    assert keys[0] == keys[1] == keys[2] and len(keys[0]) == 32  # one logical call, one key
    assert keys[3] != keys[0]  # a new call, a new key
    assert keys[4] == keys[5] == "mine"
    assert waits == [0.5, 1.0, 0.5]


def test_a_409_is_final_without_retry_after_or_without_a_key() -> None:
    stub = Stub([error(409, "conflict"), error(409, "conflict", {"Retry-After": "1"})])
    api, waits = stub.client()
    with pytest.raises(Conflict):
        adapt(api)  # a stale meta-model, say: retrying would not help
    with pytest.raises(Conflict):
        api.predict("alice", inputs=[[0.0]])  # not keyed
    assert waits == [] and len(stub.requests) == 2


def test_the_async_client_retries_alike() -> None:
    async def scenario() -> None:
        stub = Stub(
            [
                error(429, headers={"Retry-After": "2"}),
                httpx.Response(200, json=HISTORY),
                httpx.ConnectError("refused"),
                httpx.Response(200, json=HISTORY),
                httpx.ConnectError("refused"),
                httpx.Response(201, json=ADAPTED),
                httpx.ConnectError("refused"),
            ]
        )
        api, waits = stub.async_client()
        async with api:
            assert (await api.history("alice")).current_version == 1
            assert (await api.history("alice")).current_version == 1
            adapted = await api.adapt("alice", meta_model="sinusoid", inputs=[[0.0]], targets=[0.0])
            assert adapted.version_id == ADAPTED["version_id"]
            with pytest.raises(TransportError):
                await api.predict("alice", inputs=[[0.0]])
        assert waits == [2.0, 0.5, 0.5] and len(stub.requests) == 7
        first, retried = stub.requests[4:6]
        assert first.headers["Idempotency-Key"] == retried.headers["Idempotency-Key"]

    asyncio.run(scenario())


# -- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (401, Unauthorized),
        (403, Forbidden),
        (404, NotFound),
        (409, Conflict),
        (413, PayloadTooLarge),
        (422, InvalidInput),
        (429, RateLimited),
        (503, Unavailable),
        (500, APIError),
        (400, APIError),
    ],
)
def test_each_status_has_its_exception(status: int, cls: type[APIError]) -> None:
    stub = Stub([error(status, "some_type")])
    api, _ = stub.client(max_retries=0)
    with pytest.raises(cls) as caught:
        history(api)
    e = caught.value
    assert type(e) is cls and isinstance(e, FastAdaptError)
    assert (e.status, e.type, e.message, e.request_id) == (
        status,
        "some_type",
        f"status {status}",
        "req-1",
    )
    assert str(e) == f"{status} some_type: status {status} (request id req-1)"


def test_the_request_id_header_stands_in_for_one_missing_from_the_body() -> None:
    body = {"error": {"type": "not_found", "message": "client 'x' not found"}}
    stub = Stub([httpx.Response(404, json=body, headers={"X-Request-ID": "from-header"})])
    with pytest.raises(NotFound) as caught:
        history(stub.client()[0])
    assert caught.value.request_id == "from-header"
    stub = Stub([httpx.Response(404, json=body)])
    with pytest.raises(NotFound) as caught:
        history(stub.client()[0])
    assert caught.value.request_id is None


def test_a_body_not_in_the_servers_shape_is_not_echoed() -> None:
    page = b"<html>secret proxy page</html>"
    stub = Stub([httpx.Response(502, content=page, headers={"Content-Type": "text/html"})])
    with pytest.raises(APIError) as caught:
        history(stub.client()[0])
    assert (caught.value.status, caught.value.type) == (502, "http_error")
    assert caught.value.message == "HTTP 502 Bad Gateway" and "secret" not in str(caught.value)


def test_a_success_the_client_cannot_read_is_a_fastadapt_error() -> None:
    stub = Stub([httpx.Response(200, json={"unexpected": True})])
    with pytest.raises(FastAdaptError) as caught:
        history(stub.client()[0])
    assert (caught.value.status, caught.value.type) == (200, "invalid_response")


# -- headers and the wire --------------------------------------------------------------------
def test_the_api_key_is_sent_as_a_bearer_token_and_never_shown() -> None:
    stub = Stub([httpx.Response(200, json=HISTORY)] * 2)
    api, _ = stub.client(api_key="s3cret-key")
    history(api)
    assert stub.requests[0].headers["Authorization"] == "Bearer s3cret-key"
    assert "s3cret" not in repr(api)
    keyless, _ = stub.client()
    history(keyless)
    assert "Authorization" not in stub.requests[1].headers


def test_an_injected_http_client_is_used_and_left_open() -> None:
    stub = Stub([httpx.Response(200, json=HISTORY)])
    with httpx.Client(transport=httpx.MockTransport(stub)) as http:
        with Client(URL + "/prefix/", http_client=http, api_key="k") as api:
            history(api)
        assert not http.is_closed
    assert str(stub.requests[0].url) == URL + "/prefix/v1/clients/alice"
    assert stub.requests[0].headers["Authorization"] == "Bearer k"


def record(call: Callable[[Client], Any], reply: httpx.Response) -> httpx.Request:
    stub = Stub([reply])
    call(stub.client()[0])
    return stub.requests[0]


def test_what_each_method_sends(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"\x89PNG one")
    sent = record(
        lambda api: api.adapt(
            "a b/c",
            meta_model="omniglot",
            images=[image, str(image), b"\x89PNG two"],
            targets=["x", 3, "x"],
            inner_steps=4,
        ),
        httpx.Response(201, json=ADAPTED),
    )
    assert (sent.method, sent.url.raw_path) == ("POST", b"/v1/clients/a%20b%2Fc/adaptations")
    one, two = (base64.b64encode(b).decode() for b in (b"\x89PNG one", b"\x89PNG two"))
    assert json.loads(sent.content) == {
        "meta_model": "omniglot",
        "support": {"inputs": [one, one, two], "targets": ["x", 3, "x"]},
        "inner_steps": 4,
    }

    prediction = {"client_id": "alice", "version": 2, "version_id": "v", "predictions": [0.5]}
    sent = record(
        lambda api: api.predict("alice", inputs=np.array([[1.0], [2.0]]), version=2),
        httpx.Response(200, json=prediction),
    )
    assert json.loads(sent.content) == {"inputs": [[1.0], [2.0]], "version": 2}

    sent = record(lambda api: api.readapt("alice"), httpx.Response(201, json=ADAPTED))
    assert (sent.url.path, json.loads(sent.content)) == ("/v1/clients/alice/readaptations", {})
    sent = record(
        lambda api: api.readapt("alice", version=1, inner_steps=3, inner_lr=0.1),
        httpx.Response(201, json=ADAPTED),
    )
    assert json.loads(sent.content) == {"version": 1, "inner_steps": 3, "inner_lr": 0.1}
    sent = record(lambda api: api.delete("alice"), httpx.Response(204))
    assert (sent.method, sent.url.path) == ("DELETE", "/v1/clients/alice")


def test_bad_arguments_fail_before_sending() -> None:
    stub = Stub([])
    api, _ = stub.client()
    with pytest.raises(ValueError, match="exactly one of"):
        api.predict("alice", inputs=[[0.0]], images=[b"png"])
    with pytest.raises(ValueError, match="exactly one of"):
        api.predict("alice")
    with pytest.raises(ValueError):
        api.history("..")
    with pytest.raises(ValueError):  # NaN is no JSON number
        api.predict("alice", inputs=[[float("nan")]])
    with pytest.raises(TypeError):
        api.predict("alice", images=cast(Any, b"one image, not a list"))
    with pytest.raises(ValueError):
        Client("ftp://example.com")
    assert stub.requests == []
