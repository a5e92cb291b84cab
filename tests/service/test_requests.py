"""Requests become validated, typed objects once: every check that needs the meta-model
or the limits, the defaults filled in, inputs in the form the engine takes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from models.checkpoint import MetaModel
from service import requests
from service.errors import InvalidInput, TooLarge
from service.settings import Settings
from tests.service.tiny_models import tiny_meta_models

XS = [[-1.0], [0.0], [1.0]]
YS = [0.5, 0.0, -0.5]


@pytest.fixture(scope="module")
def meta_models() -> dict[str, MetaModel]:
    return tiny_meta_models()


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(max_support=8, max_predict_batch=4)


def adaptation(
    meta_models: dict[str, MetaModel], settings: Settings, **changes: Any
) -> requests.Adaptation:
    values: dict[str, Any] = {"meta_model": "sinusoid", "inputs": XS, "targets": YS, **changes}
    model = requests.known_meta_model(meta_models, values.pop("meta_model"))
    return requests.adaptation(model=model, settings=settings, **values)


def test_defaults_come_from_the_meta_model(
    meta_models: dict[str, MetaModel], settings: Settings
) -> None:
    job = adaptation(meta_models, settings).job
    assert (job.meta_model, job.steps, job.lr) == ("test-sinusoid", 5, 0.01)  # the version
    assert adaptation(meta_models, settings, inner_steps=7, inner_lr=0.5).job.steps == 7
    learned = adaptation(meta_models, settings, meta_model="sinusoid-metasgd").job
    assert (learned.steps, learned.lr) == (5, None)  # None: the learned rates


def test_rows_stay_rows_and_the_support_set_is_kept_as_sent(
    meta_models: dict[str, MetaModel], settings: Settings
) -> None:
    request = adaptation(meta_models, settings)
    assert request.job.inputs == XS and request.job.targets == YS
    assert (request.support_inputs, request.support_targets) == (
        "[[-1.0],[0.0],[1.0]]",
        "[0.5,0.0,-0.5]",
    )
    assert request.support_size == 3 and request.labels is None
    assert request.model is meta_models["sinusoid"]


def test_arrays_become_one_tensor_of_the_input_shape(
    meta_models: dict[str, MetaModel], settings: Settings
) -> None:
    rows = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    arrays = rows.reshape(2, 1, 8, 8).tolist()
    mixed = [arrays[0], rows[1].tolist()]  # an array and a row in one request
    for inputs in (arrays, mixed):
        x = requests.model_inputs(meta_models["images"], inputs, field="inputs", settings=settings)
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
        assert torch.equal(x, rows.reshape(2, 1, 8, 8))
    rows_only = requests.model_inputs(
        meta_models["images"], rows.tolist(), field="inputs", settings=settings
    )
    assert rows_only == rows.tolist()  # all rows: Python lists, converted a batch at a time
    huge = [[[1e39] * 8] * 8]  # finite as JSON, infinite as float32
    with pytest.raises(InvalidInput, match=r"inputs\[0\]: NaN or infinity"):
        requests.model_inputs(meta_models["images"], [huge], field="inputs", settings=settings)


def test_labels_become_class_indices_in_order_of_first_appearance(
    meta_models: dict[str, MetaModel], settings: Settings
) -> None:
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)).tolist()
    request = adaptation(
        meta_models, settings, meta_model="classes", inputs=x, targets=[7, 2, "b", 2]
    )
    assert request.job.targets == [0, 1, 2, 1]
    assert request.labels == [7, 2, "b"]
    ints = adaptation(meta_models, settings, meta_model="classes", inputs=x, targets=[0, 2, 1, 2])
    assert ints.job.targets == [0, 1, 2, 1] and ints.labels == [0, 2, 1]


@pytest.mark.parametrize(
    ("changes", "error", "field"),
    [
        ({"meta_model": "nope"}, InvalidInput, "meta_model"),
        ({"inputs": [], "targets": []}, InvalidInput, "support.inputs"),
        ({"inputs": [[0.0]] * 9, "targets": [0.0] * 9}, TooLarge, "support.inputs"),
        ({"targets": YS[:2]}, InvalidInput, "support.targets"),
        ({"inputs": [[1.0, 2.0]] * 3}, InvalidInput, r"support.inputs\[0\]"),
        ({"inputs": [[1.0], [2.0, 3.0], [4.0]]}, InvalidInput, r"support.inputs\[1\]"),
        ({"inputs": [[[[1.0]]], [[[1.0], [2.0]]], [[[0.0]]]]}, InvalidInput, "support.inputs"),
        ({"inputs": ["aGVsbG8="] * 3}, InvalidInput, r"support.inputs\[0\]: .* not images"),
        ({"targets": [0.5, "a", 0.0]}, InvalidInput, r"support.targets\[1\]"),
        ({"inner_steps": 0}, InvalidInput, "inner_steps"),
        ({"inner_steps": 101}, InvalidInput, "inner_steps"),
        ({"inner_lr": 0.0}, InvalidInput, "inner_lr"),
        ({"inner_lr": 10.5}, InvalidInput, "inner_lr"),
        ({"meta_model": "sinusoid-metasgd", "inner_lr": 0.1}, InvalidInput, "inner_lr"),
        (
            {"meta_model": "classes", "inputs": [[0.0] * 4] * 4, "targets": [0, 1, 2, 3]},
            InvalidInput,
            "support.targets: 4 distinct labels",
        ),
        (
            {"meta_model": "classes", "inputs": [[0.0] * 4] * 2, "targets": [1, "1"]},
            InvalidInput,
            "support.targets: labels that read the same",
        ),
        (
            {"meta_model": "classes", "inputs": [[0.0] * 4] * 2, "targets": ["a", "a"]},
            InvalidInput,
            "support.targets: a single label",
        ),
        (
            {"meta_model": "classes", "inputs": [[0.0] * 4] * 2, "targets": [1, 0.5]},
            InvalidInput,
            r"support.targets\[1\]: a class label",
        ),
    ],
)
def test_bad_adaptations_are_domain_errors_before_they_reach_torch(
    meta_models: dict[str, MetaModel],
    settings: Settings,
    changes: dict[str, Any],
    error: type[Exception],
    field: str,
) -> None:
    with pytest.raises(error, match=field):
        adaptation(meta_models, settings, **changes)


def test_prediction_inputs(meta_models: dict[str, MetaModel], settings: Settings) -> None:
    requests.prediction_size([[0.0]] * 4, settings, "inputs")
    with pytest.raises(InvalidInput, match="x: no inputs"):
        requests.prediction_size([], settings, "x")
    with pytest.raises(TooLarge, match="inputs: 5 inputs exceed the limit of 4"):
        requests.prediction_size([[0.0]] * 5, settings, "inputs")
    with pytest.raises(InvalidInput, match=r"inputs\[0\]: expected 1 value"):
        requests.model_inputs(
            meta_models["sinusoid"], [[1.0, 2.0]], field="inputs", settings=settings
        )
