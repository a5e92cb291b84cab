"""The shipped Omniglot meta-model through the API, on real PNGs of held-out alphabets:
20-way one-shot, the way the hidden benchmark calls the service."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from models.evaluate import ARTIFACTS
from models.tasks import omniglot
from tests.service.conftest import ApiFactory

DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "omniglot"


def encode(png: bytes) -> str:
    return base64.b64encode(png).decode()


@pytest.mark.skipif(not (DATA / omniglot.ZIPS[0]).exists(), reason="no Omniglot data")
def test_twenty_way_one_shot_from_png_uploads(make_api: ApiFactory) -> None:
    alphabets, _ = omniglot.read_pngs(DATA)
    characters = [
        drawings
        for alphabet in omniglot.HELD_OUT
        for _, drawings in sorted(alphabets[alphabet].items())
    ][:20]
    labels = [f"char-{i}" for i in range(20)]
    support = {"inputs": [encode(d[0]) for d in characters], "targets": labels}
    queries = [
        (encode(png), label) for d, label in zip(characters, labels, strict=True) for png in d[1:6]
    ]

    api = make_api(models_dir=ARTIFACTS)
    created = api.post(
        "/v1/clients/reader/adaptations", json={"meta_model": "omniglot", "support": support}
    )
    assert created.status_code == 201, created.text
    answer = api.post("/v1/clients/reader/predictions", json={"inputs": [q for q, _ in queries]})
    assert answer.status_code == 200, answer.text
    predicted = [p["label"] for p in answer.json()["predictions"]]
    accuracy = sum(p == label for p, (_, label) in zip(predicted, queries, strict=True)) / len(
        queries
    )
    print(f"20-way 1-shot through the API: {accuracy:.1%} of {len(queries)} queries")
    assert accuracy > 0.6, accuracy  # 85% on this task; ~90% over 600 (docs/omniglot.md)
