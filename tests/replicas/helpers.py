"""Requests the replica tests make: support sets, adaptations, predictions of every version,
and ``Burst``, threads adapting without pause while a test stops a process."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx

from tests.live import Replica

QUERIES = [[-4.0], [-1.5], [0.0], [0.5], [3.0]]


def body(seed: int) -> dict[str, Any]:
    """An adaptation request: six points of a sinusoid that depends on ``seed``."""
    amplitude, phase = 1.0 + (seed % 7) * 0.5, (seed % 5) * 0.6
    xs = [-4.5, -3.0, -1.0, 0.5, 2.0, 4.0]
    ys = [amplitude * math.sin(x - phase) for x in xs]
    return {"meta_model": "sinusoid", "support": {"inputs": [[x] for x in xs], "targets": ys}}


def adapt(client: httpx.Client, client_id: str, seed: int) -> httpx.Response:
    return client.post(f"/v1/clients/{client_id}/adaptations", json=body(seed))


def predict(client: httpx.Client, client_id: str, version: int | None = None) -> Any:
    """The predictions on QUERIES of ``version`` (default: the current one); asserts a 200."""
    request: dict[str, Any] = {"inputs": QUERIES}
    if version is not None:
        request["version"] = version
    response = client.post(f"/v1/clients/{client_id}/predictions", json=request)
    assert response.status_code == 200, response.text
    return response.json()


def versions(client: httpx.Client, client_id: str) -> list[int]:
    """The client's stored versions, oldest first ([] for an unknown client)."""
    response = client.get(f"/v1/clients/{client_id}")
    if response.status_code == 404:
        return []
    assert response.status_code == 200, response.text
    return sorted(entry["version"] for entry in response.json()["versions"])


def snapshot(client: httpx.Client, client_ids: list[str]) -> dict[tuple[str, int], Any]:
    """Every stored version's predictions; asserts each version predicts (it is complete)."""
    return {
        (client_id, version): predict(client, client_id, version)["predictions"]
        for client_id in client_ids
        for version in versions(client, client_id)
    }


class Burst:
    """Threads that adapt ``clients`` on one replica until stopped or refused, recording
    every acknowledged (201) version and every other answer with its Retry-After."""

    def __init__(
        self, replica: Replica, key: str, clients: Sequence[str], threads: int = 4
    ) -> None:
        self.clients = list(clients)
        self.acked: list[tuple[str, int]] = []
        self.acked_at: list[float] = []  # time.monotonic() of each acknowledgement
        self.refused: list[tuple[int, str | None]] = []  # other answers: (status, Retry-After)
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._client = replica.client(key)
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]

    @property
    def statuses(self) -> list[int]:
        """The answers other than 201, by status."""
        return [status for status, _ in self.refused]

    def __enter__(self) -> Burst:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(60)
        self._client.close()

    def wait_for_acks(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < count:
            assert time.monotonic() < deadline, f"only {len(self.acked)} acknowledged"
            time.sleep(0.01)

    def _run(self, index: int) -> None:
        seed = index * 1000
        while not self.stop.is_set():
            client_id = self.clients[seed % len(self.clients)]
            seed += 1
            try:
                response = adapt(self._client, client_id, seed)
            except httpx.TransportError:  # the replica went away: not acknowledged
                return
            with self._lock:
                if response.status_code == 201:
                    self.acked.append((client_id, response.json()["version"]))
                    self.acked_at.append(time.monotonic())
                else:
                    self.refused.append((response.status_code, response.headers.get("retry-after")))
