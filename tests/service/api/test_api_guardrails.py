"""Guardrails end to end, on SQLite and PostgreSQL, with the shipped sinusoid (which
declares its trained_for: 5 to 20 points, exactly 5 inner steps) and a tabular model."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import nets
from models.checkpoint import ArtifactConfig, MetaModel
from models.maml import InnerLoopConfig
from service.settings import packaged_models_dir
from service.store.tables import ClientVersion
from tests.service.conftest import ApiFactory

XS = [[-4.0], [-2.5], [-1.0], [0.5], [2.0], [3.5]]  # the README's alice: 2 sin(x - 0.5)
YS = [1.96, -0.28, -1.99, 0.0, 1.99, 0.28]
ONE_POINT = {"inputs": [[1.0]], "targets": [1.0]}  # the issue's: support loss 2.76 -> 13.28


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped sinusoid, and ``churn``: a tabular regressor of two named features."""
    root = tmp_path_factory.mktemp("guarded")
    shutil.copytree(packaged_models_dir() / "sinusoid", root / "sinusoid")
    torch.manual_seed(0)
    architecture = {"kind": "mlp", "in_features": 2, "hidden": [8], "out_features": 1}
    config = ArtifactConfig(
        name="churn",
        family="tabular",
        architecture=architecture,
        task={
            "kind": "regression",
            "input_shape": [2],
            "features": ["age", "income"],
            "output": "the label",
        },
        inner=InnerLoopConfig(steps=3, lr=0.01),
    )
    net = nets.build(config.architecture)
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    MetaModel(config, params, {}, "").save(root / "churn")
    return root


def post(api: TestClient, client_id: str = "alice", **body: Any) -> Any:
    payload = {"meta_model": "sinusoid", "support": {"inputs": XS, "targets": YS}, **body}
    return api.post(f"/v1/clients/{client_id}/adaptations", json=payload)


def error_of(response: Any) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def losses(message: str) -> tuple[float, float]:
    """(before, after) from "support loss B before, A after" in a message."""
    found = re.search(r"support loss (\S+) before, (\S+) after", message)
    assert found, message
    return float(found[1]), float(found[2])


def test_the_shipped_sinusoid_lists_what_it_was_trained_for(api: TestClient) -> None:
    described = api.get("/v1/meta-models/sinusoid").json()
    assert (described["trained_support"], described["trained_inner_steps"]) == ([5, 20], [5, 5])
    assert described["features"] is None
    body = post(api).json()
    assert body["warnings"] == []
    assert api.get("/v1/clients/alice").json()["versions"][0]["warnings"] == []


def test_outside_the_trained_ranges_is_refused_naming_field_and_range(api: TestClient) -> None:
    error = error_of(post(api, support=ONE_POINT))
    assert error["type"] == "invalid_input"
    assert error["message"] == (
        "support.inputs: 1 point; meta-model 'sinusoid' was meta-trained for 5 to 20 "
        "(trained_for.support)"
    )
    error = error_of(post(api, inner_steps=10))
    assert error["message"].startswith("inner_steps: 10; meta-model 'sinusoid' was meta-trained")
    assert "exactly 5 inner steps" in error["message"]
    error = error_of(post(api, inner_lr=0.01))
    assert error["message"].startswith("inner_lr: meta-model 'sinusoid' meta-learned its inner")
    assert api.get("/v1/clients/alice").status_code == 404  # nothing was stored


def test_a_setting_allows_them_with_warnings_in_the_response_and_the_history(
    make_api: ApiFactory, session: Session
) -> None:
    api = make_api(allow_untrained=True)
    response = post(api, inner_steps=6)
    assert response.status_code == 201, response.text
    (warning,) = response.json()["warnings"]
    assert warning.startswith("inner_steps: 6; meta-model 'sinusoid' was meta-trained for ")
    (version,) = api.get("/v1/clients/alice").json()["versions"]
    assert version["warnings"] == [warning] and version["inner_steps"] == 6
    stored = session.scalars(select(ClientVersion.warnings)).one()
    assert stored == [warning]  # a JSON list in the database


