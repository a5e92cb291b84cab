"""Requests the replica tests make: support sets, adaptations, predictions of every version."""

from __future__ import annotations

import math
from typing import Any

import httpx

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
