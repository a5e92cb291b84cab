"""Settings come from FASTADAPT_* variables, with defaults that work out of the box."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

import models
from service.settings import Settings


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("DATABASE_URL", "DATA_DIR", "MODELS_DIR", "PORT"):
        monkeypatch.delenv(f"FASTADAPT_{name}", raising=False)
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.data_dir == tmp_path.resolve() / "data"
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'data' / 'fastadapt.db'}"
    assert settings.is_sqlite
    assert settings.models_dir == Path(models.__file__).parent / "artifacts"
    assert (settings.host, settings.port, settings.device) == ("127.0.0.1", 8000, "auto")


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTADAPT_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("FASTADAPT_MAX_SUPPORT", "7")
    settings = Settings()
    assert settings.database_url == "postgresql+psycopg://u@h/db" and not settings.is_sqlite
    assert settings.max_support == 7


def test_invalid_values_fail_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTADAPT_PORT", "0")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.delenv("FASTADAPT_PORT")
    with pytest.raises(ValidationError):
        Settings(min_inner_steps=10, max_inner_steps=5)
