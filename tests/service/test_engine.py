"""The engine's interface against an independent reference."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sgd_reference import Reference

from models.params import from_bytes
from service.app import load_meta_models
from service.engine import AdaptJob, Engine
from service.errors import InvalidInput, Unavailable
from service.settings import Settings

XS = [[-3.0], [-1.0], [0.5], [2.0], [4.5]]
YS = [0.3, -1.1, 0.9, 1.7, -0.4]


@pytest.fixture
def engine(models_dir: Path, tmp_path: Path) -> Iterator[Engine]:
    settings = Settings(data_dir=tmp_path, models_dir=models_dir, device="cpu")
    engine = Engine(load_meta_models(models_dir), settings)
    engine.start()
    yield engine
    engine.stop()


def test_adaptation_matches_plain_autograd_sgd(engine: Engine, reference: Reference) -> None:
    adapted = engine.submit_adapt(AdaptJob("sinusoid", XS, YS, steps=7, lr=0.05)).result()
    fast, before, after = reference.adapt(XS, YS, steps=7, lr=0.05)
    params = from_bytes(adapted.params)
    assert params.keys() == fast.keys()
    for name, tensor in fast.items():
        torch.testing.assert_close(params[name], tensor, atol=1e-5, rtol=1e-5)
    assert adapted.loss_before == pytest.approx(before, rel=1e-5)
    assert adapted.loss_after == pytest.approx(after, rel=1e-5)
    assert (adapted.steps, adapted.lr) == (7, 0.05)


def test_defaults_come_from_the_artifact(engine: Engine) -> None:
    adapted = engine.submit_adapt(AdaptJob("sinusoid", XS, YS, steps=None, lr=None)).result()
    assert (adapted.steps, adapted.lr) == (5, 0.01)
    learned = engine.submit_adapt(AdaptJob("sinusoid-metasgd", XS, YS, None, None)).result()
    assert learned.lr is None


def test_predictions_use_the_adapted_params(engine: Engine, reference: Reference) -> None:
    adapted = engine.submit_adapt(AdaptJob("sinusoid", XS, YS, steps=3, lr=0.02)).result()
    loads: list[int] = []

    def params() -> bytes:
        loads.append(1)
        return adapted.params

    queries = [[-2.5], [0.0], [1.25]]
    first = engine.submit_predict("sinusoid", ("t", "c", 1), params, queries).result()
    again = engine.submit_predict("sinusoid", ("t", "c", 1), params, queries).result()
    fast, _, _ = reference.adapt(XS, YS, steps=3, lr=0.02)
    expected = reference.predict(fast, queries)
    assert [row[0] for row in first] == pytest.approx(expected, abs=1e-5)
    assert first == again
    assert len(loads) == 1  # the second call was a cache hit
    engine.forget("t", "c")
    engine.submit_predict("sinusoid", ("t", "c", 1), params, queries).result()
    assert len(loads) == 2


def test_unknown_meta_model_and_a_stopped_engine_are_domain_errors(engine: Engine) -> None:
    with pytest.raises(InvalidInput, match="meta_model"):
        engine.submit_adapt(AdaptJob("nope", XS, YS, None, None))
    engine.stop()
    with pytest.raises(Unavailable):
        engine.submit_adapt(AdaptJob("sinusoid", XS, YS, None, None))
