"""``fastadapt reconcile``: starts a job, prints its progress with --wait; errors name the
meta-model."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import cli


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch, models_dir: Path, tmp_path: Path) -> None:
    monkeypatch.delenv("FASTADAPT_DATABASE_URL", raising=False)
    monkeypatch.setenv("FASTADAPT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FASTADAPT_MODELS_DIR", str(models_dir))


def test_a_job_with_nothing_stale_is_done_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["reconcile", "sinusoid", "--tenant", "acme", "--wait"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("job ") and "0 clients of sinusoid onto" in out[0]
    assert out[1].startswith("done: 0 done, 0 failed, 0 skipped of 0")


def test_an_unknown_meta_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["reconcile", "nope", "--tenant", "acme"]) == 1
    assert "unknown meta-model 'nope'" in capsys.readouterr().err
