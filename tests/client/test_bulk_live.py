"""The client library's bulk calls against a real server, sync and async: one result per
item, in order, a failed item as a ``BulkItemFailure`` rather than an exception."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from fastadapt_client import (
    AdaptResponse,
    AsyncClient,
    BulkItemFailure,
    BulkPredictionItem,
    Client,
    InvalidInput,
    PredictionResponse,
)

from tests.client.test_live import QUERIES, SUPPORT_X, SUPPORT_Y, new_id


@pytest.fixture
def api(base_url: str, api_key: str) -> Iterator[Client]:
    with Client(base_url, api_key=api_key) as client:
        yield client


def support(scale: float) -> dict[str, list[list[float]] | list[float]]:
    return {"inputs": SUPPORT_X, "targets": [scale * y for y in SUPPORT_Y]}


def test_adapt_batch_then_predict_batch(api: Client) -> None:
    a, b, unknown = new_id("bulk-a"), new_id("bulk-b"), new_id("bulk-none")
    made = api.adapt_batch(
        [
            {"client_id": a, "meta_model": "sinusoid", "support": support(1.0)},
            {"client_id": b, "meta_model": "sinusoid", "support": support(-1.0)},
            {"client_id": a, "meta_model": "sinusoid", "support": support(2.0)},
        ]
    )
    assert (made.succeeded, made.failed) == (2, 1)
    first, second, repeated = made.results
    assert isinstance(first, AdaptResponse) and first.client_id == a and first.version == 1
    assert isinstance(second, AdaptResponse) and second.client_id == b
    assert isinstance(repeated, BulkItemFailure) and repeated.error.status == 422
    assert repeated.error.message.startswith("adaptations[2].client_id")
    answered = api.predict_batch(
        [
            BulkPredictionItem(client_id=b, inputs=QUERIES),
            {"client_id": unknown, "inputs": QUERIES},
            {"client_id": a, "inputs": QUERIES, "version": 1},
        ]
    )
    mine, missing, pinned = answered.results
    assert isinstance(mine, PredictionResponse) and mine.version_id == second.version_id
    assert mine.predictions == pytest.approx(api.predict(b, inputs=QUERIES).predictions, abs=1e-6)
    assert isinstance(missing, BulkItemFailure) and missing.error.type == "not_found"
    assert isinstance(pinned, PredictionResponse) and pinned.version == 1


def test_a_bad_bulk_request_raises(api: Client) -> None:
    with pytest.raises(InvalidInput):
        api.predict_batch([])


def test_the_async_client_has_the_bulk_calls(base_url: str, api_key: str) -> None:
    async def scenario() -> None:
        client_id = new_id("bulk-async")
        async with AsyncClient(base_url, api_key=api_key) as api:
            made = await api.adapt_batch(
                [{"client_id": client_id, "meta_model": "sinusoid", "support": support(1.0)}]
            )
            assert made.succeeded == 1
            answered = await api.predict_batch([{"client_id": client_id, "inputs": QUERIES}])
            (result,) = answered.results
            assert isinstance(result, PredictionResponse) and len(result.predictions) == 4

    asyncio.run(scenario())
