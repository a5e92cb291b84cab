"""The API's class probabilities use the meta-model's fitted temperature."""

from __future__ import annotations

import math

import pytest

from service.usecases.predict import classify


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    weights = [math.exp(v - top) for v in values]
    return [w / sum(weights) for w in weights]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_classify_divides_the_used_logits_by_the_temperature(temperature: float) -> None:
    logits = [2.0, -1.0, 0.5, 9.0]  # the fourth output is not one of the client's labels
    got = classify(logits, ["a", "b", "c"], temperature)
    expected = softmax([v / temperature for v in logits[:3]])
    assert got.label == "a"  # the temperature never changes the prediction
    assert list(got.probabilities.values()) == pytest.approx(expected, rel=1e-12)
    assert sum(got.probabilities.values()) == pytest.approx(1.0)


def test_a_lower_temperature_makes_the_top_probability_larger() -> None:
    logits = [1.0, 0.0]
    assert (
        classify(logits, [0, 1], 0.5).probabilities["0"]
        > classify(logits, [0, 1]).probabilities["0"]
    )
