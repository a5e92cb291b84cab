"""Bulk adaptations under the guardrails (the shipped sinusoid: 5 to 20 points, exactly 5
inner steps): an untrained or diverged item fails alone, the others are stored."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.store.tables import ClientVersion
from tests.service.api.test_api_guardrails import ONE_POINT, XS, YS
from tests.service.api.test_api_guardrails import models_dir as models_dir  # the fixture
from tests.service.conftest import ApiFactory


def item(client_id: str, support: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"client_id": client_id, "meta_model": "sinusoid", "support": support, **extra}


def test_untrained_and_diverged_items_fail_alone(make_api: ApiFactory, session: Session) -> None:
    good = {"inputs": XS, "targets": YS}
    body = {
        "adaptations": [
            item("alice", good),
            item("bob", ONE_POINT),  # one point: outside 5..20
            item("carol", good, inner_steps=7),  # not the 5 it was meta-trained for
        ]
    }
    results = make_api().post("/v1/adaptations:batch", json=body).json()["results"]
    assert results[0]["version"] == 1
    assert results[1]["error"]["message"].startswith("adaptations[1].support")
    assert results[2]["error"]["message"].startswith("adaptations[2].inner_steps")
    lenient = make_api(allow_untrained=True)  # bob's one point now adapts, and diverges
    body = {"adaptations": [item("bob", ONE_POINT), item("dave", good)]}
    answer = lenient.post("/v1/adaptations:batch", json=body).json()
    bob, dave = answer["results"]
    assert bob["error"]["type"] == "adaptation_diverged" and bob["error"]["status"] == 422
    assert bob["error"]["message"].startswith("adaptations[0].support: the adaptation diverged")
    assert dave["version"] == 1
    stored = session.scalars(select(ClientVersion.client_id)).all()
    assert sorted(stored) == ["alice", "dave"]
