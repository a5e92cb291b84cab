"""The in-scope score of a text meta-model's prediction, computed in plain Python on the
answer path: equal to the text family's own ``in_scope`` (torch), a label only at or
above the threshold, and the threshold resolved request > version > meta-model > 0.5."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.checkpoint import MetaModel
from models.tasks.text import in_scope
from service.store.repository import Predictable
from service.usecases.predict import (
    DEFAULT_OUT_OF_SCOPE_THRESHOLD,
    classify,
    out_of_scope_threshold,
)
from tests.service.text_fixtures import INTENTS

LOGITS = [2.5, -1.0, 4.25, 0.5, 9.0]  # the client has 4 labels: the 5th output is unused
LABELS = ["a", "b", "c", "d"]


@pytest.mark.parametrize("scale_bias", [(1.19, -5.42), (0.5, 0.0), (30.0, -200.0)])
def test_the_score_is_the_family_s_own_and_the_threshold_decides_the_label(
    scale_bias: tuple[float, float],
) -> None:
    expected = float(in_scope(torch.tensor(LOGITS, dtype=torch.float64), 4, *scale_bias))
    got = classify(LOGITS, LABELS, 0.9, in_scope=scale_bias, threshold=0.0)
    assert got.in_scope == pytest.approx(expected, rel=1e-12, abs=1e-300)
    assert got.label == "c"  # the top of the first 4 outputs, not the unused 5th
    at = classify(LOGITS, LABELS, 0.9, in_scope=scale_bias, threshold=expected * (1 - 1e-9))
    assert at.label == "c"
    above = classify(LOGITS, LABELS, 0.9, in_scope=scale_bias, threshold=expected * (1 + 1e-9))
    assert above.label is None and above.probabilities == got.probabilities
    assert classify(LOGITS, LABELS, 0.9).in_scope is None  # no calibration, no score


def test_far_out_of_scope_is_a_zero_score_not_an_overflow() -> None:
    got = classify([-1000.0, -2000.0], ["a", "b"], in_scope=(1.0, 0.0))
    assert got.in_scope == 0.0 and got.label is None


def test_the_threshold_is_the_request_s_else_the_version_s_else_the_meta_model_s() -> None:
    model = MetaModel.load(INTENTS)
    stored = Predictable(1, "u", model.version, ["a", "b"], 0.25)
    unset = dataclasses.replace(stored, out_of_scope_threshold=None)
    assert out_of_scope_threshold(0.75, stored, model) == 0.75
    assert out_of_scope_threshold(None, stored, model) == 0.25
    assert "out_of_scope_threshold" not in model.config.task  # the provisional artifact
    assert out_of_scope_threshold(None, unset, model) == DEFAULT_OUT_OF_SCOPE_THRESHOLD == 0.5
    task = {**model.config.task, "out_of_scope_threshold": 0.8}
    configured = MetaModel(
        dataclasses.replace(model.config, task=task), model.params, model.lrs, model.version
    )
    assert out_of_scope_threshold(None, unset, configured) == 0.8
    assert out_of_scope_threshold(0.0, unset, configured) == 0.0  # 0 is a threshold too
