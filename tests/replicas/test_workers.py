"""``fastadapt serve --workers 2`` on PostgreSQL: two front processes on one port and one
engine process. The engine process killed (SIGKILL) under load, three times here
(``benchmarks/bench_engine_faults.py`` runs five rounds and prints them): every failure
is a 503 with Retry-After, no acknowledged version is lost, ``/readyz`` says 503 while it
is away, and the same fronts serve again once it is back. A killed front is started
again; SIGTERM stops the fronts, then the engine, and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.live import Replica
from tests.replicas.conftest import Deployment
from tests.replicas.helpers import Burst, adapt, predict, snapshot, versions

CLIENTS = ["workers-0", "workers-1", "workers-2"]
ROUNDS = 3  # benchmarks/bench_engine_faults.py runs five, and prints them


def children(replica: Replica) -> dict[str, list[int]]:
    """The server's child processes by role: {"_front": [pids], "_engine": [pid]}."""
    assert replica.process is not None
    out = subprocess.run(
        ["ps", "-o", "pid=,args=", "--ppid", str(replica.process.pid)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    found: dict[str, list[int]] = {"_front": [], "_engine": []}
    for line in out.splitlines():
        pid, args = line.split(maxsplit=1)
        for role in found:
            if f" {role} " in f" {args} ":
                found[role].append(int(pid))
    return found


def wait_for(condition: object, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def workers(deployment: Deployment) -> Iterator[Replica]:
    """One server for the module's tests, in order: the last one stops it."""
    server = deployment.replica("workers", workers="2")
    server.start().wait_ready()
    try:
        yield server
    finally:
        server.kill()


def test_fronts_share_one_engine_and_metrics_add_up(
    workers: Replica, deployment: Deployment
) -> None:
    roles = children(workers)
    assert len(roles["_front"]) == 2 and len(roles["_engine"]) == 1
    with workers.client(deployment.admin_key) as client:
        before = client.get("/v1/engine/stats").json()["adapt"]["jobs"]
        for i in range(8):  # fresh connections: the kernel hands them to either front
            with workers.client(deployment.key) as one:
                assert adapt(one, f"shared-{i}", i).status_code == 201
                predict(one, f"shared-{i}")
        stats = client.get("/v1/engine/stats").json()
        assert stats["adapt"]["jobs"] - before == 8  # one engine ran every front's jobs
        assert stats["cache"]["hits"] >= 8  # each front's first prediction: cached by adapt
        metrics = client.get("/metrics").text
    served = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("fastadapt_http_requests_total{")
        and 'route="/v1/clients/{client_id}/adaptations"' in line
        and 'status="201"' in line
    ]
    assert sum(served) >= 8  # counted by both fronts, merged
    assert "fastadapt_engine_batch_size_bucket" in metrics
    assert "fastadapt_adaptation_seconds_count" in metrics  # from the engine process


def test_the_engine_process_killed_under_load_loses_no_acknowledged_version(
    workers: Replica, deployment: Deployment
) -> None:
    fronts = sorted(children(workers)["_front"])
    with workers.client(deployment.key) as reader:
        before = snapshot(reader, CLIENTS)
        for _ in range(ROUNDS):
            engine = children(workers)["_engine"]
            with Burst(workers, deployment.key, CLIENTS) as load:
                load.wait_for_acks(3)
                os.kill(engine[0], signal.SIGKILL)
                wait_for(lambda load=load: len(load.refused) >= 1, 30)
                assert reader.get("/readyz").status_code == 503  # away: not ready
                wait_for(lambda old=engine: children(workers)["_engine"] not in ([], old), 30)
                workers.wait_ready(120)
                load.wait_for_acks(len(load.acked) + 1)  # serving again
            assert {status for status, _ in load.refused} == {503}, load.refused
            assert all(after == "1" for _, after in load.refused), load.refused
            after = snapshot(reader, CLIENTS)  # every stored version predicts
            assert set(load.acked) <= after.keys()
            for client_id in CLIENTS:
                stored = versions(reader, client_id)
                assert stored == list(range(1, len(stored) + 1))
            assert {key: after[key] for key in before} == before
            before = after
    assert sorted(children(workers)["_front"]) == fronts  # the fronts were never restarted


def test_a_killed_front_is_restarted_and_sigterm_stops_fronts_then_engine(
    workers: Replica, deployment: Deployment
) -> None:
    first = children(workers)["_front"]
    os.kill(first[0], signal.SIGKILL)
    wait_for(lambda: len(set(children(workers)["_front"]) - set(first)) == 1, 60)
    workers.wait_ready(120)
    with workers.client(deployment.key) as client:
        for i in range(4):
            assert adapt(client, "after-front", i).status_code == 201
    with Burst(workers, deployment.key, CLIENTS, threads=4) as load:
        load.wait_for_acks(3)
        code = workers.terminate()
        load.stop.set()
    assert code == 0, workers.tail()
    assert {status for status, _ in load.refused} <= {503}, load.refused
    log = workers.tail(40000)
    fronts_done = log.rfind("Finished server process")
    assert 0 <= fronts_done < log.rfind("fastadapt.workers: stopped")
    probe = httpx.Client(base_url=workers.url, timeout=2)
    with probe, pytest.raises(httpx.TransportError):  # nothing is left on the port
        probe.get("/healthz")
