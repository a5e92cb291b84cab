"""The docs tests' own machinery, against a stub HTTP server: how a block splits into
commands, which outputs it shows, and that a block that fails as written is reported."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.docs.examples import at_port, commands, run_python, run_shell
from tests.docs.shown import check, parse


class Stub(BaseHTTPRequestHandler):
    """``/<status>`` answers that status with ``{"status": <status>, "path": ...}``."""

    def do_GET(self) -> None:
        status = int(self.path.strip("/").split("?")[0] or 200)
        body = json.dumps({"status": status, "path": self.path}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def stub() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        thread.join()


def shell(script: str, port: int, tmp: Path) -> list[str]:
    return run_shell(
        at_port(script, port),
        cwd=tmp,
        env={"PATH": "/usr/bin:/bin"},
        marks=tmp / "marks",
        timeout=30,
    )


def test_a_block_splits_into_commands_with_what_they_show() -> None:
    script = """# a comment, not a command
curl -s localhost:8000/200 \\
  -H 'X-A: #not a comment'   # -> 200 {"status": 200, ...}
curl -s -d '{"a":
   1}' localhost:8000/201
# -> {"status": 201,
#     "path": "/201"}
echo its  # plain comment
"""
    found = commands(script)
    assert [(c.first, c.last) for c in found] == [(1, 2), (3, 4), (7, 7)]
    assert found[0].shown == ' 200 {"status": 200, ...}'
    assert found[1].shown == ' {"status": 201,\n     "path": "/201"}'
    assert found[2].shown is None


def test_a_block_that_runs_as_shown(stub: int, tmp_path: Path) -> None:
    script = """curl -s localhost:8000/200   # -> {"status": 200, "path": "/..."}
curl -s localhost:8000/404
# -> 404 {"status": 404, ...}
STATUS=$(curl -s localhost:8000/201 \\
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])')
echo "made $STATUS"   # -> made 20...
"""
    assert shell(script, stub, tmp_path) == []


def test_an_error_status_not_shown_fails_the_block(stub: int, tmp_path: Path) -> None:
    problems = shell("curl -s localhost:8000/422\necho done\n", stub, tmp_path)
    assert problems[0].startswith('curl call 1 answered 422: {"status": 422')


def test_a_shown_output_that_differs_fails_the_block(stub: int, tmp_path: Path) -> None:
    script = """curl -s localhost:8000/200   # -> 201 {...}
curl -s localhost:8000/200   # -> {"status": 201, ...}
curl -s localhost:8000/200   # -> {"status": 200}
echo hello   # -> goodbye
"""
    problems = shell(script, stub, tmp_path)
    assert [p.split("): ", 1)[1] for p in problems[:4]] == [
        "shown status 201, got 200",
        "status: shown 201, got 200",
        "the value: member 'path' is not shown",
        "shown 'goodbye', got 'hello\\n'",
    ]
    assert problems[0].startswith(f"line 1 (curl -s localhost:{stub}/200")


def test_a_command_that_fails_fails_the_block(tmp_path: Path) -> None:
    problems = shell("false\necho never\n", 1, tmp_path)
    assert problems[0] == "exit status 1"


def test_python_expressions_are_checked_against_what_they_show(tmp_path: Path) -> None:
    source = (
        "x = {'a': [1, 2.5], 'b': 'version 3'}\n"
        "x['a']  # -> [1, 0.1...]\n"
        "x['b']\n"
        "# -> 'version ...'\n"
        "if True:\n"
        "    len(x)  # -> 3\n"
        "y = 1  # -> 1\n"
    )
    namespace: dict[str, Any] = {}
    problems = run_python(source, namespace=namespace, cwd=tmp_path, filename="page.md:1")
    assert problems == [
        "line 7: a shown output after something that is not an expression",
        "line 6: the value: shown 3, got 2",
    ]
    assert namespace["y"] == 1


@pytest.mark.parametrize(
    ("sketch", "value", "differs"),
    [
        ('{"a": 1, ...}', {"a": 1, "b": 2}, False),
        ('{"a": 1}', {"a": 1, "b": 2}, True),
        ("[0.5, ...]", [-3, 4.0, 5.0], False),
        ("[0.5]", [0.5, 0.5], True),
        ("[...]", [], False),
        ('"9f3c..."', "9f3c01", False),
        ('"9f3c..."', "9f4c01", True),
        ("true", True, False),
        ("1", True, True),
        ("1", 1.0, True),
        ("null", None, False),
        ('("beta", {"alpha": 0.1, ...})', ("beta", {"alpha": 0.9, "beta": 0.1}), False),
    ],
)
def test_shapes(sketch: str, value: Any, differs: bool) -> None:
    assert bool(check(parse(sketch), value=value)) is differs


def test_the_docs_have_examples_to_run() -> None:
    from tests.docs.test_examples import EXAMPLES

    assert len([b for b in EXAMPLES if b.not_run is None]) >= 10
