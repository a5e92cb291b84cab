"""Real ``fastadapt serve`` processes for the client library's tests: one per database
backend (SQLite, and PostgreSQL when ``FASTADAPT_TEST_POSTGRES_URL`` is set), serving the
shipped meta-models (``sinusoid`` takes numbers, ``omniglot`` images)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from service.store import migrate
from tests.service.api.test_server import server
from tests.service.store_fixtures import BACKENDS, Databases

POSTGRES_ENV = "FASTADAPT_TEST_POSTGRES_URL"


@pytest.fixture(scope="session")
def api_key() -> str | None:
    """The key the live tests send: none while the server needs none on loopback."""
    return None


@pytest.fixture(scope="session", params=BACKENDS)
def base_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The URL of a real server on a free loopback port, up until the session ends."""
    databases = Databases(tmp_path_factory)
    tmp = tmp_path_factory.mktemp(f"server-{request.param}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTADAPT_")}
    env |= {"FASTADAPT_DATA_DIR": str(tmp / "data"), "FASTADAPT_THREADS": "1"}
    if request.param == "postgresql":
        server_url = os.environ.get(POSTGRES_ENV)
        if not server_url:
            pytest.skip(f"{POSTGRES_ENV} is not set")
        env["FASTADAPT_DATABASE_URL"] = databases.postgresql(server_url)
        migrate.upgrade(env["FASTADAPT_DATABASE_URL"])  # serve only checks PostgreSQL's schema
    try:
        with server(env, tmp / "server.log") as probe:
            yield str(probe.base_url).rstrip("/")
    finally:
        databases.drop_all()
