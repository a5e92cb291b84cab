"""A text client across two replicas on one PostgreSQL database: what one writes (an
adaptation, examples, a readapt) the other reads and predicts at once, its out-of-scope
threshold included; and a reconcile onto a new version of ``intents``, run by the
replicas' background runners, re-adapts it exactly once, keeping its threshold."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import torch

from models.checkpoint import MetaModel
from tests.live import Replica, fastadapt
from tests.replicas.conftest import Deployment
from tests.replicas.helpers import versions
from tests.service.text_fixtures import INTENTS, QUERIES, SUPPORT

DEADLINE_S = 60.0


def post(client: httpx.Client, path: str, body: dict[str, Any], status: int = 201) -> Any:
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    return response.json()


def predict(client: httpx.Client, client_id: str, **extra: Any) -> Any:
    return post(
        client, f"/v1/clients/{client_id}/predictions", {"inputs": QUERIES, **extra}, status=200
    )


def test_a_text_client_written_on_one_replica_is_read_on_the_other_at_once(
    pair: tuple[Replica, Replica], deployment: Deployment
) -> None:
    a, b = pair
    body = {"meta_model": "intents", "support": SUPPORT, "out_of_scope_threshold": 0.0}
    with a.client(deployment.key) as on_a, b.client(deployment.key) as on_b:
        made = post(on_a, "/v1/clients/words/adaptations", body)
        assert versions(on_b, "words") == [made["version"]]
        seen = predict(on_b, "words")
        assert seen["version_id"] == made["version_id"]
        assert [p["label"] for p in seen["predictions"]] == ["flight", "balance", "music"]
        assert seen == predict(on_a, "words")

        examples = {"inputs": ["play some jazz"], "targets": ["music"]}
        added = post(on_b, "/v1/clients/words/examples", examples)  # written on B ...
        assert predict(on_a, "words")["version_id"] == added["version_id"]  # ... read on A
        assert added["out_of_scope_threshold"] == 0.0
        strict = post(on_a, "/v1/clients/words/readaptations", {"out_of_scope_threshold": 1.0})
        on_b_now = predict(on_b, "words")
        assert on_b_now["version_id"] == strict["version_id"]
        assert [p["label"] for p in on_b_now["predictions"]] == [None] * 3  # its threshold


def new_version_of_intents(target: Path) -> str:
    """The shipped artifact with every weight moved a little (its calibration kept): a
    new version of ``intents``, saved at ``target``; its sha."""
    model = MetaModel.load(INTENTS)
    g = torch.Generator().manual_seed(7)
    params = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in model.params.items()}
    moved = MetaModel(model.config, params, model.lrs, "", model.calibration, model.in_scope)
    return moved.save(target)


def test_a_reconcile_moves_a_text_client_onto_a_new_version_keeping_its_threshold(
    pair: tuple[Replica, Replica], deployment: Deployment
) -> None:
    a, b = pair
    body = {"meta_model": "intents", "support": SUPPORT, "out_of_scope_threshold": 0.25}
    with a.client(deployment.key) as on_a, b.client(deployment.key) as on_b:
        first = post(on_a, "/v1/clients/moved/adaptations", body)
        before = predict(on_b, "moved")

        sha = new_version_of_intents(deployment.tmp / "intents-v2" / "intents")
        out = fastadapt(
            deployment.env(),
            "meta-models",
            "register",
            "--promote",
            str(deployment.tmp / "intents-v2" / "intents"),
        )
        assert sha in out
        with a.client(deployment.admin_key) as admin:
            deadline = time.monotonic() + DEADLINE_S
            while (job := admin.post("/v1/meta-models/intents/reconcile")).status_code == 202:
                if job.json()["total"] or time.monotonic() > deadline:
                    break  # A sees the promotion (within promotion_refresh_s): stale clients
                time.sleep(0.5)
            assert job.status_code == 202, job.text
            job_id = job.json()["id"]
        deadline = time.monotonic() + DEADLINE_S
        while (status := on_b.get(f"/v1/jobs/{job_id}").json())["state"] != "done":
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert status["failed"] == 0, status

        history = on_b.get("/v1/clients/moved").json()["versions"]
        assert [v["version"] for v in history] == [1, 2]  # exactly once
        latest = history[1]
        assert (latest["origin"], latest["source_version"]) == ("reconcile", first["version"])
        assert latest["meta_model_version"] == sha
        assert latest["out_of_scope_threshold"] == 0.25
        after = predict(on_a, "moved")
        assert after == predict(on_b, "moved")
        assert after["version_id"] == latest["version_id"] != before["version_id"]
        scores = [p["in_scope"] for p in after["predictions"]]
        assert scores != [p["in_scope"] for p in before["predictions"]]  # another model
        for p in after["predictions"]:
            assert (p["label"] is None) == (p["in_scope"] < 0.25)
