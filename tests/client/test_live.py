"""The client library against a real server: the sync and async paths through adapt
(numbers, and PNG images with string labels), predict, history, readapt and delete, and
the server's errors as exceptions."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastadapt_client import (
    APIError,
    AsyncClient,
    ClassPrediction,
    Client,
    FastAdaptError,
    InvalidInput,
    NotFound,
    TransportError,
    Unauthorized,
)
from PIL import Image

from tests.service.api.test_server import free_port

SUPPORT_X = [[-3.0], [-0.5], [1.0], [2.5]]
SUPPORT_Y = [-0.1, -1.4, 0.8, 1.9]
QUERIES = [[-4.9], [0.0], [0.7], [3.14159]]


def new_id(prefix: str) -> str:
    """A client id of its own per test (the server lives for the whole session)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def png(kind: str, size: int = 105) -> bytes:
    """Black strokes on white paper: a horizontal bar, a vertical bar or a diagonal."""
    image = np.full((size, size), 255, dtype=np.uint8)
    third = slice(size // 3, 2 * size // 3)
    if kind == "h":
        image[size // 2 - 6 : size // 2 + 6, third] = 0
    elif kind == "v":
        image[third, size // 2 - 6 : size // 2 + 6] = 0
    else:
        for i in range(size // 4, 3 * size // 4):
            image[i, max(i - 6, 0) : i + 6] = 0
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def api(base_url: str, api_key: str) -> Iterator[Client]:
    with Client(base_url, api_key=api_key) as client:
        yield client


def test_the_server_refuses_a_missing_or_unknown_key(base_url: str) -> None:
    for key in (None, "fa_" + "x" * 43):
        with Client(base_url, api_key=key) as stranger, pytest.raises(Unauthorized) as refused:
            stranger.list_meta_models()
        assert (refused.value.status, refused.value.type) == (401, "unauthorized")


def test_meta_models(api: Client) -> None:
    names = {m.name: m for m in api.list_meta_models()}
    assert {"sinusoid", "omniglot"} <= set(names)
    omniglot = api.get_meta_model("omniglot")
    assert omniglot == names["omniglot"]
    assert omniglot.accepts_images and omniglot.task_kind == "classification"
    assert omniglot.input_shape == [1, 28, 28] and omniglot.max_way == 20
    assert not names["sinusoid"].accepts_images and names["sinusoid"].max_way is None


def test_numbers_adapt_predict_history_readapt_delete(
    api: Client, base_url: str, api_key: str
) -> None:
    alice = new_id("alice")
    first = api.adapt(alice, meta_model="sinusoid", inputs=SUPPORT_X, targets=SUPPORT_Y)
    assert (first.client_id, first.version, first.support_size) == (alice, 1, 4)
    sinusoid = api.get_meta_model("sinusoid")
    assert first.labels is None and first.inner_steps == sinusoid.inner_steps
    assert first.inner_lr is None and sinusoid.learned_lr != "none"  # learned rates
    assert first.support_loss_after < first.support_loss_before

    second = api.adapt(
        alice,
        meta_model="sinusoid",
        inputs=np.array(SUPPORT_X),  # numpy arrays go as lists
        targets=np.array(SUPPORT_Y),
        inner_steps=9,
    )
    assert (second.version, second.inner_steps) == (2, 9)

    current = api.predict(alice, inputs=QUERIES)
    old = api.predict(alice, inputs=QUERIES, version=1)
    assert (current.version, old.version) == (2, 1)
    assert len(current.predictions) == len(QUERIES)
    assert current.predictions != old.predictions
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=base_url, headers=headers) as raw:  # the same numbers as the JSON
        body = {"inputs": QUERIES, "version": 1}
        assert raw.post(f"/v1/clients/{alice}/predictions", json=body).json() == old.model_dump()

    history = api.history(alice)
    assert history.client_id == alice and history.current_version == 2
    assert [v.version for v in history.versions] == [1, 2]
    assert [v.inner_steps for v in history.versions] == [sinusoid.inner_steps, 9]

    again = api.readapt(alice, version=1, inner_steps=9)
    assert again.version == 3 and again.support_size == 4
    assert api.predict(alice, inputs=QUERIES).predictions == current.predictions
    assert api.readapt(alice).version == 4  # the current version's support set, defaults

    assert api.delete(alice) is None
    with pytest.raises(NotFound) as missing:
        api.history(alice)
    assert missing.value.status == 404 and missing.value.type == "not_found"


def test_an_adaptation_retried_with_its_key_is_done_once(api: Client) -> None:
    """A retry of the same logical call (the same Idempotency-Key, as the client's own
    retries send) answers the first version; a new call adapts anew."""
    client_id = new_id("retry")
    key = uuid.uuid4().hex
    first = api.adapt(
        client_id, meta_model="sinusoid", inputs=SUPPORT_X, targets=SUPPORT_Y, idempotency_key=key
    )
    again = api.adapt(
        client_id, meta_model="sinusoid", inputs=SUPPORT_X, targets=SUPPORT_Y, idempotency_key=key
    )
    assert again == first
    assert [v.version_id for v in api.history(client_id).versions] == [first.version_id]
    with pytest.raises(InvalidInput, match="Idempotency-Key"):  # the key, another request
        api.adapt(
            client_id,
            meta_model="sinusoid",
            inputs=SUPPORT_X,
            targets=SUPPORT_Y[::-1],
            idempotency_key=key,
        )
    fresh = api.adapt(client_id, meta_model="sinusoid", inputs=SUPPORT_X, targets=SUPPORT_Y)
    assert fresh.version == 2 and fresh.version_id != first.version_id
    api.delete(client_id)


def test_png_images_from_paths_and_bytes_with_string_labels(api: Client, tmp_path: Path) -> None:
    images = {kind: png(kind) for kind in "hvd"}
    paths = []
    for kind, data in images.items():
        path = tmp_path / f"{kind}.png"
        path.write_bytes(data)
        paths.append(path)
    reader = new_id("reader")
    created = api.adapt(
        reader,
        meta_model="omniglot",
        images=[*paths, str(paths[0]), *(images[k] for k in "vd")],  # Path, str and bytes
        targets=["bar", "pole", "slash"] * 2,
    )
    assert created.labels == ["bar", "pole", "slash"] and created.support_size == 6

    by_bytes = api.predict(reader, images=[images[k] for k in "hvd"])
    by_path = api.predict(reader, images=paths)
    assert by_bytes == by_path
    for prediction in by_bytes.predictions:
        assert isinstance(prediction, ClassPrediction)
        assert prediction.label in ("bar", "pole", "slash")
        assert set(prediction.probabilities) == {"bar", "pole", "slash"}
        assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert [v.labels for v in api.history(reader).versions] == [["bar", "pole", "slash"]]
    api.delete(reader)


def test_errors_become_typed_exceptions(api: Client) -> None:
    ghost = new_id("ghost")
    for call in (
        lambda: api.history(ghost),
        lambda: api.predict(ghost, inputs=[[0.0]]),
        lambda: api.delete(ghost),
        lambda: api.readapt(ghost),
        lambda: api.get_meta_model("no-such-model"),
    ):
        with pytest.raises(NotFound) as caught:
            call()
        error = caught.value
        assert isinstance(error, APIError) and isinstance(error, FastAdaptError)
        assert (error.status, error.type) == (404, "not_found")
        assert error.message and (error.request_id is None or isinstance(error.request_id, str))

    with pytest.raises(InvalidInput) as unknown:
        api.adapt(ghost, meta_model="no-such-model", inputs=[[0.0]], targets=[1.0])
    assert unknown.value.status == 422 and unknown.value.type == "invalid_input"
    assert unknown.value.message.startswith("meta_model: unknown meta-model 'no-such-model'")

    with pytest.raises(InvalidInput) as labels:
        api.adapt(ghost, meta_model="sinusoid", inputs=[[0.0], [1.0]], targets=["a", "b"])
    assert labels.value.message.startswith("support.targets[0]:")
    assert "422 invalid_input: support.targets[0]" in str(labels.value)

    with pytest.raises(InvalidInput):  # an image meta-model given a row of numbers
        api.adapt(ghost, meta_model="omniglot", inputs=[[0.0]], targets=["a"])


def test_the_async_client_takes_the_same_path(base_url: str, api_key: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(base_url, api_key=api_key) as api:
            assert "sinusoid" in {m.name for m in await api.list_meta_models()}
            assert (await api.get_meta_model("sinusoid")).name == "sinusoid"

            bob = new_id("bob")
            first = await api.adapt(bob, meta_model="sinusoid", inputs=SUPPORT_X, targets=SUPPORT_Y)
            assert first.version == 1
            predicted = await api.predict(bob, inputs=QUERIES)
            assert predicted.version == 1 and len(predicted.predictions) == len(QUERIES)
            again = await api.readapt(bob, inner_steps=3)
            assert (again.version, again.inner_steps) == (2, 3)
            assert (await api.predict(bob, inputs=QUERIES, version=1)) == predicted
            history = await api.history(bob)
            assert [v.version for v in history.versions] == [1, 2]

            ann = new_id("ann")
            images = [png(k) for k in "hvdhvd"]
            labelled = await api.adapt(
                ann, meta_model="omniglot", images=images, targets=["h", "v", "d"] * 2
            )
            assert labelled.labels == ["h", "v", "d"]
            classes = await api.predict(ann, images=images[:3])
            assert all(isinstance(p, ClassPrediction) for p in classes.predictions)

            await api.delete(bob)
            await api.delete(ann)
            with pytest.raises(NotFound):
                await api.history(bob)
            with pytest.raises(NotFound):
                await api.predict(ann, images=images[:1])
            with pytest.raises(InvalidInput) as caught:
                await api.adapt(bob, meta_model="nope", inputs=[[0.0]], targets=[0.0])
            assert (caught.value.status, caught.value.type) == (422, "invalid_input")

    asyncio.run(scenario())


def test_no_server_is_a_transport_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    waits: list[float] = []
    with Client(url, sleep=waits.append) as api, pytest.raises(TransportError) as caught:
        api.history("alice")
    assert caught.value.status is None and caught.value.type == "transport"
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert waits == [0.5, 1.0]  # GET: retried twice, backing off
    waits.clear()
    with Client(url, sleep=waits.append) as api, pytest.raises(TransportError):
        api.predict("alice", inputs=[[0.0]])
    assert waits == []  # a POST without an Idempotency-Key: never retried after a lost connection
    with Client(url, sleep=waits.append) as api, pytest.raises(TransportError):
        api.adapt("alice", meta_model="sinusoid", inputs=[[0.0]], targets=[0.0])
    assert waits == [0.5, 1.0]  # adapt sends a key: retried as a GET is
