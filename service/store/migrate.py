"""Running Alembic programmatically, from any working directory."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

import migrations
from service.store.session import connect

ALEMBIC_INI = Path(migrations.__file__).parent / "alembic.ini"


def _config() -> Config:
    return Config(str(ALEMBIC_INI))


def upgrade(url: str, revision: str = "head") -> None:
    """Apply every pending migration to the database at ``url``, in one transaction."""
    engine = connect(url)
    try:
        with engine.begin() as connection:
            config = _config()
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def head() -> str | None:
    """The revision the code expects."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def current(url: str) -> str | None:
    """The revision the database is at (``None``: never migrated)."""
    engine = connect(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
