"""Hostile payloads, each answered with the right 4xx and nothing stored (issue 12).

A real ``fastadapt serve`` process where the transport matters (raw sockets, so that no
client library tidies the request): 100 MB bodies sent plain, chunked and with a lying
Content-Length; a body that trickles past the body timeout; client ids with path and
unicode tricks. In process (SQLite and PostgreSQL): numbers past float range spelled every
way, deep nesting inside a valid request, and image bombs for the shipped omniglot
meta-model. tests/service/api/test_hardening*.py cover the first cases of each kind.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.evaluate import ARTIFACTS
from tests.service.api.test_api_errors import assert_error
from tests.service.api.test_hardening_server import closed_by_server, environment, read_response
from tests.service.api.test_server import server
from tests.service.conftest import ApiFactory

MB = 1 << 20
HUNDRED_MB = 100 * MB
SUPPORT = {"inputs": [[-2.0], [0.5], [3.0]], "targets": [-1.2, 0.9, 0.4]}
BODY_TIMEOUT_S = 1.5
SOCKET_TIMEOUT_S = 30.0  # a guard against a hang, not a measurement


# -- a real server ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """One server for the module (SQLite, keys optional on loopback, a short body timeout)."""
    tmp = tmp_path_factory.mktemp("hostile")
    env = environment(models_dir, tmp, body_timeout_s=str(BODY_TIMEOUT_S))
    with server(env, tmp / "server.log") as client:
        yield client
    log = (tmp / "server.log").read_text()
    assert "Traceback" not in log, log[-4000:]  # no request ended in an unhandled error


def port_of(client: httpx.Client) -> int:
    port = client.base_url.port
    assert port is not None
    return port


def head(method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", *headers, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def flood(sock: socket.socket, pieces: Iterator[bytes]) -> threading.Thread:
    """Send ``pieces`` from a thread until they end or the server closes the connection."""

    def send() -> None:
        try:
            for piece in pieces:
                sock.sendall(piece)
        except OSError:  # the server answered and closed: what the tests expect
            pass

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def filler(total: int, piece: int = MB) -> Iterator[bytes]:
    block = b" " * piece
    for _ in range(total // piece):
        yield block


def chunked(total: int, piece: int = MB) -> Iterator[bytes]:
    for block in filler(total, piece):
        yield b"%x\r\n%s\r\n" % (len(block), block)
    yield b"0\r\n\r\n"


def nothing_stored(client: httpx.Client, *client_ids: str) -> None:
    assert client.get("/healthz").status_code == 200  # the server is fine
    for client_id in client_ids:
        assert client.get(f"/v1/clients/{client_id}").status_code == 404, client_id
    assert client.get("/v1/clients").json()["clients"] == []


ADAPT_BULK = "/v1/clients/bulk/adaptations"
JSON = "Content-Type: application/json"


@pytest.mark.parametrize("way", ["plain", "chunked", "declared-only"])
def test_a_100_mb_body_gets_413_and_the_connection_closed(live: httpx.Client, way: str) -> None:
    """Plain: a Content-Length of 100 MB and the bytes behind it; chunked: no length, 100 MB
    of chunks; declared-only: a Content-Length of 100 MB and a few bytes (it lies)."""
    with socket.create_connection(("127.0.0.1", port_of(live)), timeout=SOCKET_TIMEOUT_S) as sock:
        if way == "chunked":
            sock.sendall(head("POST", ADAPT_BULK, JSON, "Transfer-Encoding: chunked"))
            sender = flood(sock, chunked(HUNDRED_MB))
        else:
            sock.sendall(head("POST", ADAPT_BULK, JSON, f"Content-Length: {HUNDRED_MB}"))
            sender = flood(sock, filler(HUNDRED_MB) if way == "plain" else iter([b"{" * 100]))
        status, headers, body = read_response(sock)
        assert status == 413, body
        assert headers["connection"] == "close"
        assert json.loads(body)["error"]["type"] == "too_large"
        assert closed_by_server(sock)
        sender.join(timeout=SOCKET_TIMEOUT_S)
    nothing_stored(live, "bulk")


def test_a_content_length_that_lies_short_never_smuggles_a_request(live: httpx.Client) -> None:
    """Content-Length: 100, then 100 MB and a valid adaptation: the first 100 bytes are the
    body (not JSON: 422); what follows is no request (400 and closed), so the adaptation
    hidden in it is never run, and nothing is stored."""
    smuggled = json.dumps({"meta_model": "sinusoid", "support": SUPPORT}).encode()
    inner = head(
        "POST", "/v1/clients/smuggled/adaptations", JSON, f"Content-Length: {len(smuggled)}"
    )
    with socket.create_connection(("127.0.0.1", port_of(live)), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(head("POST", ADAPT_BULK, JSON, "Content-Length: 100") + b"[" * 100)
        sender = flood(sock, iter([b"\x00garbage " * 1000, *filler(HUNDRED_MB), inner, smuggled]))
        status, headers, body = read_response(sock)
        length = int(headers["content-length"])  # what follows may have come with it
        body, received = body[:length], body[length:]
        # 422 for the declared body (not JSON); or, when the bytes behind it arrive in the
        # same read, the server's parser refuses the whole stream first (400)
        assert status in (400, 422), body
        if status == 422:
            assert json.loads(body)["error"]["type"] == "invalid_input"
        while True:  # the rest is not HTTP: the server answers 400 at most, and closes
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        assert b" 201 " not in received and (not received or b" 400 " in received), received
        sender.join(timeout=SOCKET_TIMEOUT_S)
    nothing_stored(live, "bulk", "smuggled")


def test_a_body_that_trickles_past_the_timeout_gets_408(live: httpx.Client) -> None:
    """Bytes keep arriving, a few every 0.1 s, but the whole body would take minutes."""
    body = json.dumps({"meta_model": "sinusoid", "support": SUPPORT}).encode() + b" " * 4000
    with socket.create_connection(("127.0.0.1", port_of(live)), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(
            head("POST", "/v1/clients/slow/adaptations", JSON, f"Content-Length: {len(body)}")
        )

        def trickle() -> Iterator[bytes]:
            for i in range(0, len(body), 4):
                time.sleep(0.1)
                yield body[i : i + 4]

        sender = flood(sock, trickle())
        status, headers, answer = read_response(sock)
        assert status == 408, answer
        assert headers["connection"] == "close"
        assert json.loads(answer)["error"]["type"] == "timeout"
        assert closed_by_server(sock)
        sender.join(timeout=SOCKET_TIMEOUT_S)
    nothing_stored(live, "slow")


# client ids as they appear on the wire (percent-encoded where a URL must be)
TRICKY_IDS = {
    "a%2Fb": 404,  # an encoded slash: a path of more segments, no route
    "..": 422,  # a dot segment, sent raw: the server does not resolve it
    "%2E%2E": 422,
    "a%00b": 422,  # NUL
    "%E2%80%AEalice": 422,  # right-to-left override
    "alice%E2%80%8B": 422,  # zero-width space
    "%D0%B0lice": 422,  # Cyrillic a, a homoglyph of "alice"
    "%EF%BD%81lice": 422,  # fullwidth a
    "alice%20": 422,
    "alice%0D%0AX-Injected:%201": 422,  # header injection
    "a" * 1000: 422,
    "a" * 129: 422,
    "alice;drop": 422,
    "%252E%252E": 422,  # double-encoded: the id "%2E%2E", not ".."
}


def raw_request(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(
            head(method, path, JSON, f"Content-Length: {len(body)}", "Connection: close") + body
        )
        status, _, answer = read_response(sock)
        return status, answer


def test_tricky_client_ids_are_refused_and_never_stored(live: httpx.Client) -> None:
    port = port_of(live)
    adapt = json.dumps({"meta_model": "sinusoid", "support": SUPPORT}).encode()
    predict = json.dumps({"inputs": [[0.5]]}).encode()
    for client_id, expected in TRICKY_IDS.items():
        for method, suffix, body in (
            ("POST", "/adaptations", adapt),
            ("POST", "/predictions", predict),
            ("GET", "", b""),
            ("GET", "/versions", b""),
            ("DELETE", "", b""),
        ):
            status, answer = raw_request(port, method, f"/v1/clients/{client_id}{suffix}", body)
            assert status == expected, (client_id, method, suffix, answer)
            error = json.loads(answer)["error"]
            if expected == 422:
                assert "client_id" in error["message"], (client_id, error)
    # the same requests for the ids these resemble: stored under nothing but their own id
    nothing_stored(live, "alice", "a", "b", "ab", "a_b", "alicedrop")
    assert raw_request(port, "POST", "/v1/clients/a.b/adaptations", adapt)[0] == 201
    listed = live.get("/v1/clients").json()["clients"]
    assert [c["client_id"] for c in listed] == ["a.b"]
    assert live.delete("/v1/clients/a.b").status_code == 204


# -- numbers past float range, every spelling (in process) --------------------------------
HUGE_SPELLINGS = [
    "1e400",
    "-1e400",
    "1E+309",
    "1e+400",
    "1.7976931348623159e308",  # rounds past the largest double
    "NaN",
    "Infinity",
    "-Infinity",
    "9" * 5000,
    "-" + "9" * 5000,
]


def spliced(template: str, number: str) -> str:
    return template.replace("@", number)


ADAPT_TEMPLATES = {
    "support.inputs[1][0]": (
        '{"meta_model": "sinusoid", "support": {"inputs": [[1], [@]], "targets": [1, 2]}}'
    ),
    "support.targets[0]": (
        '{"meta_model": "sinusoid", "support": {"inputs": [[1]], "targets": [@]}}'
    ),
    "inner_lr": (
        '{"meta_model": "sinusoid", "support": {"inputs": [[1]], "targets": [1]}, "inner_lr": @}'
    ),
    "inner_steps": (
        '{"meta_model": "sinusoid", "support": {"inputs": [[1]], "targets": [1]}, "inner_steps": @}'
    ),
}
CLIENT_TEMPLATES = {  # (url, template) on a client that exists
    "inputs[0][0]": ("/predictions", '{"inputs": [[@]]}'),
    "version": ("/predictions", '{"inputs": [[1]], "version": @}'),
    "version ": ("/readaptations", '{"version": @}'),
    "inner_lr": ("/readaptations", '{"inner_lr": @}'),
    "inputs[0][0] ": ("/examples", '{"inputs": [[@]], "targets": [1]}'),
    "targets[0]": ("/examples", '{"inputs": [[1]], "targets": [@]}'),
    "version  ": ("/rollback", '{"version": @}'),
}


def post_text(api: TestClient, url: str, text: str) -> Any:
    return api.post(url, content=text, headers={"content-type": "application/json"})


def assert_refused(response: Any, field: str, number: str) -> None:
    """422 naming the field, or (past Python's digit limit) the body."""
    message = assert_error(response, 422, "invalid_input")
    where = "body" if len(number) > 4300 else field.strip()
    assert message.startswith(where) or f"{where}:" in message, (number, field, message)


def test_numbers_past_float_range_in_an_adaptation(api: TestClient) -> None:
    for field, template in ADAPT_TEMPLATES.items():
        for number in HUGE_SPELLINGS:
            response = post_text(api, "/v1/clients/alice/adaptations", spliced(template, number))
            assert_refused(response, field, number)
    assert api.get("/v1/clients/alice").status_code == 404


def test_numbers_past_float_range_for_a_stored_client(api: TestClient) -> None:
    assert (
        api.post(
            "/v1/clients/alice/adaptations", json={"meta_model": "sinusoid", "support": SUPPORT}
        ).status_code
        == 201
    )
    before = api.get("/v1/clients/alice").json()
    for field, (suffix, template) in CLIENT_TEMPLATES.items():
        for number in HUGE_SPELLINGS:
            response = post_text(api, f"/v1/clients/alice{suffix}", spliced(template, number))
            assert_refused(response, field, number)
    for number in ("1e400", "-1e400", "1E+309", "nan", "NaN", "inf", "-Infinity", "9" * 5000):
        assert_refused(api.get("/v1/clients/alice/predictions", params={"x": number}), "x[0]", "")
    assert api.get("/v1/clients/alice").json() == before  # no new version


# -- deep nesting inside an otherwise valid request (in process) --------------------------
@pytest.mark.parametrize("depth", [50, 5_000, 100_000])
def test_deep_nesting_inside_a_request(make_api: ApiFactory, depth: int) -> None:
    api = make_api(max_body_bytes=1_000_000)
    nested = "[" * depth + "1" + "]" * depth
    objects = '{"a": ' * depth + "1" + "}" * depth
    for text in (
        f'{{"meta_model": "sinusoid", "support": {{"inputs": [{nested}], "targets": [1]}}}}',
        f'{{"meta_model": "sinusoid", "support": {{"inputs": [[1]], "targets": [{objects}]}}}}',
        f'{{"meta_model": {objects}, "support": {{"inputs": [[1]], "targets": [1]}}}}',
    ):
        response = post_text(api, "/v1/clients/deep/adaptations", text)
        assert_error(response, 422, "invalid_input")
    assert api.get("/v1/clients/deep").status_code == 404


# -- image bombs for the shipped omniglot meta-model (in process) -------------------------
def chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png(width: int, height: int, idat: bytes | None = None, extra: bytes = b"") -> bytes:
    """A grayscale PNG, written by hand so that it may lie."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    if idat is None:
        idat = zlib.compress(b"\0" * (width + 1) * height, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + extra
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def drawing(noise: bool = False) -> bytes:
    """A 28x28 PNG: white, or noise (whose pixels do not compress: truncating it cuts
    into them)."""
    pixels = np.full((28, 28), 255, dtype=np.uint8)
    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


INFLATES = zlib.compress(b"\0" * 50 * MB, 9)  # 50 MB from ~50 kB
IMAGE_BOMBS = {
    "100000x100000 declared": (png(100_000, 100_000, idat=zlib.compress(b"\0" * 1024)), 413),
    "4000x4000 of zeros (16 MB of pixels from 16 kB)": (png(4000, 4000), 413),
    "a colour profile that inflates to 50 MB": (
        png(1, 1, extra=chunk(b"iCCP", b"p\0\0" + INFLATES)),
        422,
    ),
    "a text chunk that inflates to 50 MB": (
        png(1, 1, extra=chunk(b"zTXt", b"k\0\0" + INFLATES)),
        422,
    ),
    "a truncated PNG": (drawing(noise=True)[:400], 422),
    "a JPEG cut in its first segment": (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", 422),
    "a GIF": (base64.b64decode("R0lGODlhAQABAAAAACw="), 422),
    "text, not an image": (b"hello, I am not an image", 422),
    "nothing": (b"", 422),
}


@pytest.fixture
def omniglot(make_api: ApiFactory) -> TestClient:
    return make_api(models_dir=ARTIFACTS)


def test_image_bombs_for_omniglot(omniglot: TestClient) -> None:
    good = b64(drawing())
    for name, (data, status) in IMAGE_BOMBS.items():
        support = {"inputs": [good, b64(data)], "targets": ["a", "b"]}
        response = omniglot.post(
            "/v1/clients/bombed/adaptations", json={"meta_model": "omniglot", "support": support}
        )
        assert response.status_code == status, (name, response.text)
        assert "support.inputs[1]" in response.json()["error"]["message"], name
    for text in ("not base64!", "data:image/png;base64,@@@@"):
        support = {"inputs": [text], "targets": ["a"]}
        response = omniglot.post(
            "/v1/clients/bombed/adaptations", json={"meta_model": "omniglot", "support": support}
        )
        assert_error(response, 422, "invalid_input", "support.inputs[0]", "base64")
    assert omniglot.get("/v1/clients/bombed").status_code == 404

    support = {"inputs": [good, good], "targets": ["a", "b"]}
    created = omniglot.post(
        "/v1/clients/reader/adaptations", json={"meta_model": "omniglot", "support": support}
    )
    assert created.status_code == 201, created.text
    before = omniglot.get("/v1/clients/reader").json()
    for name, (data, status) in IMAGE_BOMBS.items():
        inputs = [good, b64(data)]
        predicted = omniglot.post("/v1/clients/reader/predictions", json={"inputs": inputs})
        assert predicted.status_code == status, (name, predicted.text)
        added = omniglot.post(
            "/v1/clients/reader/examples", json={"inputs": inputs, "targets": ["a", "c"]}
        )
        assert added.status_code == status, (name, added.text)
    assert omniglot.get("/v1/clients/reader").json() == before  # no new version


# -- forged cursors and control characters in query strings (in process) ------------------
def cursor(kind: str, position: Any) -> str:
    raw = json.dumps([kind, position]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_forged_cursors_and_nul_filters_are_422(api: TestClient) -> None:
    """Each was a 500 on PostgreSQL: a NUL in a text comparison, or an integer past the
    INTEGER column's range."""
    created = api.post(
        "/v1/clients/alice/adaptations", json={"meta_model": "sinusoid", "support": SUPPORT}
    )
    assert created.status_code == 201
    for url, params, field in (
        ("/v1/clients", {"meta_model": "\x00"}, "meta_model"),
        ("/v1/clients", {"meta_model": "sinusoid\x1b[31m"}, "meta_model"),
        ("/v1/clients", {"cursor": cursor("clients", "\x00")}, "cursor"),
        ("/v1/clients", {"cursor": cursor("clients", "a" * 5000)}, "cursor"),
        ("/v1/clients", {"cursor": cursor("clients", "")}, "cursor"),
        ("/v1/clients/alice/versions", {"cursor": cursor("versions", 10**30)}, "cursor"),
        ("/v1/clients/alice/versions", {"cursor": cursor("versions", -(10**30))}, "cursor"),
        ("/v1/clients/alice/versions", {"cursor": cursor("versions", 2**63)}, "cursor"),
        ("/v1/clients/alice/versions", {"cursor": cursor("versions", 0)}, "cursor"),
    ):
        assert_error(api.get(url, params=params), 422, "invalid_input", field)
    # a cursor the server wrote still works
    assert api.get("/v1/clients", params={"cursor": cursor("clients", "a")}).status_code == 200
    page = api.get("/v1/clients/alice/versions", params={"cursor": cursor("versions", 2)})
    assert [v["version"] for v in page.json()["versions"]] == [1]


def test_a_label_with_a_lone_surrogate_is_422(omniglot: TestClient) -> None:
    """JSON's "\\ud800" parses to a string no response can carry: it was stored, then the
    201 (and every later read of the client) was a 500."""
    good = json.dumps(b64(drawing()))
    for client_id, labels in (("lone", '["\\ud800", "b"]'), ("low", '["a", "x\\udfff"]')):
        text = (
            f'{{"meta_model": "omniglot", "support": {{"inputs": [{good}, {good}], '
            f'"targets": {labels}}}}}'
        )
        response = post_text(omniglot, f"/v1/clients/{client_id}/adaptations", text)
        assert_error(response, 422, "invalid_input", "support.targets[", "surrogate")
        assert omniglot.get(f"/v1/clients/{client_id}").status_code == 404
    support = {"inputs": [b64(drawing()), b64(drawing())], "targets": ["a", "b"]}
    created = omniglot.post(
        "/v1/clients/reader/adaptations", json={"meta_model": "omniglot", "support": support}
    )
    assert created.status_code == 201
    text = f'{{"inputs": [{good}], "targets": ["\\udc80"]}}'
    added = post_text(omniglot, "/v1/clients/reader/examples", text)
    assert_error(added, 422, "invalid_input", "targets[0]", "surrogate")
    assert omniglot.get("/v1/clients/reader").json()["current_version"] == 1
