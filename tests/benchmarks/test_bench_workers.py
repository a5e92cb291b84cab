"""The workers benchmark's pieces (``benchmarks/bench_workers.py``): its tables' ratios
and verdicts, the CPU count of a server's child processes that ``wait_idle`` reads, the
ceiling served by uvicorn workers, and a fresh PostgreSQL database per server. Nothing
here is timed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_text import Bodies
from benchmarks.bench_workers import (
    Measured,
    report_ceiling,
    report_workers,
    request_lines,
    text_requests,
)
from benchmarks.serving import Run, _cpu_seconds, ceiling, fresh_database, processes, wrk

POSTGRES_ENV = "FASTADAPT_TEST_POSTGRES_URL"


def measured(rps: float, p50: float, p99: float, batch: float = 0.0, errors: int = 0) -> Measured:
    return Measured(Run(rps, p50, p99, errors), batch)


def test_the_workers_table_states_each_ratio_against_its_goal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    results = {
        # two repeats: the ratio is the median of each repeat's (2.0 and 1.5: 1.75)
        ("single", "predict"): [measured(100, 10, 20, 4.0), measured(200, 10, 20, 6.0)],
        ("workers", "predict"): [measured(200, 10, 30, 8.0), measured(300, 10, 50, 10.0)],
        # a ratio of 1.5 and a tail of 5: both missed
        ("single", "text-adapt"): [measured(10, 100, 200, 2.0)],
        ("workers", "text-adapt"): [measured(15, 100, 500, 3.0)],
        # a non-2xx response voids the row, and is counted
        ("single", "adapt"): [measured(10, 1, 2)],
        ("workers", "adapt"): [measured(20, 1, 2, errors=1)],
    }
    errors = report_workers(results, ["predict", "adapt", "text-adapt"], 64, 2)
    rows = {line.split(" | ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert errors == 1
    assert rows["| predict"] == (
        "| predict | 64 | 150.0 | 10.0 | 20.0 | 5.0 | 250.0 | 10.0 | 40.0 | 9.0 "
        "| 1.75x | 4.0 | ratio met, tail met |"
    )
    assert rows["| text-adapt"].endswith("| 1.50x | 5.0 | ratio MISSED, tail MISSED |")
    assert rows["| adapt"].endswith("| 2.00x | 2.0 | void: 1 non-2xx responses or socket errors |")


def test_a_run_without_answers_gets_no_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    results = {("single", "adapt"): [measured(0, 0, 0)], ("workers", "adapt"): [measured(5, 1, 2)]}
    report_workers(results, ["adapt"], 64, 2)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| adapt"))
    assert row.endswith("| - | - | no verdict: a run got no answer (make the runs longer) |")


def test_the_ceiling_table_divides_each_server_by_its_own_ceiling(
    capsys: pytest.CaptureFixture[str],
) -> None:
    results = {
        ("ceiling", "predict"): [measured(1000, 1, 2)],
        ("single", "predict"): [measured(600, 1, 2, 3.0)],
        ("ceiling-workers", "predict"): [measured(2000, 1, 2)],
        ("workers", "predict"): [measured(900, 1, 2, 3.0)],
        ("single", "text-predict"): [measured(50, 1, 2)],  # text: no ceiling, no row
        ("workers", "text-predict"): [measured(90, 1, 2)],
    }
    assert report_ceiling(results, ["predict", "text-predict"], 16) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[1:] == [
        "| predict | 16 | 1,000 | 600 | 0.60 | 2,000 | 900 | 0.45 "
        "| single met, workers MISSED (>= 0.5) |"
    ]
    assert report_ceiling(results, ["text-predict"], 16) == 0  # no sinusoid: no table
    assert capsys.readouterr().out == ""


def test_the_text_request_files_hold_new_texts_of_the_workload(tmp_path: Path) -> None:
    bodies = Bodies(clients=3)
    adapt = text_requests(bodies, "text-adapt", 4, tmp_path / "a.txt")
    predict = text_requests(bodies, "text-predict", 3, tmp_path / "p.txt")
    adaptations = Path(adapt["REQUESTS"]).read_text("utf-8").splitlines()
    predictions = Path(predict["REQUESTS"]).read_text("utf-8").splitlines()
    assert len(adaptations) == 4 and all("/adaptations\t" in line for line in adaptations)
    assert len(predictions) == 3 and all("/predictions\t" in line for line in predictions)
    assert len(set(adaptations)) == 4  # new clients, new texts
    assert request_lines(100, 5, 64) == 750 + 128


BUSY = (
    "import sys, time\n"
    "start = time.process_time()\n"
    "while time.process_time() - start < 0.3: pass\n"
    "print('busy', flush=True)\n"
    "sys.stdin.read()\n"  # until the test closes it
)


def test_the_cpu_of_a_server_counts_its_child_processes() -> None:
    before = _cpu_seconds(os.getpid())
    child = subprocess.Popen(
        [sys.executable, "-c", BUSY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "busy\n"
        family = processes(os.getpid())
        assert family[child.pid] >= 0.3
        assert _cpu_seconds(os.getpid()) - before >= 0.3
        assert set(processes(child.pid)) == {child.pid}  # no children: the process alone
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)
    assert _cpu_seconds(None) == 0.0


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_the_ceiling_serves_with_uvicorn_workers() -> None:
    with ceiling(workers=2) as srv:
        assert srv.pid is not None and len(processes(srv.pid)) >= 3  # uvicorn + 2 workers
        run = wrk(srv.url, "adapt.lua", 4, 1, CLIENTS="10")
        assert run.errors == 0 and run.rps > 0


@pytest.mark.skipif(not os.environ.get(POSTGRES_ENV), reason=f"{POSTGRES_ENV} is not set")
def test_each_server_gets_a_fresh_database_dropped_after() -> None:
    from sqlalchemy import create_engine, make_url, text

    url = os.environ[POSTGRES_ENV]
    with fresh_database(url) as first, fresh_database(url) as second:
        assert first != second
        engine = create_engine(first)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT current_database()")).scalar() == (
                make_url(first).database
            )
        engine.dispose()
    names = {make_url(first).database, make_url(second).database}
    admin = create_engine(url)
    with admin.connect() as connection:
        left = connection.execute(
            text("SELECT datname FROM pg_database WHERE datname = ANY(:names)"),
            {"names": list(names)},
        ).all()
    admin.dispose()
    assert left == []
