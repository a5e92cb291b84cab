"""Migrations create the schema; `serve` migrates SQLite itself and refuses an
out-of-date PostgreSQL schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

from service import cli
from service.store import migrate
from service.store.session import connect
from service.store.tables import Base
from tests.service.store_fixtures import BACKENDS, Databases


@pytest.mark.parametrize("backend", BACKENDS)
def test_upgrade_on_an_empty_database_creates_exactly_the_tables(
    backend: str, databases: Databases, request: pytest.FixtureRequest
) -> None:
    url = databases.new(backend, request)
    assert migrate.current(url) is None
    migrate.upgrade(url)
    assert migrate.current(url) == migrate.head()
    engine = connect(url)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        config = Config(str(migrate.ALEMBIC_INI))
        config.attributes["connection"] = connection
        command.downgrade(config, "base")  # and back: the downgrade works too
        command.upgrade(config, "head")
        connection.commit()
    engine.dispose()
    assert migrate.current(url) == migrate.head()


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Stand-in for ``uvicorn.Server.run`` (``fastadapt serve`` runs a subclass): records
    the app and where it would listen instead of serving it."""
    served: list[Any] = []

    def run(self: Any, sockets: Any = None) -> None:
        served.append((self.config.app, {"host": self.config.host, "port": self.config.port}))
        self.started = True

    monkeypatch.setattr("uvicorn.Server.run", run)
    return served


def test_serve_refuses_an_out_of_date_postgresql_schema(
    databases: Databases,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_server: list[Any],
    models_dir: Path,
    tmp_path: Path,
) -> None:
    url = databases.new("postgresql", request)
    monkeypatch.setenv("FASTADAPT_DATABASE_URL", url)
    monkeypatch.setenv("FASTADAPT_MODELS_DIR", str(models_dir))
    monkeypatch.chdir(tmp_path)  # `fastadapt migrate` works from any directory
    assert cli.main(["serve", "--port", "8123"]) == 2
    assert "run `fastadapt migrate`" in capsys.readouterr().err
    assert no_server == [] and migrate.current(url) is None  # serve did not migrate it

    assert cli.main(["migrate"]) == 0
    assert cli.main(["serve", "--port", "8123"]) == 0
    assert {k: no_server[0][1][k] for k in ("host", "port")} == {"host": "127.0.0.1", "port": 8123}


def test_serve_migrates_sqlite_itself(
    monkeypatch: pytest.MonkeyPatch, no_server: list[Any], models_dir: Path, tmp_path: Path
) -> None:
    monkeypatch.delenv("FASTADAPT_DATABASE_URL", raising=False)
    monkeypatch.setenv("FASTADAPT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FASTADAPT_MODELS_DIR", str(models_dir))
    assert cli.main(["serve"]) == 0
    assert migrate.current(f"sqlite:///{tmp_path / 'data' / 'fastadapt.db'}") == migrate.head()
    assert len(no_server) == 1
