"""Real ``fastadapt serve`` processes for the client library's tests: one per database
backend (SQLite, and PostgreSQL when ``FASTADAPT_TEST_POSTGRES_URL`` is set), serving the
shipped meta-models (``sinusoid`` takes numbers, ``omniglot`` images, ``intents`` texts)
with keys required (``FASTADAPT_AUTH=required``, as in production), and a key made by
``fastadapt keys create``. No model hub: the servers run without ``HF_HUB_OFFLINE``, with
the hub's address and every proxy pointing at a listener (``hub``) that counts what
reaches it; ``test_text_live`` asserts that nothing did."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import NamedTuple

import pytest

from tests.service.api.test_server import REPO, server
from tests.service.store_fixtures import BACKENDS, Databases

POSTGRES_ENV = "FASTADAPT_TEST_POSTGRES_URL"


class Hub:
    """A loopback TCP listener standing in for a model hub and any proxy: it accepts and
    closes every connection, recording when each came."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.connections: list[float] = []
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._accept, name="hub", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:  # closed: the session is over
                return
            except BaseException as exc:  # recorded: a test asserts there are none
                self.errors.append(exc)
                return
            self.connections.append(time.time())
            connection.close()

    def env(self) -> dict[str, str]:
        """A server's environment pointing the hub and every proxy here."""
        return {
            "HF_ENDPOINT": self.url,
            **{name: self.url for name in PROXIES},
            **{name.lower(): self.url for name in PROXIES},
        }

    def close(self) -> None:
        self.socket.close()
        self._thread.join(5)


PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "NO_PROXY", "no_proxy")


@pytest.fixture(scope="session")
def hub() -> Iterator[Hub]:
    listener = Hub()
    yield listener
    listener.close()


class Live(NamedTuple):
    url: str  # the server's base URL
    key: str  # a client-scoped key of tenant "e2e"


@pytest.fixture(scope="session")
def api_key(live: Live) -> str:
    """The key the live tests send."""
    return live.key


@pytest.fixture(scope="session")
def base_url(live: Live) -> str:
    return live.url


@pytest.fixture(scope="session", params=BACKENDS)
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, hub: Hub
) -> Iterator[Live]:
    """A real server on a free loopback port that requires keys, up until the session ends."""
    databases = Databases(tmp_path_factory)
    tmp = tmp_path_factory.mktemp(f"server-{request.param}")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("FASTADAPT_") and k not in OFFLINE
    }
    env |= hub.env()
    env |= {
        "FASTADAPT_DATA_DIR": str(tmp / "data"),
        "FASTADAPT_THREADS": "1",
        "FASTADAPT_AUTH": "required",
        # the tests send the client's step overrides to the shipped sinusoid, which was
        # meta-trained for exactly 5 steps and 5 to 20 points (docs/meta-models.md#guardrails)
        "FASTADAPT_ALLOW_UNTRAINED": "true",
    }
    if request.param == "postgresql":
        server_url = os.environ.get(POSTGRES_ENV)
        if not server_url:
            pytest.skip(f"{POSTGRES_ENV} is not set")
        env["FASTADAPT_DATABASE_URL"] = databases.postgresql(server_url)
    try:
        key = _create_key(env)
        with server(env, tmp / "server.log") as probe:
            yield Live(str(probe.base_url).rstrip("/"), key)
    finally:
        databases.drop_all()


def _create_key(env: dict[str, str]) -> str:
    """``fastadapt migrate`` then ``fastadapt keys create``: the key is the last line."""
    for args in (["migrate"], ["keys", "create", "--tenant", "e2e"]):
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    return done.stdout.strip().splitlines()[-1]
