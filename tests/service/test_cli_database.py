"""Which database the ``fastadapt`` commands use: only ``migrate`` and ``serve`` create
one; the others refuse a database that does not exist, naming it and how to point at the
right one (issue 20: run from another folder, ``keys revoke`` created an empty
``./data/fastadapt.db`` there and answered "unknown key")."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from service import cli
from service.store import migrate
from tests.service.api.test_server import REPO

COMMANDS = [
    ["keys", "list"],
    ["keys", "create", "--tenant", "acme"],
    ["keys", "revoke", "key_0123456789abcdef"],
    ["meta-models", "list"],
    ["meta-models", "promote", "sinusoid", "0" * 12],
    ["reconcile", "sinusoid", "--tenant", "acme"],
]


@pytest.fixture
def elsewhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, models_dir: Path) -> Path:
    """A folder with no database, the current one, and the settings' defaults."""
    for name in ("FASTADAPT_DATABASE_URL", "FASTADAPT_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FASTADAPT_MODELS_DIR", str(models_dir))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_a_command_refuses_a_database_that_does_not_exist(
    argv: list[str], elsewhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    path = elsewhere / "data" / "fastadapt.db"
    assert not out and err.startswith(f"fastadapt: no database at {path}: "), err
    assert "FASTADAPT_DATABASE_URL" in err and "FASTADAPT_DATA_DIR" in err
    assert "`fastadapt migrate`" in err
    assert not (elsewhere / "data").exists()  # nothing created: no file, no folder


def test_a_file_that_is_no_fastadapt_database_is_refused_not_migrated(
    elsewhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = elsewhere / "data" / "fastadapt.db"
    path.parent.mkdir()
    path.touch()  # e.g. what an older fastadapt created here
    assert cli.main(["keys", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastadapt: {path} holds no fastadapt database (revision none).\n"), err
    assert "FASTADAPT_DATABASE_URL" in err and "`fastadapt migrate`" in err
    with closing(sqlite3.connect(path)) as db:  # not migrated
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == []


def test_migrate_creates_it_and_then_the_commands_use_it(
    elsewhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["migrate"]) == 0
    assert (elsewhere / "data" / "fastadapt.db").exists()
    capsys.readouterr()
    assert cli.main(["keys", "list"]) == 0
    assert capsys.readouterr().out.split() == ["id", "tenant", "scope", "created", "revoked"]


def test_a_command_prints_its_output_alone(tmp_path: Path) -> None:
    """No Alembic INFO lines on every call (issue 20), and output ending in a newline."""
    url = f"sqlite:///{tmp_path / 'fastadapt.db'}"
    migrate.upgrade(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTADAPT_")}
    env["FASTADAPT_DATABASE_URL"] = url
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "keys", "list"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.split() == ["id", "tenant", "scope", "created", "revoked"]
    assert done.stdout.endswith("revoked\n")
