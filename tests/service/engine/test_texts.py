"""The encode stage of text meta-models: the embedding cache (an LRU by bytes), texts
encoded once and then served from it, one encoder pass for the adaptations and
predictions of different clients queued together, and embeddings equal to the
encoder's own, text by text."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest
import torch

from models.checkpoint import MetaModel
from models.encoder import EncoderSpec, SentenceEncoder, shared
from models.params import from_bytes
from service import requests
from service.engine import Adapted, Engine, EngineConfig, PredictJob
from service.engine.texts import ENTRY_OVERHEAD, EmbeddingCache
from tests.service.engine.helpers import settings
from tests.service.text_fixtures import INTENTS, LABELS, QUERIES, TEXTS

CONFIG = EngineConfig(device="cpu", threads=1)
WARM_UP = ["warm up", "a second, longer text to warm up with"]  # TextStage.warm_up's
OTHER_TEXTS = [
    "cancel my order",
    "i want to cancel the order i placed",
    "where is my package",
    "track my parcel please",
]
OTHER_LABELS = ["cancel", "cancel", "track", "track"]


# -- the cache ---------------------------------------------------------------------------------
def vectors(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))  # (n, 4)


def test_the_embedding_cache_is_an_lru_bounded_by_bytes() -> None:
    entry = 4 * 4 + 2 + ENTRY_OVERHEAD  # a (4,) float32 vector, a 2-character text
    cache = EmbeddingCache(capacity_bytes=2 * entry)
    v = vectors(3)
    cache.put("sha", ["t0", "t1"], v[:2])
    assert torch.equal(cache.get("sha", ["t0"])[0], v[0])  # t0 is now the most recent
    cache.put("sha", ["t2"], v[2:])  # over the budget: the least recently used goes
    found = cache.get("sha", ["t0", "t1", "t2"])
    assert found[1] is None
    assert torch.equal(found[0], v[0]) and torch.equal(found[2], v[2])
    assert cache.get("other-encoder", ["t0"]) == [None]  # keyed by the encoder too
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.capacity_bytes) == (2, 2 * entry, 2 * entry)
    assert (stats.hits, stats.misses) == (3, 2)
    cache.get("sha", ["t0", "nope"], count=False)  # the encode pass's lookups: not counted
    assert (cache.stats().hits, cache.stats().misses) == (3, 2)

    longer = "t" * 40  # a longer text costs its characters: it pushes both others out
    cache.put("sha", [longer], vectors(1, seed=1))
    assert cache.get("sha", ["t0", "t2"], count=False) == [None, None]
    assert cache.stats().bytes == 4 * 4 + 40 + ENTRY_OVERHEAD
    cache.put("sha", ["t" * 1000], vectors(1, seed=2))  # bigger than the budget: not kept
    assert cache.stats().entries == 1
    cache.put("sha", [longer], vectors(1, seed=3))  # known: kept as it was
    assert torch.equal(cache.get("sha", [longer])[0], vectors(1, seed=1)[0])


# -- the engine --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def intents() -> MetaModel:
    return MetaModel.load(INTENTS)


@pytest.fixture(scope="module")
def encoder(intents: MetaModel) -> SentenceEncoder:
    """The process's encoder of the pinned spec: every engine of the module shares it."""
    return shared(EncoderSpec.from_dict(intents.config.task["encoder"]), "cpu")


