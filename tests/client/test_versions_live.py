"""The client library's version methods against a real server, sync and async: listing
clients and versions across pages, rollback and added examples."""

from __future__ import annotations

import asyncio

import pytest
from fastadapt_client import AsyncClient, Client, ClientSummary, InvalidInput, NotFound

from tests.client.test_live import QUERIES, SUPPORT_X, SUPPORT_Y, api, new_id

__all__ = ["api"]  # the fixture, imported


def test_list_versions_rollback_and_examples(api: Client) -> None:
    ids = sorted(new_id("lister") for _ in range(3))
    for client_id in ids:
        api.adapt(client_id, meta_model="sinusoid", inputs=SUPPORT_X, targets=SUPPORT_Y)
    listed = [c for c in api.list_clients(page_size=1) if c.client_id in ids]
    assert [c.client_id for c in listed] == ids  # across three or more pages, in order
    assert all(isinstance(c, ClientSummary) and c.current_version == 1 for c in listed)
    page = api.clients_page(meta_model="sinusoid", limit=1)
    assert len(page.clients) == 1 and page.next_cursor is not None
    assert not [c for c in api.list_clients(stale=True) if c.client_id in ids]

    alice = ids[0]
    first = api.predict(alice, inputs=QUERIES)
    api.adapt(alice, meta_model="sinusoid", inputs=SUPPORT_X, targets=[-y for y in SUPPORT_Y])
    back = api.rollback(alice, version=1)
    assert (back.version, back.origin, back.source_version) == (3, "rollback", 1)
    assert api.predict(alice, inputs=QUERIES).predictions == first.predictions
    with pytest.raises(NotFound):
        api.rollback(alice, version=99)

    added = api.add_examples(alice, inputs=[[0.25], [-2.0]], targets=[0.3, -0.9])
    assert (added.version, added.origin, added.source_version) == (4, "examples", 3)
    assert added.support_size == len(SUPPORT_X) + 2
    with pytest.raises(InvalidInput) as caught:
        api.add_examples(alice, inputs=[[0.25]], targets=["a label"])
    assert "targets[0]" in str(caught.value)

    versions = list(api.versions(alice, page_size=3))
    assert [(v.version, v.origin) for v in versions] == [
        (4, "examples"),
        (3, "rollback"),
        (2, "adapt"),
        (1, "adapt"),
    ]
    first_page = api.versions_page(alice, limit=3)
    assert first_page.current_version == 4 and first_page.next_cursor is not None
    for client_id in ids:
        api.delete(client_id)


def test_the_async_client_lists_rolls_back_and_adds_examples(base_url: str, api_key: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(base_url, api_key=api_key) as api:
            bob = new_id("bob")
            await api.adapt(bob, meta_model="sinusoid", inputs=SUPPORT_X, targets=SUPPORT_Y)
            await api.adapt(bob, meta_model="sinusoid", inputs=SUPPORT_X, targets=SUPPORT_Y[::-1])
            listed = [c.client_id async for c in api.list_clients(page_size=2)]
            assert bob in listed and listed == sorted(listed)
            assert len((await api.clients_page(limit=1)).clients) == 1
            back = await api.rollback(bob, version=1)
            assert (back.version, back.source_version) == (3, 1)
            added = await api.add_examples(bob, inputs=[[1.5]], targets=[0.5])
            assert (added.version, added.origin) == (4, "examples")
            versions = [v.version async for v in api.versions(bob, page_size=1)]
            assert versions == [4, 3, 2, 1]
            assert (await api.versions_page(bob, limit=4)).next_cursor is None
            await api.delete(bob)
            with pytest.raises(NotFound):
                await api.versions_page(bob)

    asyncio.run(scenario())
