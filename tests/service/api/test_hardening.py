"""The hardening of issue 10, in process (SQLite and PostgreSQL): huge numbers, an
unreachable database, bodies that are not JSON, ``version`` on GET predictions, the client
id pattern, and docs pages that work offline. tests/service/api/test_hardening_server.py
covers what needs a real server: slow bodies, 500s on a pooled connection, PostgreSQL down."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from service.store import repository
from service.usecases.runtime import DATABASE_RETRY_AFTER_S
from tests.service.api.test_api_errors import ADAPT, assert_error, body

BIG = "1" + "0" * 400  # a JSON integer no float holds
HUGE = "9" * 5000  # more digits than Python's int() reads from text by default
PREDICT = "/v1/clients/alice/predictions"


def post_text(api: TestClient, url: str, text: str | bytes) -> Any:
    return api.post(url, content=text, headers={"content-type": "application/json"})


# -- 1. numbers too large for a float ---------------------------------------------------
@pytest.mark.parametrize(
    ("support", "extra", "field"),
    [
        (f'{{"inputs": [[1], [2]], "targets": [1, {BIG}]}}', "", "support.targets[1]"),
        (f'{{"inputs": [[1], [2]], "targets": [1, -{BIG}]}}', "", "support.targets[1]"),
        (f'{{"inputs": [[1], [{BIG}]], "targets": [1, 2]}}', "", "support.inputs[1][0]"),
        (f'{{"inputs": [[[[{BIG}]]]], "targets": [1]}}', "", "support.inputs[0][0][0][0]"),
        ('{"inputs": [[1]], "targets": [1]}', f', "inner_lr": {BIG}', "inner_lr"),
        ('{"inputs": [[1]], "targets": [1]}', f', "inner_steps": {BIG}', "inner_steps"),
        ('{"inputs": [[1]], "targets": [1e39]}', "", "support.targets[0]"),
    ],
)
def test_huge_numbers_in_an_adaptation_name_the_field(
    api: TestClient, support: str, extra: str, field: str
) -> None:
    text = f'{{"meta_model": "sinusoid", "support": {support}{extra}}}'
    assert_error(post_text(api, ADAPT, text), 422, "invalid_input", field)


def test_huge_numbers_in_predictions_and_readaptations(api: TestClient) -> None:
    assert api.post(ADAPT, json=body()).status_code == 201
    readapt = "/v1/clients/alice/readaptations"
    cases = [
        (post_text(api, PREDICT, f'{{"inputs": [[{BIG}]]}}'), "inputs[0][0]"),
        (post_text(api, PREDICT, f'{{"inputs": [[1]], "version": {BIG}}}'), "version"),
        (post_text(api, readapt, f'{{"version": {BIG}}}'), "version"),
        (post_text(api, readapt, f'{{"inner_lr": {BIG}}}'), "inner_lr"),
        (api.get(PREDICT, params={"x": BIG}), "x[0]"),
        (api.get(PREDICT, params={"x": HUGE}), "x[0]"),
        (api.get(PREDICT, params={"x": 1, "version": BIG}), "version"),
        (api.get(PREDICT, params={"x": 1, "version": HUGE}), "version"),
    ]
    for response, field in cases:
        assert_error(response, 422, "invalid_input", field)


def test_an_integer_with_too_many_digits_for_the_json_parser(api: TestClient) -> None:
    text = f'{{"meta_model": "sinusoid", "support": {{"inputs": [[1]], "targets": [{HUGE}]}}}}'
    assert_error(post_text(api, ADAPT, text), 422, "invalid_input", "body", "digits")


def test_a_content_length_too_long_for_int(api: TestClient) -> None:
    headers = {"content-length": HUGE, "content-type": "application/json"}
    response = api.post(ADAPT, content=json.dumps(body()).encode(), headers=headers)
    assert_error(response, 413, "too_large")


# -- 2. the database unreachable --------------------------------------------------------
def test_an_unreachable_database_is_503_with_retry_after(
    api: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert api.post(ADAPT, json=body()).status_code == 201  # alice's version 1 is cached
    assert api.post(PREDICT, json={"inputs": [[0.5]]}).status_code == 200

    def down(**_: Any) -> Any:
        raise OperationalError("SELECT ...", {}, ConnectionRefusedError("connection refused"))

    names = ("get_version", "get_predictable", "get_client", "delete_client", "append_versions")
    for name in (*names, "ping"):
        monkeypatch.setattr(repository, name, down)
    for response in (
        api.post(ADAPT, json=body()),
        api.post(PREDICT, json={"inputs": [[0.5]]}),  # cached, but its version is looked up
        api.get(PREDICT, params={"x": 0.5}),
        api.get("/v1/clients/alice"),
        api.post("/v1/clients/alice/readaptations"),
        api.delete("/v1/clients/alice"),
        api.get("/readyz"),
    ):
        message = assert_error(response, 503, "unavailable", "database")
        assert "SELECT" not in message
        if response.request.url.path != "/readyz":
            assert response.headers["retry-after"] == str(round(DATABASE_RETRY_AFTER_S))
    monkeypatch.undo()  # the database is back: no restart needed
    assert api.post(PREDICT, json={"inputs": [[0.5]]}).status_code == 200
    assert api.get("/readyz").status_code == 200


# -- 4. bodies that are not JSON: 422, like any other unreadable body ---------------------
@pytest.mark.parametrize(
    ("text", "mention"),
    [
        (b'{"meta_model": "sinusoid\xff\xfe"}', "UTF-8"),
        (b"\xff\xfe\x00", "UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested"),
        (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "nested"),
        (b'{"meta_model": }', "JSON"),
    ],
)
def test_unreadable_bodies_are_422(make_api: Any, text: bytes, mention: str) -> None:
    api = make_api(max_body_bytes=1_000_000)
    for url in (ADAPT, PREDICT, "/v1/clients/alice/readaptations"):
        assert_error(post_text(api, url, text), 422, "invalid_input", "body", mention)


def test_openapi_lists_no_400(api: TestClient) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            assert "400" not in operation["responses"], (method, path)
            if operation.get("requestBody"):
                assert "422" in operation["responses"], (method, path)


# -- 6. GET predictions honours version ------------------------------------------------
def test_get_predictions_honour_version(api: TestClient) -> None:
    assert api.post(ADAPT, json=body(inner_steps=1)).status_code == 201
    assert api.post(ADAPT, json=body(inner_steps=9)).status_code == 201
    xs = [0.25, 2.5]
    for version in (1, 2):
        got = api.get(PREDICT, params={"x": xs, "version": version})
        assert got.status_code == 200, got.text
        posted = api.post(PREDICT, json={"inputs": [[x] for x in xs], "version": version})
        assert got.json() == posted.json()
        assert got.json()["version"] == version
    assert api.get(PREDICT, params={"x": xs}).json()["version"] == 2
    assert (
        api.get(PREDICT, params={"x": xs, "version": 1}).json()
        != api.get(PREDICT, params={"x": xs, "version": 2}).json()
    )
    assert_error(api.get(PREDICT, params={"x": xs, "version": 3}), 404, "not_found", "version 3")
    for bad in ("0", "-1", "1.5", "one", str(2**31)):
        assert_error(
            api.get(PREDICT, params={"x": xs, "version": bad}), 422, "invalid_input", "version"
        )
    operation = api.get("/openapi.json").json()["paths"]["/v1/clients/{client_id}/predictions"][
        "get"
    ]
    (version,) = [p for p in operation["parameters"] if p["name"] == "version"]
    assert version["in"] == "query" and not version.get("required", False)
    assert "current version" in version["description"]


# -- 7. the client id pattern ----------------------------------------------------------
@pytest.mark.parametrize("client_id", ["%2E", "%2E%2E", ".%2E", "a%0A", "%00"])
def test_dot_segments_are_not_client_ids(api: TestClient, client_id: str) -> None:
    for response in (
        api.post(f"/v1/clients/{client_id}/adaptations", json=body()),
        api.post(f"/v1/clients/{client_id}/predictions", json={"inputs": [[0.0]]}),
        api.get(f"/v1/clients/{client_id}/predictions", params={"x": 0.0}),
        api.get(f"/v1/clients/{client_id}"),
        api.delete(f"/v1/clients/{client_id}"),
    ):
        assert_error(response, 422, "invalid_input", "client_id")


def test_ids_with_dots_that_are_not_dot_segments(api: TestClient) -> None:
    for client_id in ("...", ".a", "a.", "a..b", "_", "-", "." * 128):
        response = api.post(f"/v1/clients/{client_id}/adaptations", json=body())
        assert response.status_code == 201, (client_id, response.text)
        assert api.get(f"/v1/clients/{client_id}").json()["client_id"] == client_id


def test_openapi_documents_the_client_id_pattern(api: TestClient) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    for path, operations in paths.items():
        if "{client_id}" not in path:
            continue
        for operation in operations.values():
            (param,) = [p for p in operation["parameters"] if p["name"] == "client_id"]
            pattern = param["schema"]["pattern"]
            assert not re.match(pattern, ".") and not re.match(pattern, "..")
            assert re.match(pattern, "alice") and re.match(pattern, "...")
            assert '"." and ".."' in param["description"]


# -- 8. the docs pages work offline ----------------------------------------------------
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_local_assets(api: TestClient, page: str) -> None:
    response = api.get(page)
    assert response.status_code == 200
    html = response.text
    assert "https://" not in html and "http://" not in html and "//fonts." not in html
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    urls += re.findall(r"""(?:url|spec-url)\s*:\s*["']([^"']+)["']""", html)
    urls += re.findall(r"""spec-url=["']([^"']+)["']""", html)
    assert any(u.endswith(".js") for u in urls), urls
    for url in urls:
        assert url.startswith("/"), url
        assert api.get(url).status_code == 200, url
    if page == "/docs":
        assert '"validatorUrl": null' in html


def test_docs_assets_are_the_real_bundles(api: TestClient) -> None:
    for name, kind in [
        ("swagger-ui-bundle.js", "javascript"),
        ("swagger-ui.css", "css"),
        ("redoc.standalone.js", "javascript"),
        ("favicon.png", "image/png"),
    ]:
        response = api.get(f"/docs-assets/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"]
        assert len(response.content) > 4000
    assert_error(api.get("/docs-assets/../settings.py"), 404, "not_found")