@pytest.fixture
def calls(encoder: SentenceEncoder, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every ``encode`` call's texts, warm-ups left out."""
    seen: list[list[str]] = []
    original = encoder.encode

    def encode(texts: Any, batch_size: int = 64) -> torch.Tensor:
        if list(texts) != WARM_UP:
            seen.append(list(texts))
        return original(texts, batch_size)

    monkeypatch.setattr(encoder, "encode", encode)
    return seen


@pytest.fixture
def engine(intents: MetaModel) -> Iterator[Engine]:
    engine = Engine({"intents": intents}, CONFIG)
    engine.start()
    yield engine
    engine.stop()


def adapt_job(model: MetaModel, texts: list[str], labels: list[str], tenant: str = "t") -> Any:
    return requests.adaptation(
        model=model, settings=settings(), inputs=texts, targets=labels, tenant=tenant
    ).job


def texts(model: MetaModel, inputs: list[str]) -> Any:
    return requests.model_inputs(model, inputs, field="inputs", settings=settings())


def test_texts_seen_before_are_not_encoded_again(
    engine: Engine, intents: MetaModel, calls: list[list[str]]
) -> None:
    job = adapt_job(intents, TEXTS, LABELS)
    support = list(job.inputs)  # the texts, and the labels' names (task.label_examples)
    first = engine.submit_adapt(job).result(60)
    assert calls == [sorted(set(support))]  # one pass, each text once
    again = engine.submit_adapt(adapt_job(intents, TEXTS, LABELS)).result(60)  # a readapt
    assert calls == [sorted(set(support))]  # nothing encoded: every text was cached
    assert again.params == first.params
    predict = PredictJob(
        intents.version, ("t", "c", "uid"), texts(intents, [TEXTS[0], *QUERIES]), first.params
    )
    engine.submit_predict(predict).result(60)
    assert calls[1:] == [sorted(QUERIES)]  # only the new ones
    stats = engine.stats().texts
    assert (stats.passes, stats.encoded) == (2, len(support) + len(QUERIES))
    assert stats.hits == len(support) + 1  # the readapt's texts, and the query seen before
    assert stats.misses == len(support) + len(QUERIES)
    assert stats.entries == len(support) + len(QUERIES)


def test_a_tenant_never_finds_another_tenants_texts_in_the_cache(
    engine: Engine, intents: MetaModel, calls: list[list[str]]
) -> None:
    """Were the cache shared, a tenant could time its requests to learn which texts
    another tenant sent."""
    first = engine.submit_adapt(adapt_job(intents, TEXTS, LABELS, tenant="a")).result(60)
    again = engine.submit_adapt(adapt_job(intents, TEXTS, LABELS, tenant="b")).result(60)
    assert len(calls) == 2 and calls[1] == calls[0]  # b's texts encoded anew
    assert again.params == first.params  # to the same embeddings
    hits = engine.stats().texts.hits
    inputs = texts(intents, [TEXTS[0]])
    engine.submit_predict(PredictJob(intents.version, ("a", "c", "u1"), inputs, first.params))
    assert engine.stats().texts.hits == hits + 1  # a's own text: cached
    engine.submit_predict(PredictJob(intents.version, ("c", "c", "u2"), inputs, first.params))
    assert engine.stats().texts.hits == hits + 1 and calls[-1] == [TEXTS[0]]  # c's: encoded


def test_adaptations_and_predictions_of_different_clients_share_one_encoder_pass(
    engine: Engine, intents: MetaModel, encoder: SentenceEncoder, calls: list[list[str]]
) -> None:
    reference = engine.submit_adapt(adapt_job(intents, TEXTS, LABELS)).result(60)
    other = engine.submit_adapt(adapt_job(intents, OTHER_TEXTS, OTHER_LABELS)).result(60)
    calls.clear()

    queued = Engine({"intents": intents}, CONFIG)  # not started: its jobs wait in the queue
    try:
        a_job = adapt_job(intents, TEXTS, LABELS)
        b_job = adapt_job(intents, OTHER_TEXTS, OTHER_LABELS)
        a = queued.submit_adapt(a_job)
        b = queued.submit_adapt(b_job)
        inputs = [*QUERIES, OTHER_TEXTS[0]]
        c = queued.submit_predict(
            PredictJob(intents.version, ("t", "c", "u1"), texts(intents, inputs), other.params)
        )
        futures: list[Future[Any]] = [a, b, c]
        queued.start()
        results = [f.result(60) for f in futures]
        distinct = sorted(set(a_job.inputs) | set(b_job.inputs) | set(QUERIES))
        assert calls == [distinct]  # one pass for the three jobs, each text once
        stats = queued.stats()
        assert (stats.texts.passes, stats.texts.encoded) == (1, len(distinct))
        assert stats.worker.batch_sizes["encode"] == {3: 1}  # one batch of three jobs

        # the same answers as each job alone
        for adapted, alone in ((results[0], reference), (results[1], other)):
            assert isinstance(adapted, Adapted)
            for name, tensor in from_bytes(alone.params).items():
                torch.testing.assert_close(from_bytes(adapted.params)[name], tensor)
        job = PredictJob(intents.version, ("t", "c", "u2"), texts(intents, inputs), other.params)
        torch.testing.assert_close(
            torch.tensor(results[2]), torch.tensor(engine.submit_predict(job).result(60))
        )

        # the embeddings the engine keeps are the encoder's own, text by text (no padding)
        sha = queued.texts.prepare(EncoderSpec.from_dict(intents.config.task["encoder"]))
        found = queued.texts.cache.get(f"{sha}/t", distinct)  # tenant t's
        kept = torch.stack([v for v in found if v is not None])
        assert kept.shape == (len(distinct), 384)
        alone_each = torch.cat([encoder.encode([t]) for t in distinct])
        torch.testing.assert_close(kept, alone_each, atol=1e-5, rtol=0)
    finally:
        queued.stop()


def test_an_idle_engine_encodes_in_the_callers_thread(
    engine: Engine, intents: MetaModel, calls: list[list[str]]
) -> None:
    """No job queued, the device free: the texts are encoded and the prediction run in the
    submitting thread (a done future), as predictions of numbers are; not on a loop."""
    first = engine.submit_adapt(adapt_job(intents, TEXTS, LABELS)).result(60)
    job = PredictJob(
        intents.version, ("t", "c", "u"), texts(intents, ["fly me home"]), first.params
    )
    future = engine.submit_predict(job)
    assert future.done() and calls[-1] == ["fly me home"]
    looped = PredictJob(intents.version, ("t", "c", "u"), texts(intents, ["new one"]), first.params)
    queued = engine.submit_predict(looped, on_loop=True)  # an event loop never encodes
    queued.result(60)
    assert calls[-1] == ["new one"] and engine.stats().worker.batch_sizes["encode"][1] >= 3
