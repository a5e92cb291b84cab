"""The client library with a text meta-model on a real server (``intents``, the shipped
artifact on the pinned encoder): the README's text example as written, the lifecycle
(readapt, examples, rollback) keeping the out-of-scope threshold, the async client, bad
texts as ``InvalidInput`` naming the field. And no model hub: the servers run with the
hub and every proxy pointed at a listener (``conftest.Hub``) that nothing ever reaches."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastadapt_client import AsyncClient, Client, InvalidInput

from tests.client.conftest import Hub, Live

README = Path(__file__).resolve().parents[2] / "clients" / "python" / "README.md"
MARKER = "<!-- text example: tests/client/test_text_live.py runs this block -->"
TEXTS = [
    "book a flight to paris",
    "i need a plane ticket to tokyo",
    "what is my account balance",
    "how much money do i have in checking",
    "play some music",
    "put on my favourite song",
]
LABELS = ["flight", "flight", "balance", "balance", "music", "music"]


def readme_example() -> str:
    """The Python block after the README's marker."""
    after = README.read_text().split(MARKER, 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def assert_no_hub(hub: Hub) -> None:
    assert hub.errors == []
    assert hub.connections == [], "a server reached the model hub (or a proxy)"


def test_the_readme_s_text_example_runs_as_written(live: Live, hub: Hub) -> None:
    client_id = f"bot-{uuid.uuid4().hex[:8]}"
    code = readme_example()
    assert 'Client("http://127.0.0.1:8000")' in code and '"bot"' in code
    code = code.replace('Client("http://127.0.0.1:8000")', "Client(URL, api_key=KEY)")
    code = code.replace('"bot"', repr(client_id))
    scope: dict[str, Any] = {"Client": Client, "URL": live.url, "KEY": live.key}
    exec(compile(code, str(README), "exec"), scope)

    assert scope["bot"].labels == ["flight", "balance", "music"]
    assert scope["bot"].out_of_scope_threshold == 0.5
    answers = scope["answers"].predictions
    assert answers[0].label == "flight"
    for p in answers:
        assert p.in_scope is not None and 0.0 < p.in_scope < 1.0
        assert (p.label is None) == (p.in_scope < 0.5)
    assert scope["anyway"].predictions[0].label in ("flight", "balance", "music")
    with Client(live.url, api_key=live.key) as api:
        history = api.history(client_id).versions
    assert [(v.origin, v.support_size, v.out_of_scope_threshold) for v in history] == [
        ("adapt", 6, 0.5),
        ("examples", 7, 0.5),
    ]
    assert_no_hub(hub)


def test_text_clients_through_their_lifecycle_sync_and_async(live: Live, hub: Hub) -> None:
    client_id = f"intents-{uuid.uuid4().hex[:8]}"
    with Client(live.url, api_key=live.key) as api:
        first = api.adapt(
            client_id,
            meta_model="intents",
            inputs=TEXTS,
            targets=LABELS,
            out_of_scope_threshold=1.0,  # nothing is in scope enough: every label None
        )
        query = ["book a flight to rome"]
        assert api.predict(client_id, inputs=query).predictions[0].label is None
        anyway = api.predict(client_id, inputs=query, out_of_scope_threshold=0.0)
        assert anyway.predictions[0].label == "flight"
        again = api.readapt(client_id, out_of_scope_threshold=0.0)
        assert (again.origin, again.out_of_scope_threshold) == ("readapt", 0.0)
        assert api.predict(client_id, inputs=query).predictions[0].label == "flight"
        back = api.rollback(client_id, version=first.version)
        assert (back.origin, back.out_of_scope_threshold) == ("rollback", 1.0)
        with pytest.raises(InvalidInput) as refused:
            api.predict(client_id, inputs=["   "])
        assert refused.value.message.startswith("inputs[0]: ")
        with pytest.raises(InvalidInput) as single:
            api.adapt(client_id, meta_model="intents", inputs=TEXTS[:2], targets=LABELS[:2])
        assert single.value.message.startswith("support.targets: a single label")

    async def predict() -> Any:
        async with AsyncClient(live.url, api_key=live.key) as api:
            return await api.predict(client_id, inputs=query, out_of_scope_threshold=0.0)

    answered = asyncio.run(predict())
    assert (answered.version, answered.predictions[0].label) == (back.version, "flight")
    assert_no_hub(hub)


def test_the_hub_stand_in_records_whatever_reaches_it() -> None:
    """So that its empty record above means something."""
    stand_in = Hub()
    try:
        with socket.create_connection(("127.0.0.1", int(stand_in.url.rsplit(":", 1)[1])), 5):
            pass
        deadline = time.monotonic() + 5
        while not stand_in.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(stand_in.connections) == 1 and stand_in.errors == []
        assert set(stand_in.env()) >= {"HF_ENDPOINT", "HTTPS_PROXY", "https_proxy"}
    finally:
        stand_in.close()
