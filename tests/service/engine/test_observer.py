"""The engine's observer hook: every batch reported once, by kind, and never in the way."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from models.checkpoint import MetaModel
from service.engine import AdaptJob, Engine, EngineConfig, EngineObserver, PredictJob

SUPPORT = ([[-1.0], [0.0], [1.0]], [0.5, 0.0, -0.5])


class Recorder(EngineObserver):
    def __init__(self) -> None:
        self.batches: list[tuple[str, str, float, list[float]]] = []

    def batch_ran(
        self, *, meta_model: str, kind: str, seconds: float, waited: Sequence[float]
    ) -> None:
        self.batches.append((meta_model, kind, seconds, list(waited)))


class Broken(EngineObserver):
    def batch_ran(
        self, *, meta_model: str, kind: str, seconds: float, waited: Sequence[float]
    ) -> None:
        raise RuntimeError("observer bug")


def test_every_batch_is_reported_once_and_sizes_are_counted_by_kind(
    meta_models: dict[str, MetaModel],
) -> None:
    recorder = Recorder()
    engine = Engine(meta_models, EngineConfig(device="cpu", max_batch_delay_ms=20.0), recorder)
    engine.start()
    try:
        futures = [
            engine.submit_adapt(AdaptJob("test-sinusoid", *SUPPORT, 3, 0.02)) for _ in range(5)
        ]
        blobs = [f.result(timeout=60).params for f in futures]
        job = PredictJob("test-sinusoid", ("t", "c", "1"), [[0.5]], params=blobs[0])
        engine.submit_predict(job).result(timeout=60)
    finally:
        engine.stop()
    adapts = [b for b in recorder.batches if b[1] == "adapt"]
    predicts = [b for b in recorder.batches if b[1] == "predict"]
    assert sum(len(waited) for *_, waited in adapts) == 5  # warm-up batches are not reported
    assert [len(waited) for *_, waited in predicts] == [1]
    for meta_model, _, seconds, waited in recorder.batches:
        assert meta_model == "sinusoid" and seconds > 0 and all(w >= 0 for w in waited)
    sizes = engine.stats().worker.batch_sizes
    assert sizes["adapt"] == {
        n: sum(1 for *_, w in adapts if len(w) == n) for n in {len(w) for *_, w in adapts}
    }
    assert sizes["predict"] == {1: 1}


def test_a_failing_observer_never_stops_the_device(
    meta_models: dict[str, MetaModel], caplog: pytest.LogCaptureFixture
) -> None:
    engine = Engine(meta_models, EngineConfig(device="cpu"), Broken())
    engine.start()
    try:
        for _ in range(2):  # the second one runs after the observer failed
            adapted = engine.submit_adapt(AdaptJob("test-sinusoid", *SUPPORT, 3, 0.02))
            assert adapted.result(timeout=60).steps == 3
    finally:
        engine.stop()
    assert "the engine observer failed" in caplog.text
