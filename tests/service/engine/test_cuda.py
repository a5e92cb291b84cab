"""The engine on CUDA against the engine on the CPU: the same jobs, the same answers
within float32's rounding; text jobs through the encoder too, in float32 and in half
precision (``encoder_half``, the default on CUDA).

Skipped without CUDA; ``scripts/gpu_check.sh`` runs them on a lent GPU, where only torch
and the encoder may be installed: so the jobs are built here directly (as
``service.requests`` would build them, without its settings) and no conftest fixture is
used (the script runs them with ``--noconftest``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from models.checkpoint import MetaModel
from models.evaluate import ARTIFACTS
from models.params import from_bytes
from service.engine import Adapted, AdaptJob, Engine, EngineConfig, PredictJob
from tests.service.tiny_models import tiny_meta_models

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

SUPPORT_TEXTS = {  # three intents of a client, three examples each; and its queries
    "weather": ["will it rain tomorrow", "how hot is it in Rome", "do I need a coat today"],
    "alarm": ["wake me up at 6", "set an alarm for noon", "alarm at half past seven please"],
    "music": ["play some jazz", "put on my workout playlist", "I want to hear the Beatles"],
}
QUERIES = ["is it going to snow this weekend", "play something relaxing", "wake me at 5:30"]


@contextmanager
def engines(meta_models: Mapping[str, MetaModel], **config: Any) -> Iterator[list[Engine]]:
    """A started engine on the CPU and one on CUDA, with the same settings."""
    started = []
    try:
        for device in ("cpu", "cuda"):
            engine = Engine(meta_models, EngineConfig(device=device, **config))
            engine.start()
            started.append(engine)
        yield started
    finally:
        for engine in started:
            engine.stop()


def run(engine: Engine, job: AdaptJob, queries: Any) -> tuple[Adapted, list[list[float]]]:
    """Adapt, then predict ``queries`` with the adapted params (handed over, as the
    prediction use case does after a cache miss)."""
    adapted = engine.submit_adapt(job).result(timeout=120)
    key = ("gpu-check", "client", job.meta_model)
    predict = PredictJob(job.meta_model, key, queries, params=adapted.params)
    return adapted, engine.submit_predict(predict).result(timeout=120)


def tiny_jobs(models: Mapping[str, MetaModel]) -> list[tuple[AdaptJob, Any]]:
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-4, 4, 8)[:, None].tolist()  # (8, 1)
    y = torch.sin(torch.linspace(-4, 4, 8)).tolist()  # (8,)
    rows = torch.randn(9, 4, generator=g).tolist()  # (9, 4)
    images = torch.rand(6, 1, 8, 8, generator=g)  # (6, 1, 8, 8)
    jobs: list[tuple[AdaptJob, Any]] = []
    for name in ("sinusoid", "sinusoid-metasgd", "sinusoid-clipped"):
        model = models[name]
        lr = None if model.config.inner.learned_lr != "none" else 0.02
        jobs.append((AdaptJob(model.version, x, y, 5, lr), x))
    jobs.append((AdaptJob(models["classes"].version, rows, [0, 1, 2] * 3, 5, 0.1), rows))
    jobs.append((AdaptJob(models["images"].version, images, [0, 1, 2] * 2, 3, 0.5), images))
    return jobs


def test_tiny_meta_models_adapt_and_predict_on_cuda_as_on_the_cpu() -> None:
    models = tiny_meta_models()
    jobs = tiny_jobs(models)
    with engines(models) as (cpu, gpu):
        for job, queries in jobs:
            (a, out_a), (b, out_b) = run(cpu, job, queries), run(gpu, job, queries)
            fast_a, fast_b = from_bytes(a.params), from_bytes(b.params)
            assert fast_a.keys() == fast_b.keys()
            for name in fast_a:
                torch.testing.assert_close(fast_b[name], fast_a[name], atol=1e-4, rtol=1e-4)
            assert b.loss_after == pytest.approx(a.loss_after, rel=1e-4, abs=1e-6)
            torch.testing.assert_close(
                torch.tensor(out_b), torch.tensor(out_a), atol=1e-4, rtol=1e-4
            )


def text_job(model: MetaModel) -> tuple[AdaptJob, tuple[str, ...]]:
    texts = tuple(t for examples in SUPPORT_TEXTS.values() for t in examples)
    targets = [c for c, examples in enumerate(SUPPORT_TEXTS.values()) for _ in examples]
    lr = None if model.config.inner.learned_lr != "none" else model.config.inner.lr
    return AdaptJob(model.version, texts, targets, model.config.inner.steps, lr), tuple(QUERIES)


def probabilities(logits: Sequence[Sequence[float]], ways: int) -> torch.Tensor:
    return torch.softmax(torch.tensor(logits)[:, :ways], -1)  # (Q, ways)


@pytest.mark.parametrize("half", [False, True], ids=["float32", "half"])
def test_text_jobs_on_cuda_answer_as_on_the_cpu(half: bool) -> None:
    intents = MetaModel.load(ARTIFACTS / "intents")
    job, queries = text_job(intents)
    ways = len(SUPPORT_TEXTS)
    with engines({"intents": intents}, encoder_half=half) as (cpu, gpu):
        assert gpu.texts.half is half and not cpu.texts.half
        (a, out_a), (b, out_b) = run(cpu, job, queries), run(gpu, job, queries)
    p_a, p_b = probabilities(out_a, ways), probabilities(out_b, ways)
    assert p_b.argmax(-1).tolist() == p_a.argmax(-1).tolist() == [0, 2, 1]
    if half:  # embeddings within cosine 0.999 of float32's (tests/models/test_encoder_cuda.py)
        torch.testing.assert_close(p_b, p_a, atol=2e-2, rtol=0)
    else:
        torch.testing.assert_close(p_b, p_a, atol=1e-4, rtol=0)
        fast_a, fast_b = from_bytes(a.params), from_bytes(b.params)
        for name in fast_a:
            torch.testing.assert_close(fast_b[name], fast_a[name], atol=1e-4, rtol=1e-4)
