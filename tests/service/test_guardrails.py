"""Guardrails, as request validation and the divergence check see them: what an artifact
was meta-trained for (its ``trained_for``), inputs keyed by feature name, and an
adaptation whose support loss rose."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from models.checkpoint import MetaModel, TrainedFor
from service import requests
from service.engine import Adapted
from service.errors import AdaptationDiverged, InvalidInput
from service.settings import Settings
from service.usecases.adapt import divergence
from tests.service.tiny_models import meta_model

XS = [[-4.0], [-2.5], [-1.0], [0.5], [2.0], [3.5]]
YS = [1.96, -0.28, -1.99, 0.0, 1.99, 0.28]


def declaring(model: MetaModel, support: tuple[int, int], steps: tuple[int, int]) -> MetaModel:
    config = replace(model.config, trained_for=TrainedFor(support, steps))
    return MetaModel(config, model.params, model.lrs, model.version)


@pytest.fixture(scope="module")
def meta_models() -> dict[str, MetaModel]:
    learned = meta_model("learned", learned_lr="per_layer_per_step", seed=3)
    fixed = meta_model("fixed")
    classes = meta_model("classes", classes=3, in_features=2, seed=2)
    table = meta_model("table", in_features=2, seed=4)
    table.config.task["features"] = ["age", "income"]
    return {
        "learned": declaring(learned, (5, 20), (5, 5)),
        "fixed": declaring(fixed, (5, 20), (1, 5)),
        "classes": declaring(classes, (1, 2), (1, 5)),
        "table": table,  # declares no trained_for: nothing checked
        "undeclared": meta_model("undeclared", learned_lr="per_layer_per_step"),
    }


def adapt(meta_models: dict[str, MetaModel], **values: Any) -> requests.Adaptation:
    settings = Settings(allow_untrained=values.pop("allow_untrained", False))
    body: dict[str, Any] = {"meta_model": "learned", "inputs": XS, "targets": YS, **values}
    model = meta_models[body.pop("meta_model")]  # the version the use case resolved
    return requests.adaptation(model=model, settings=settings, **body)


def refused(meta_models: dict[str, MetaModel], **values: Any) -> InvalidInput:
    with pytest.raises(InvalidInput) as error:
        adapt(meta_models, **values)
    return error.value


def test_within_the_trained_ranges_nothing_is_said(meta_models: dict[str, MetaModel]) -> None:
    assert adapt(meta_models).warnings == ()
    assert adapt(meta_models, inner_steps=5).warnings == ()
    assert adapt(meta_models, meta_model="fixed", inner_steps=2).warnings == ()


def test_a_support_size_outside_is_refused_naming_the_field_and_the_range(
    meta_models: dict[str, MetaModel],
) -> None:
    error = refused(meta_models, inputs=XS[:3], targets=YS[:3])
    assert error.field == "support.inputs"
    assert error.message == (
        "support.inputs: 3 points; meta-model 'learned' was meta-trained for 5 to 20 "
        "(trained_for.support)"
    )
    many = [[i / 10] for i in range(21)]
    assert "21 points" in refused(meta_models, inputs=many, targets=[0.0] * 21).message


def test_with_learned_per_step_rates_only_the_trained_step_count_is_accepted(
    meta_models: dict[str, MetaModel],
) -> None:
    for steps in (4, 6):
        error = refused(meta_models, inner_steps=steps)
        assert error.field == "inner_steps"
        assert error.message.startswith(
            f"inner_steps: {steps}; meta-model 'learned' was meta-trained for exactly 5 inner "
            "steps, the steps its rates were learned for (more would reuse the last rate, "
            "fewer replay a prefix never trained to stand alone)"
        )
    fixed = refused(meta_models, meta_model="fixed", inner_steps=6)
    assert "was meta-trained for 1 to 5 inner steps (trained_for.inner_steps)" in fixed.message


def test_classes_are_counted_per_class_and_named_by_their_first_example(
    meta_models: dict[str, MetaModel],
) -> None:
    inputs = [[0.0, 1.0]] * 5
    error = refused(
        meta_models, meta_model="classes", inputs=inputs, targets=["a", "b", "b", "a", "b"]
    )
    assert error.field == "support.targets[1]"  # "b": 3 examples, 1 or 2 trained; not quoted
    assert "its class has 3 example(s)" in error.message and "1 to 2 per class" in error.message
    assert '"b"' not in error.message and "'b'" not in error.message


def test_a_setting_allows_it_with_a_warning_for_each(meta_models: dict[str, MetaModel]) -> None:
    done = adapt(meta_models, inputs=XS[:2], targets=YS[:2], inner_steps=7, allow_untrained=True)
    assert done.job.steps == 7
    assert done.warnings == (
        "support.inputs: 2 points; meta-model 'learned' was meta-trained for 5 to 20 "
        "(trained_for.support)",
        "inner_steps: 7; meta-model 'learned' was meta-trained for exactly 5 inner steps, the "
        "steps its rates were learned for (more would reuse the last rate, fewer replay a "
        "prefix never trained to stand alone) (trained_for.inner_steps)",
    )


def test_an_artifact_that_declares_nothing_is_not_checked(
    meta_models: dict[str, MetaModel],
) -> None:
    done = adapt(meta_models, meta_model="undeclared", inputs=XS[:1], targets=YS[:1], inner_steps=9)
    assert done.warnings == () and done.job.steps == 9


def test_inner_lr_is_refused_for_learned_rates_saying_why(
    meta_models: dict[str, MetaModel],
) -> None:
    error = refused(meta_models, inner_lr=0.1)
    assert error.field == "inner_lr"
    assert "meta-learned its inner step sizes (per_layer_per_step)" in error.message
    assert error.message.endswith("Leave inner_lr out")
    assert adapt(meta_models, meta_model="fixed", inner_lr=0.1).job.lr == 0.1


# -- inputs keyed by feature name ----------------------------------------------------------
def test_objects_keyed_by_feature_name_become_rows_in_feature_order(
    meta_models: dict[str, MetaModel],
) -> None:
    inputs = [{"income": 2.5, "age": 31.0}, {"age": 40.0, "income": -1.0}]
    done = adapt(meta_models, meta_model="table", inputs=inputs, targets=[1.0, 2.0])
    assert done.job.inputs == [[31.0, 2.5], [40.0, -1.0]]
    assert '{"income":2.5,"age":31.0}' in done.support_inputs  # stored as sent
    rows = requests.model_inputs(
        meta_models["table"],
        [[31.0, 2.5], {"age": 31.0, "income": 2.5}],
        field="inputs",
        settings=Settings(),
    )
    assert rows == [[31.0, 2.5], [31.0, 2.5]]  # rows and objects mix


@pytest.mark.parametrize(
    ("item", "field", "message"),
    [
        ({"age": 1.0}, "support.inputs[1].income", "missing; every feature needs a value"),
        (
            {"age": 1.0, "income": 2.0, "height": 3.0},
            "support.inputs[1].height",
            "not a feature of meta-model 'table' (features: age, income)",
        ),
    ],
)
def test_a_missing_or_unknown_feature_is_named(
    meta_models: dict[str, MetaModel], item: dict[str, float], field: str, message: str
) -> None:
    inputs = [{"age": 1.0, "income": 2.0}, item]
    error = refused(meta_models, meta_model="table", inputs=inputs, targets=[1.0, 2.0])
    assert (error.field, error.message) == (field, f"{field}: {message}")


def test_a_meta_model_without_feature_names_refuses_objects(
    meta_models: dict[str, MetaModel],
) -> None:
    error = refused(meta_models, inputs=[{"x": 1.0}] * 6)
    assert error.message == (
        "support.inputs[0]: meta-model 'learned' names no features: send 1 number(s) per input"
    )


# -- divergence ------------------------------------------------------------------------------
def adapted(before: float, after: float) -> Adapted:
    return Adapted(params=b"", loss_before=before, loss_after=after, steps=5, lr=None, adapt_ms=1)


def test_a_support_loss_that_rose_is_refused_or_flagged() -> None:
    assert divergence(adapted(2.0, 1.0), allow=False) == []
    assert divergence(adapted(2.0, 2.0001), allow=False) == []  # rounding: within 1e-4
    with pytest.raises(AdaptationDiverged) as error:
        divergence(adapted(2.76, 13.28), allow=False)
    assert error.value.type == "adaptation_diverged" and error.value.field == "support"
    assert error.value.message.startswith(
        "support: the adaptation diverged: support loss 2.76 before, 13.28 after; "
    )
    (warning,) = divergence(adapted(2.76, 13.28), allow=True)
    assert warning == error.value.message
    for bad in (float("nan"), float("inf")):  # never stored, whatever the setting
        with pytest.raises(AdaptationDiverged):
            divergence(adapted(1.0, bad), allow=True)
