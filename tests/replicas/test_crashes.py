"""Replicas stopped under load: killed (SIGKILL) in the middle of adaptations, five times, or
told to stop (SIGTERM) during a burst. Every acknowledged version is stored, complete and
predicts; an unacknowledged one is complete or absent; earlier versions never change."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.live import Replica
from tests.replicas.conftest import Deployment
from tests.replicas.helpers import Burst, snapshot, versions

CLIENTS = ["crash-0", "crash-1", "crash-2"]
ACKS_BEFORE_STOP = 3  # adaptations acknowledged in a round before the replica is stopped
ROUNDS = 5


@pytest.fixture
def witness(pair: tuple[Replica, Replica], deployment: Deployment) -> Iterator[httpx.Client]:
    """Replica B, which reads what the stopped replica wrote."""
    with pair[1].client(deployment.key) as client:
        yield client


def check_stored(
    reader: httpx.Client, acked: list[tuple[str, int]], before: dict[tuple[str, int], object]
) -> dict[tuple[str, int], object]:
    """Every acknowledged version is stored; every stored one predicts (snapshot asserts it);
    versions run 1..n without a gap; the versions of ``before`` predict exactly as before."""
    after = snapshot(reader, CLIENTS)
    assert set(acked) <= after.keys()
    for client_id in CLIENTS:
        stored = versions(reader, client_id)
        assert stored == list(range(1, len(stored) + 1))
    assert {key: after[key] for key in before} == before
    return after


def test_a_replica_killed_in_the_middle_of_adaptations_loses_no_acknowledged_version(
    deployment: Deployment, witness: httpx.Client
) -> None:
    victim = deployment.replica("killed")
    before = snapshot(witness, CLIENTS)
    victim.start().wait_ready()
    try:
        for _ in range(ROUNDS):
            with Burst(victim, deployment.key, CLIENTS) as burst:
                burst.wait_for_acks(ACKS_BEFORE_STOP)
                victim.kill()
            assert set(burst.statuses) <= {503}, burst.statuses
            victim.start().wait_ready()  # restarted: it reads what was stored
            with victim.client(deployment.key) as restarted:
                before = check_stored(restarted, burst.acked, before)
        assert snapshot(witness, CLIENTS) == before  # and B reads the same, bit for bit
    finally:
        victim.terminate()


def test_sigterm_during_a_burst_finishes_in_flight_requests_and_exits_0(
    deployment: Deployment, witness: httpx.Client
) -> None:
    victim = deployment.replica("terminated", shutdown_timeout_s="30")
    before = snapshot(witness, CLIENTS)
    victim.start().wait_ready()
    try:
        with Burst(victim, deployment.key, CLIENTS, threads=8) as burst:
            burst.wait_for_acks(ACKS_BEFORE_STOP)
            signalled = time.monotonic()
            code = victim.terminate()
    finally:
        victim.kill()  # (already stopped unless the test failed)
    assert code == 0, victim.tail()
    assert any(at > signalled for at in burst.acked_at)  # in flight at SIGTERM: finished
    assert set(burst.statuses) <= {503}, burst.statuses  # draining: 503, never a 5xx else
    check_stored(witness, burst.acked, before)
    assert "Shutting down" in victim.tail(20000)
