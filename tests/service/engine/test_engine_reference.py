"""The engine's interface against an independent reference."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models.params import from_bytes
from service.app import load_meta_models
from service.engine import AdaptJob, Engine
from service.errors import Unavailable
from service.settings import Settings
from tests.service.engine.helpers import predict
from tests.service.sgd_reference import Reference

XS = [[-3.0], [-1.0], [0.5], [2.0], [4.5]]
YS = [0.3, -1.1, 0.9, 1.7, -0.4]


@pytest.fixture
def engine(models_dir: Path, tmp_path: Path) -> Iterator[Engine]:
    settings = Settings(data_dir=tmp_path, models_dir=models_dir, device="cpu")
    meta_models = load_meta_models(models_dir)
    for name, model in meta_models.items():
        model.version = f"test-{name}"  # the engine's keys, as tiny_models names them
    engine = Engine(meta_models, settings)
    engine.start()
    yield engine
    engine.stop()


def test_adaptation_matches_plain_autograd_sgd(engine: Engine, reference: Reference) -> None:
    adapted = engine.submit_adapt(AdaptJob("test-sinusoid", XS, YS, steps=7, lr=0.05)).result()
    fast, before, after = reference.adapt(XS, YS, steps=7, lr=0.05)
    params = from_bytes(adapted.params)
    assert params.keys() == fast.keys()
    for name, tensor in fast.items():
        torch.testing.assert_close(params[name], tensor, atol=1e-5, rtol=1e-5)
    assert adapted.loss_before == pytest.approx(before, rel=1e-5)
    assert adapted.loss_after == pytest.approx(after, rel=1e-5)
    assert (adapted.steps, adapted.lr) == (7, 0.05)


def test_predictions_use_the_adapted_params(engine: Engine, reference: Reference) -> None:
    adapted = engine.submit_adapt(AdaptJob("test-sinusoid", XS, YS, steps=3, lr=0.02)).result()
    loads: list[int] = []

    def params() -> bytes:
        loads.append(1)
        return adapted.params

    queries = [[-2.5], [0.0], [1.25]]
    first = predict(engine, "sinusoid", ("t", "c", "1"), queries, params).result()
    again = predict(engine, "sinusoid", ("t", "c", "1"), queries, params).result()
    fast, _, _ = reference.adapt(XS, YS, steps=3, lr=0.02)
    expected = reference.predict(fast, queries)
    assert [row[0] for row in first] == pytest.approx(expected, abs=1e-5)
    assert first == again
    assert len(loads) == 1  # the second call was a cache hit
    engine.forget("t", "c")
    predict(engine, "sinusoid", ("t", "c", "1"), queries, params).result()
    assert len(loads) == 2


def test_a_stopped_engine_is_a_domain_error(engine: Engine) -> None:
    engine.stop()
    with pytest.raises(Unavailable):
        engine.submit_adapt(AdaptJob("test-sinusoid", XS, YS, 5, 0.01))
