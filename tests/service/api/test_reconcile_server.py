"""A reconcile across two real ``fastadapt serve`` processes on PostgreSQL: clients adapted
from artifact v1, servers restarted on v2 (same name, other weights), a job started with
``fastadapt reconcile``; one process is killed (-9) mid-job and restarted, predictions keep
answering 200 on the other throughout, and the job completes with each stale client
re-adapted exactly once, a client deleted after the job was created not resurrected, a
failing one listed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from models.checkpoint import MetaModel
from service.settings import packaged_models_dir
from service.store.session import connect, session_factory
from service.store.tables import JobItem
from tests.service.api.test_server import REPO, START_TIMEOUT_S, free_port
from tests.service.reconcile_fixtures import models_dir_with, perturbed_copy
from tests.service.store_fixtures import Databases

XS = [[-3.0], [-1.5], [-0.5], [1.0], [2.5]]
YS = [-0.1, -1.0, -1.4, 0.8, 1.9]
STALE = [f"c{i:02d}" for i in range(30)]
DEADLINE_S = 60.0


class Server:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.log = log
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    def ready(self) -> Server:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if self.http.get("/readyz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no shutdown, its claims stay held until the lease ends
        self.process.wait(30)
        self.http.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                raise
            # a clean shutdown, the reconcile runner stopped first
            assert code in (0, -signal.SIGTERM), self.log.read_text()
        self.http.close()


@contextmanager
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    try:
        yield started
    finally:
        for server in started:
            server.stop()


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def env(postgres_url: str, databases: Databases, tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FASTADAPT_")}
    return base | {
        "FASTADAPT_DATABASE_URL": databases.postgresql(postgres_url),
        "FASTADAPT_DATA_DIR": str(tmp_path / "data"),
        "FASTADAPT_THREADS": "1",
        "FASTADAPT_ACCESS_LOG": "false",
    }


def test_a_reconcile_survives_a_killed_process(env: dict[str, str], tmp_path: Path) -> None:
    shipped = packaged_models_dir() / "sinusoid"
    v1 = models_dir_with(tmp_path / "v1", {"sinusoid": shipped})
    v2 = tmp_path / "v2"
    target = perturbed_copy(shipped, v2 / "sinusoid")
    assert target != MetaModel.load(shipped).version
    cli(env, "migrate")
    log = tmp_path / "servers.log"
    support = {"inputs": XS, "targets": YS}
    with servers() as running:
        # the old release: no part in reconcile jobs (it would skip them: not its version)
        old_env = env | {"FASTADAPT_MODELS_DIR": str(v1), "FASTADAPT_RECONCILE_RATE": "0"}
        old = Server(old_env, log).ready()
        running.append(old)
        for i, client_id in enumerate([*STALE, "big"]):
            ys = [y + 0.05 * i for y in YS]
            body = {"meta_model": "sinusoid", "support": {"inputs": XS, "targets": ys}}
            if client_id == "big":  # 6 points: refused once the servers allow 5
                body["support"] = {"inputs": [*XS, [4.0]], "targets": [*ys, 0.5]}
            created = old.http.post(f"/v1/clients/{client_id}/adaptations", json=body)
            assert created.status_code == 201, created.text
        on_v2 = env | {
            "FASTADAPT_MODELS_DIR": str(v2),
            "FASTADAPT_MAX_SUPPORT": "5",
            "FASTADAPT_RECONCILE_RATE": "2",  # per process: the job lasts ~8 s
            "FASTADAPT_RECONCILE_POLL_S": "0.2",
            "FASTADAPT_RECONCILE_LEASE_S": "2",
            "FASTADAPT_RECONCILE_CLAIM": "2",
        }
        # the job is stored before any process runs it; then a client is deleted
        started = cli(on_v2, "reconcile", "sinusoid", "--tenant", "default")
        job_id = started.split()[1].rstrip(":")
        assert old.http.delete("/v1/clients/c29").status_code == 204
        old.stop()
        running.clear()

        a, b = Server(on_v2, log), Server(on_v2, log)
        running += [a.ready(), b.ready()]
        body = {"meta_model": "sinusoid", "support": support}
        assert b.http.post("/v1/clients/live/adaptations", json=body).status_code == 201

        statuses: list[int] = []
        stop = threading.Event()

        def predict() -> None:  # on b, throughout the job
            while not stop.is_set():
                answer = b.http.post("/v1/clients/live/predictions", json={"inputs": [[0.5]]})
                statuses.append(answer.status_code)
                time.sleep(0.02)

        predictor = threading.Thread(target=predict)
        predictor.start()
        try:
            job = wait_for(b, job_id, lambda j: j["done"] >= 2)
            assert job["state"] == "running", job
            a.kill()  # mid-job, holding claims
            running.remove(a)
            job = wait_for(b, job_id, lambda j: j["done"] >= 8)
            running.append(Server(on_v2, log).ready())  # restarted: it joins in again
            job = wait_for(b, job_id, lambda j: j["state"] == "done")
        finally:
            stop.set()
            predictor.join(30)

        assert statuses and set(statuses) == {200}, statuses
        assert (job["total"], job["done"], job["failed"], job["skipped"]) == (31, 29, 1, 1)
        problems = {p["client_id"]: p for p in job["problems"]}
        assert problems["big"]["state"] == "failed"
        assert problems["big"]["reason"].startswith("too_large")
        assert problems["c29"] == {
            "client_id": "c29",
            "state": "skipped",
            "reason": "the client was deleted",
        }
        assert b.http.get("/v1/clients/c29").status_code == 404  # not resurrected
        assert len(b.http.get("/v1/clients/big").json()["versions"]) == 1  # kept its version
        for client_id in STALE[:-1]:  # exactly one new version each, on v2
            history = b.http.get(f"/v1/clients/{client_id}").json()["versions"]
            assert [v["version"] for v in history] == [1, 2], client_id
            assert history[1]["meta_model_version"] == target
            answer = b.http.post(f"/v1/clients/{client_id}/predictions", json={"inputs": [[0.5]]})
            assert answer.status_code == 200, answer.text
        assert len(workers(env, job_id)) >= 2  # the processes shared the work


def wait_for(server: Server, job_id: str, condition: Any) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        job: dict[str, Any] = server.http.get(f"/v1/jobs/{job_id}").json()
        if condition(job):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def workers(env: dict[str, str], job_id: str) -> set[str]:
    """The processes that finished the job's items."""
    engine = connect(env["FASTADAPT_DATABASE_URL"])
    try:
        with session_factory(engine)() as session:
            stmt = select(JobItem.claimed_by).where(JobItem.job_id == job_id)
            return {str(w) for w in session.scalars(stmt)}
    finally:
        engine.dispose()
