"""Bad input gets a clear error in the one error shape, and never a 500."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

XS = [[-1.0], [0.0], [1.0]]
YS = [0.5, 0.0, -0.5]
ADAPT = "/v1/clients/alice/adaptations"


def body(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"meta_model": "sinusoid", "support": {"inputs": XS, "targets": YS}}
    return {**base, **changes}


def support(inputs: Any = XS, targets: Any = YS) -> dict[str, Any]:
    return {"inputs": inputs, "targets": targets}


def assert_error(response: Any, status: int, type_: str, *mentions: str) -> str:
    assert response.status_code == status, response.text
    # one body, rendered one way: a 413 sent before routing looked unlike the rest (issue 20)
    assert response.content == JSONResponse(response.json()).body, response.content
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(response.json()) == {"error"} and set(error) == {"type", "message", "request_id"}
    assert error["request_id"] == response.headers["x-request-id"]
    assert error["type"] == type_
    for mention in mentions:
        assert mention in error["message"], error["message"]
    message: str = error["message"]
    return message


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (body(meta_model="nope"), "meta_model"),
        (body(meta_model=3), "meta_model"),
        (body(support=support([], [])), "support.inputs"),
        (body(support=support(XS, YS[:2])), "support.targets"),
        (body(support=support([[0.0, 1.0]] * 3)), "support.inputs[0]"),
        (body(support=support([[0.0], [], [1.0]])), "support.inputs[1]"),
        (body(support=support([0.0, 1.0, 2.0])), "support.inputs[0]"),
        (body(support=support([["a"], [0.0], [1.0]])), "support.inputs[0][0]"),
        (body(support=support([["1.0"], [0.0], [1.0]])), "support.inputs[0][0]"),
        (body(support=support([[True], [0.0], [1.0]])), "support.inputs[0][0]"),
        (body(support=support(XS, [None, 0.0, 1.0])), "support.targets[0]"),
        (body(support={"inputs": XS}), "support.targets"),
        (body(inner_steps=0), "inner_steps"),
        (body(inner_steps=101), "inner_steps"),
        (body(inner_steps=2.5), "inner_steps"),
        (body(inner_steps="5"), "inner_steps"),
        (body(inner_lr=0), "inner_lr"),
        (body(inner_lr=-0.1), "inner_lr"),
        (body(inner_lr=10.5), "inner_lr"),
        (body(inner_lr="0.1"), "inner_lr"),
        (body(inner_step=5), "inner_step"),
        ({"support": support()}, "meta_model"),
    ],
)
def test_invalid_adaptations_name_the_field(api: TestClient, payload: Any, field: str) -> None:
    assert_error(api.post(ADAPT, json=payload), 422, "invalid_input", field)


@pytest.mark.parametrize(
    ("inputs", "targets", "extra", "field"),
    [
        ("[[NaN]]", "[1]", "", "inputs"),
        ("[[1]]", "[Infinity]", "", "targets"),
        ("[[-Infinity]]", "[1]", "", "inputs"),
        ("[[1e400]]", "[1]", "", "inputs"),
        ("[[1]]", "[1]", ', "inner_lr": NaN', "inner_lr"),
    ],
)
def test_nan_and_infinity_are_rejected(
    api: TestClient, inputs: str, targets: str, extra: str, field: str
) -> None:
    """Python's json module accepts NaN and Infinity (and turns 1e400 into inf)."""
    text = f'{{"meta_model": "sinusoid", "support": {{"inputs": {inputs}, "targets": {targets}}}'
    text += f"{extra}}}"
    response = api.post(ADAPT, content=text, headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_input", field, "finite")


def test_learned_rates_cannot_be_overridden(api: TestClient) -> None:
    response = api.post(ADAPT, json=body(meta_model="sinusoid-metasgd", inner_lr=0.1))
    assert_error(response, 422, "invalid_input", "inner_lr", "cannot be overridden")


@pytest.mark.parametrize("client_id", ["x" * 129, "a%20b", "caf%C3%A9", "a:b", "a%2Fb", "~x"])
def test_client_ids_outside_the_pattern(api: TestClient, client_id: str) -> None:
    for response in (
        api.post(f"/v1/clients/{client_id}/adaptations", json=body()),
        api.get(f"/v1/clients/{client_id}"),
        api.delete(f"/v1/clients/{client_id}"),
    ):
        assert response.status_code in (404, 422), response.text
        if response.status_code == 422:
            assert_error(response, 422, "invalid_input", "client_id")


def test_client_ids_inside_the_pattern(api: TestClient) -> None:
    for client_id in ("x" * 128, "A-b_c.9", "1"):
        assert api.post(f"/v1/clients/{client_id}/adaptations", json=body()).status_code == 201


def test_prediction_inputs_are_checked(api: TestClient) -> None:
    assert api.post(ADAPT, json=body()).status_code == 201
    url = "/v1/clients/alice/predictions"
    assert_error(api.post(url, json={"inputs": []}), 422, "invalid_input", "inputs")
    assert_error(api.post(url, json={"inputs": [[1.0, 2.0]]}), 422, "invalid_input", "inputs[0]")
    assert_error(api.post(url, json={"inputs": [["x"]]}), 422, "invalid_input", "inputs[0][0]")
    assert_error(
        api.post(url, json={"inputs": [[0]], "version": 0}), 422, "invalid_input", "version"
    )
    assert_error(api.post(url, json={"inputs": [[1e300]]}), 422, "invalid_input", "inputs")
    assert_error(api.get(url), 422, "invalid_input", "x")
    assert_error(api.get(url, params={"x": "nan"}), 422, "invalid_input", "x[0]")
    assert_error(api.get(url, params={"x": ["1", "inf"]}), 422, "invalid_input", "x[1]")
    assert_error(api.get(url, params={"x": "one"}), 422, "invalid_input", "x[0]")


def test_limits_give_413(make_api: Any) -> None:
    api = make_api(max_support=3, max_predict_batch=2, max_body_bytes=2048)
    too_many = body(support=support([[0.0]] * 4, [0.0] * 4))
    assert_error(api.post(ADAPT, json=too_many), 413, "too_large", "support")
    assert api.post(ADAPT, json=body()).status_code == 201
    batch = {"inputs": [[0.0]] * 3}
    assert_error(api.post("/v1/clients/alice/predictions", json=batch), 413, "too_large", "inputs")
    query = {"x": [0.0, 1.0, 2.0]}
    assert_error(api.get("/v1/clients/alice/predictions", params=query), 413, "too_large", "x")
    big = json.dumps(body(padding="x" * 3000))
    assert_error(api.post(ADAPT, content=big), 413, "too_large", "2048 bytes")

    def chunks() -> Any:  # no Content-Length: the limit counts what arrives
        yield big[:1000].encode()
        yield big[1000:].encode()

    assert_error(api.post(ADAPT, content=chunks()), 413, "too_large")
    lying = {"content-length": "10", "content-type": "application/json"}
    response = api.post(ADAPT, content=json.dumps(body()).encode(), headers=lying)
    assert response.status_code < 500


def test_a_body_that_is_not_declared_json_is_explained(api: TestClient) -> None:
    form = {"content-type": "application/x-www-form-urlencoded"}  # curl -d's default
    response = api.post(ADAPT, content=json.dumps(body()), headers=form)
    assert_error(response, 422, "invalid_input", "Content-Type: application/json")


def test_unknown_routes_and_methods_use_the_error_shape(api: TestClient) -> None:
    assert_error(api.get("/v2/nothing"), 404, "not_found", "GET /v2/nothing")
    assert_error(api.put("/v1/clients/alice"), 405, "method_not_allowed")


@pytest.mark.parametrize(
    ("method", "path"),
    [("DELETE", "/v1/keys/"), ("GET", "/v1/clients/alice/"), ("POST", ADAPT + "/")],
)
def test_a_trailing_slash_is_a_404_not_a_redirect(api: TestClient, method: str, path: str) -> None:
    """Issue 20: `DELETE /v1/keys/` (a key id left empty) answered a 307 to `/v1/keys`,
    which a client following it met with a 405. Paths have one spelling, without it."""
    response = api.request(method, path, follow_redirects=False)
    message = assert_error(response, 404, "not_found", f"{method} {path}")
    assert "no trailing slash" in message


def garbage(rng: random.Random) -> list[tuple[str, bytes]]:
    """(content type, body) pairs that no client should send."""
    texts = [
        b"",
        b"{",
        b"null",
        b"[]",
        b'"text"',
        b"123",
        b"\xff\xfe\x00",
        b"[" * 5000 + b"]" * 5000,
        b'{"meta_model": {"$ne": 1}}',
        b'{"meta_model": "sinusoid", "support": {"inputs": [[1]], "targets": [1e999999]}}',
        b'{"meta_model": "sinusoid", "support": {"inputs": [['
        + b"9" * 5000
        + b']], "targets": [1]}}',
        b'{"meta_model": "sinusoid", "support": {"inputs": [[1]], "targets": [1]}, "inner_steps": '
        + b"9" * 400
        + b"}",
        b'{"meta_model": "sinusoid", "support": {"inputs": [[[1]]], "targets": [[1]]}}',
        b'{"meta_model": "sinusoid", "support": {"inputs": "abc", "targets": {}}}',
        b'{"inputs": [[1]], "version": 99999999999999999999999}',
        b'{"inputs": [[1]], "version": -1}',
        b'{"inputs": [[' + b",".join([b"1"] * 2000) + b"]]}",
    ]
    texts += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(20)]
    return [(kind, text) for text in texts for kind in ("application/json", "text/plain")]


def test_garbage_never_yields_a_500(api: TestClient) -> None:
    assert api.post(ADAPT, json=body()).status_code == 201
    rng = random.Random(0)
    urls = [ADAPT, "/v1/clients/alice/predictions", "/v1/clients/bob/predictions"]
    for kind, text in garbage(rng):
        for url in urls:
            response = api.post(url, content=text, headers={"content-type": kind})
            assert response.status_code in (400, 404, 413, 422), (url, text[:80], response.text)
            assert set(response.json()["error"]) == {"type", "message", "request_id"}
