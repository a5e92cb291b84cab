"""`fastadapt meta-models register|promote|list` on the configured database (SQLite and
PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from service import cli
from service.settings import Settings
from service.store.session import connect, session_factory
from service.usecases.registry import ModelRegistry
from tests.diverged import write_diverged
from tests.service.registry_helpers import perturbed
from tests.service.store_fixtures import BACKENDS

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture(params=BACKENDS)
def database(
    request: pytest.FixtureRequest,
    fresh_database: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> str:
    url = fresh_database(request.param)
    monkeypatch.setenv("FASTADAPT_DATABASE_URL", url)
    return url


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    def call(*argv: str) -> tuple[int, str, str]:
        code = cli.main(["meta-models", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return call


def promoted(url: str, name: str, tmp_path: Path) -> str:
    """What a server on ``url`` would use for new adaptations of ``name``."""
    database = connect(url)
    try:
        with session_factory(database)() as session:
            registry = ModelRegistry(Settings(data_dir=tmp_path, database_url=url))
            return registry.promoted(session, name).version
    finally:
        database.dispose()


def test_register_promote_and_list(
    database: str, run: Run, models_dir: Path, tmp_path: Path
) -> None:
    code, out, _ = run("register", str(models_dir / "sinusoid"))
    assert code == 0, out
    first = out.split()[-1]
    assert "registered meta-model sinusoid version, promoted" in out  # the name's first
    assert promoted(database, "sinusoid", tmp_path) == first

    newer = perturbed(models_dir / "sinusoid", tmp_path / "newer" / "sinusoid")
    code, out, _ = run("register", str(tmp_path / "newer" / "sinusoid"))
    assert code == 0 and out.split()[-1] == newer.version and "promoted" not in out
    assert promoted(database, "sinusoid", tmp_path) == first  # registered, not promoted
    code, out, _ = run("register", str(tmp_path / "newer" / "sinusoid"))
    assert code == 0 and "already registered" in out

    code, out, _ = run("promote", "sinusoid", newer.version[:12])
    assert code == 0 and newer.version in out
    assert promoted(database, "sinusoid", tmp_path) == newer.version

    code, out, _ = run("list", "sinusoid")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:2] == ["name", "sha256"]
    assert [line.split()[1] for line in lines[1:]] == [first, newer.version]
    assert lines[2].endswith("promoted") and not lines[1].endswith("promoted")
    assert f"cli:{tmp_path / 'newer' / 'sinusoid'}" in lines[2]

    wave = perturbed(models_dir / "sinusoid", tmp_path / "wave" / "sinusoid", delta=0.2)
    code, out, _ = run("register", str(tmp_path / "wave" / "sinusoid"), "--name", "wave")
    assert code == 0 and promoted(database, "wave", tmp_path) == wave.version  # a new name
    code, _, err = run("register", str(models_dir / "sinusoid"), "--name", "other")
    assert code == 1 and "registered as meta-model 'sinusoid'" in err  # one sha, one name


def test_refusals(database: str, run: Run, models_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "weights.safetensors"):
        (broken / name).write_bytes((models_dir / "sinusoid" / name).read_bytes())
    (broken / "weights.sha256").write_text("0" * 64 + "\n")
    code, _, err = run("register", str(broken))
    assert code == 1 and "sha256" in err
    write_diverged(models_dir / "sinusoid", tmp_path / "diverged")  # issue 20: NaN weights
    code, out, err = run("register", str(tmp_path / "diverged"))
    assert code == 1 and not out
    assert f"cannot load {tmp_path / 'diverged'}" in err and "NaN or infinity" in err, err
    assert "its meta-training diverged" in err
    assert run("register", str(models_dir / "sinusoid"))[0] == 0
    code, _, err = run("promote", "sinusoid", "0" * 64)
    assert code == 1 and "no registered version" in err
    code, _, err = run("promote", "sinusoid", "abc")
    assert code == 1 and "12 hex" in err
    code, _, err = run("list", "nope")
    assert code == 1 and "unknown meta-model" in err
