"""Real ``fastadapt serve`` processes for the client library's tests: one per database
backend (SQLite, and PostgreSQL when ``FASTADAPT_TEST_POSTGRES_URL`` is set), serving the
shipped meta-models (``sinusoid`` takes numbers, ``omniglot`` images) with keys required
(``FASTADAPT_AUTH=required``, as in production), and a key made by ``fastadapt keys create``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import NamedTuple

import pytest

from tests.service.api.test_server import REPO, server
from tests.service.store_fixtures import BACKENDS, Databases

POSTGRES_ENV = "FASTADAPT_TEST_POSTGRES_URL"


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
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    """A real server on a free loopback port that requires keys, up until the session ends."""
    databases = Databases(tmp_path_factory)
    tmp = tmp_path_factory.mktemp(f"server-{request.param}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTADAPT_")}
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
