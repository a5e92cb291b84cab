"""``fastadapt reconcile``: starts a job, prints its progress with --wait; errors name the
meta-model."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import cli
from service.store import jobs, migrate
from service.store.jobs import Stale
from service.store.session import connect, session_factory
from service.usecases import reconcile


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch, models_dir: Path, tmp_path: Path) -> None:
    monkeypatch.delenv("FASTADAPT_DATABASE_URL", raising=False)
    monkeypatch.setenv("FASTADAPT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FASTADAPT_MODELS_DIR", str(models_dir))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """The database the environment names (the default SQLite file), migrated."""
    url = f"sqlite:///{tmp_path / 'data' / 'fastadapt.db'}"
    migrate.upgrade(url)
    return url


def test_a_job_with_nothing_stale_is_done_at_once(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["reconcile", "sinusoid", "--tenant", "acme", "--wait"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("job ") and "0 clients of sinusoid onto" in out[0]
    assert out[1].startswith("done: 0 done, 0 failed, 0 skipped of 0")


def test_an_unknown_meta_model(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["reconcile", "nope", "--tenant", "acme"]) == 1
    assert "unknown meta-model 'nope'" in capsys.readouterr().err


def test_wait_reads_every_poll_afresh_on_sqlite(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 20: on SQLite (WAL) a read transaction sees the snapshot of its first read, so
    a wait loop that kept one open printed "1 done of 18" forever. Here a "server" records
    one client per poll (as a runner's claim and finish do, in its own connection); the
    loop must see each one and end when the job is done."""
    stale = [Stale(f"c{i}", 1, "0" * 64) for i in range(3)]
    monkeypatch.setattr(jobs, "stale_clients", lambda **_: stale)  # 3 stale clients
    database = connect(sqlite_url)
    polls: list[float] = []

    def a_server_works_meanwhile(seconds: float) -> None:
        polls.append(seconds)
        assert len(polls) <= 2 * len(stale), "the wait loop never saw the job end"
        with session_factory(database)() as session:
            for claim in reconcile.claim(session=session, worker="w", lease_s=60, limit=1):
                assert jobs.finish(
                    session=session,
                    worker="w",
                    job_id=claim.job_id,
                    client_id=claim.client_id,
                    state="done",
                    to_version=2,
                )
                session.commit()

    monkeypatch.setattr(cli.time, "sleep", a_server_works_meanwhile)
    try:
        assert cli.main(["reconcile", "sinusoid", "--tenant", "acme", "--wait"]) == 0
    finally:
        database.dispose()
    lines = capsys.readouterr().out.splitlines()
    assert "3 clients of sinusoid onto" in lines[0]
    assert [line.split(",")[0] for line in lines[1:]] == [
        "queued: 0 done",
        "running: 1 done",
        "running: 2 done",
        "done: 3 done",
    ]
    assert len(polls) == 3