def test_the_issue_example_diverges_and_is_refused_leaving_the_client_as_it_was(
    make_api: ApiFactory, session: Session
) -> None:
    api = make_api(allow_untrained=True)  # one point is outside 5..20: let it through
    assert post(api).status_code == 201  # version 1
    before = api.get("/v1/clients/alice").json()
    error = error_of(post(api, support=ONE_POINT))
    assert error["type"] == "adaptation_diverged"
    assert losses(error["message"]) == pytest.approx((2.76, 13.28), abs=0.01)
    assert "send more support points" in error["message"]
    assert api.get("/v1/clients/alice").json() == before  # still version 1, current
    assert len(session.scalars(select(ClientVersion)).all()) == 1
    fresh = error_of(post(api, "bob", support=ONE_POINT))
    assert fresh["type"] == "adaptation_diverged"
    assert api.get("/v1/clients/bob").status_code == 404  # not created either


def test_a_setting_stores_a_divergent_adaptation_flagged(make_api: ApiFactory) -> None:
    api = make_api(allow_untrained=True, allow_divergent=True)
    response = post(api, support=ONE_POINT)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["support_loss_after"] > body["support_loss_before"]
    untrained, diverged = body["warnings"]
    assert untrained.startswith("support.inputs: 1 point; ")
    assert diverged.startswith("support: the adaptation diverged: support loss ")
    assert losses(diverged) == pytest.approx((2.76, 13.28), abs=0.01)
    history = api.get("/v1/clients/alice").json()
    assert history["current_version"] == 1
    assert history["versions"][0]["warnings"] == [untrained, diverged]


def test_a_readaptation_that_diverges_creates_nothing(make_api: ApiFactory) -> None:
    lenient = make_api(allow_untrained=True, allow_divergent=True)
    assert post(lenient, support=ONE_POINT).status_code == 201  # stored, flagged
    strict = make_api(allow_untrained=True)
    error = error_of(strict.post("/v1/clients/alice/readaptations"))
    assert error["type"] == "adaptation_diverged"
    assert strict.get("/v1/clients/alice").json()["current_version"] == 1


# -- tabular: feature names ------------------------------------------------------------------
def test_a_tabular_meta_model_lists_its_features_and_takes_objects(api: TestClient) -> None:
    described = api.get("/v1/meta-models/churn").json()
    assert described["features"] == ["age", "income"]
    assert described["trained_support"] is None  # it declares no trained_for
    support = {
        "inputs": [{"age": 30, "income": 1.5}, [41, 0.5], {"income": -1, "age": 25}],
        "targets": [1.0, 0.0, 2.0],
    }
    response = post(api, "carol", meta_model="churn", support=support)
    assert response.status_code == 201, response.text
    url = "/v1/clients/carol/predictions"
    by_name = api.post(url, json={"inputs": [{"income": 1.5, "age": 30}]}).json()
    by_row = api.post(url, json={"inputs": [[30, 1.5]]}).json()
    assert by_name["predictions"] == by_row["predictions"]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"age": 30}, "support.inputs[1].income: missing; every feature needs a value"),
        (
            {"age": 30, "income": 1, "tenure": 2},
            "support.inputs[1].tenure: not a feature of meta-model 'churn' (features: age, income)",
        ),
        ({"age": 30, "income": "high"}, "support.inputs[1].income: Input should be a valid number"),
    ],
)
def test_a_missing_unknown_or_bad_feature_is_named(
    api: TestClient, item: dict[str, Any], message: str
) -> None:
    support = {"inputs": [{"age": 30, "income": 1.5}, item], "targets": [1.0, 0.0]}
    error = error_of(post(api, "carol", meta_model="churn", support=support))
    assert error["message"] == message


def test_objects_for_a_meta_model_without_feature_names_are_refused(api: TestClient) -> None:
    error = error_of(post(api, support={"inputs": [{"x": 1.0}] * 6, "targets": YS}))
    assert error["message"] == (
        "support.inputs[0]: meta-model 'sinusoid' names no features: send 1 number(s) per input"
    )


def test_the_openapi_document_describes_the_guardrails(api: TestClient) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    for path in ("/v1/clients/{client_id}/adaptations", "/v1/clients/{client_id}/readaptations"):
        described = paths[path]["post"]["responses"]["422"]["description"]
        assert "adaptation_diverged" in described and "trained_for" in described
    schemas = api.get("/openapi.json").json()["components"]["schemas"]
    assert "warnings" in schemas["AdaptResponse"]["properties"]
    assert "features" in schemas["MetaModelResponse"]["properties"]
