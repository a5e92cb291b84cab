"""Text meta-models over the API: adapt a client's intents from strings, predict labels,
probabilities and an in-scope score (checked against the text family's own maths), the
out-of-scope threshold (stored with a version, kept by readapt, examples and rollback,
overridden per request, refused where there is no in-scope score), and every bad text
input answered 422 naming its field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from models.checkpoint import MetaModel
from models.encoder import EncoderSpec, label_text, shared
from models.tasks.text import in_scope
from service import usecases
from tests.service.api import test_observability as observed
from tests.service.conftest import ApiFactory
from tests.service.text_fixtures import (
    EXPECTED,
    INTENTS,
    LABELS,
    NAMES,
    QUERIES,
    TEXTS,
    adaptation,
)

ADAPT = "/v1/clients/bot/adaptations"
PREDICT = "/v1/clients/bot/predictions"


def created(response: Any) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def predictions(api: TestClient, inputs: list[str], **extra: Any) -> list[dict[str, Any]]:
    response = api.post(PREDICT, json={"inputs": inputs, **extra})
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["predictions"]
    return found


def assert_invalid(response: Any, field: str, *words: str, status: int = 422) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert message.startswith(field), message
    for word in words:
        assert word in message, message


def test_a_text_client_predicts_its_labels_with_the_family_s_own_probabilities_and_score(
    text_api: TestClient,
) -> None:
    version = created(text_api.post(ADAPT, json=adaptation()))
    assert version["labels"] == ["flight", "balance", "music"]
    assert version["out_of_scope_threshold"] is None  # the meta-model's default
    answered = predictions(text_api, QUERIES, out_of_scope_threshold=0.0)
    assert [p["label"] for p in answered] == EXPECTED

    # the reference: the artifact adapted by itself on the encoder's embeddings
    model = MetaModel.load(INTENTS)
    encoder = shared(EncoderSpec.from_dict(model.config.task["encoder"]), "cpu")
    ys = [version["labels"].index(label) for label in LABELS]
    texts = list(TEXTS)
    if model.config.task.get("label_examples"):  # each label's name: one more example of it
        texts += [label_text(label) for label in version["labels"]]
        ys += list(range(len(version["labels"])))
    with torch.no_grad():
        fast = model.adapt(encoder.encode(texts), torch.tensor(ys)).fast
        logits = model.predict(fast, encoder.encode(QUERIES))  # (Q, max_way)
    assert model.in_scope is not None
    scores = in_scope(logits, 3, *model.in_scope)
    probabilities = torch.softmax(logits[:, :3] / model.temperature, -1)
    for p, score, probs in zip(answered, scores.tolist(), probabilities.tolist(), strict=True):
        assert p["in_scope"] == pytest.approx(score, abs=1e-5)
        assert list(p["probabilities"].values()) == pytest.approx(probs, abs=1e-5)


def test_the_threshold_decides_the_label_and_the_probabilities_stay(text_api: TestClient) -> None:
    created(text_api.post(ADAPT, json=adaptation()))
    queries = [*QUERIES, "what is the weather like on mars", "zxq vbnm"]
    default = predictions(text_api, queries)
    for p in default:  # default: the meta-model's threshold, 0.5 (its config sets none)
        assert 0.0 < p["in_scope"] < 1.0
        assert (p["label"] is None) == (p["in_scope"] < 0.5), p
    scores = [p["in_scope"] for p in default]
    top = max(range(len(queries)), key=scores.__getitem__)
    above = predictions(text_api, queries, out_of_scope_threshold=min(1.0, scores[top] + 1e-9))
    assert [p["label"] for p in above] == [None] * len(queries)
    everything = predictions(text_api, queries, out_of_scope_threshold=0.0)
    assert None not in [p["label"] for p in everything]
    # alone, its score moves in float32's last bits (7e-8 seen on an AMD EPYC): a margin
    below = predictions(text_api, [queries[top]], out_of_scope_threshold=scores[top] - 1e-6)
    assert below[0]["label"] == everything[top]["label"]
    for a, b in zip(above, everything, strict=True):  # the same scores and probabilities
        assert (a["in_scope"], a["probabilities"]) == (b["in_scope"], b["probabilities"])


def test_the_version_keeps_its_threshold_through_readapt_examples_and_rollback(
    text_api: TestClient,
) -> None:
    v1 = created(text_api.post(ADAPT, json=adaptation(out_of_scope_threshold=1.0)))
    assert v1["out_of_scope_threshold"] == 1.0
    assert [p["label"] for p in predictions(text_api, QUERIES)] == [None] * 3  # stored
    overridden = predictions(text_api, QUERIES, out_of_scope_threshold=0.0)  # this request only
    assert [p["label"] for p in overridden] == EXPECTED

    v2 = created(text_api.post("/v1/clients/bot/readaptations", json={}))
    examples = {"inputs": ["play something relaxing"], "targets": ["music"]}
    v3 = created(text_api.post("/v1/clients/bot/examples", json=examples))
    assert (v2["origin"], v3["origin"], v3["support_size"]) == ("readapt", "examples", 10)
    assert v2["out_of_scope_threshold"] == v3["out_of_scope_threshold"] == 1.0
    v4 = created(
        text_api.post("/v1/clients/bot/readaptations", json={"out_of_scope_threshold": 0.0})
    )
    assert v4["out_of_scope_threshold"] == 0.0
    assert [p["label"] for p in predictions(text_api, QUERIES)] == EXPECTED
    v5 = created(text_api.post("/v1/clients/bot/rollback", json={"version": 1}))
    assert (v5["origin"], v5["out_of_scope_threshold"]) == ("rollback", 1.0)
    assert [p["label"] for p in predictions(text_api, QUERIES)] == [None] * 3
    listed = text_api.get("/v1/clients/bot/versions").json()["versions"]
    assert [v["out_of_scope_threshold"] for v in listed] == [1.0, 0.0, 1.0, 1.0, 1.0]
    old = predictions(text_api, QUERIES, version=4)  # a pinned version: its own threshold
    assert [p["label"] for p in old] == EXPECTED


def test_a_threshold_is_refused_where_there_is_no_in_scope_score(text_api: TestClient) -> None:
    body = {
        "meta_model": "sinusoid",
        "support": {"inputs": [[0.0], [1.0]], "targets": [0.0, 0.8]},
        "out_of_scope_threshold": 0.5,
    }
    refused = text_api.post("/v1/clients/wave/adaptations", json=body)
    assert_invalid(refused, "out_of_scope_threshold", "no in-scope score")
    created(
        text_api.post("/v1/clients/wave/adaptations", json={**body, "out_of_scope_threshold": None})
    )
    query = {"inputs": [[0.5]], "out_of_scope_threshold": 0.5}
    predicted = text_api.post("/v1/clients/wave/predictions", json=query)
    assert_invalid(predicted, "out_of_scope_threshold", "no in-scope score")
    bulk = text_api.post(
        "/v1/predictions:batch", json={"requests": [{"client_id": "wave", **query}]}
    )
    assert bulk.status_code == 200, bulk.text
    error = bulk.json()["results"][0]["error"]
    assert error["status"] == 422
    assert error["message"].startswith("requests[0].out_of_scope_threshold:"), error
    readapt = text_api.post("/v1/clients/wave/readaptations", json={"out_of_scope_threshold": 0.1})
    assert_invalid(readapt, "out_of_scope_threshold", "no in-scope score")


LONG = "a" * 2001
BAD_TEXTS: dict[str, tuple[Any, str, tuple[str, ...]]] = {
    "a number": (17, "[1]", ()),
    "null": (None, "[1]", ()),
    "a list": (["book", "a flight"], "[1]", ()),
    "an empty text": ("", "[1]", ("empty",)),
    "whitespace only": (" \t\n ", "[1]", ("whitespace",)),
    "too long": (LONG, "[1]", ("2001 characters", "2000", "max_text_chars")),
}


def test_a_bad_text_is_422_naming_it_in_adaptations_examples_and_predictions(
    text_api: TestClient,
) -> None:
    created(text_api.post(ADAPT, json=adaptation()))
    for name, (value, where, words) in BAD_TEXTS.items():
        inputs = [TEXTS[0], value, *TEXTS[2:]]
        body = adaptation() | {"support": {"inputs": inputs, "targets": LABELS}}
        refused = text_api.post("/v1/clients/other/adaptations", json=body)
        assert_invalid(refused, "support.inputs" + where, *words)
        predicted = text_api.post(PREDICT, json={"inputs": [QUERIES[0], value]})
        assert_invalid(predicted, "inputs" + where, *words)
        examples = {"inputs": [value], "targets": ["music"]}
        added = text_api.post("/v1/clients/bot/examples", json=examples)
        assert_invalid(added, "inputs[0]", *words)
        items = [{"client_id": "bot", "inputs": QUERIES}, {"client_id": "bot", "inputs": [value]}]
        bulk = text_api.post("/v1/predictions:batch", json={"requests": items})
        if not isinstance(value, str):  # the wire schema refuses the whole request
            assert_invalid(bulk, "requests[1].inputs[0]")
            continue
        assert bulk.status_code == 200, bulk.text  # one bad item fails only itself
        good, bad = bulk.json()["results"]
        assert len(good["predictions"]) == 3
        assert bad["error"]["status"] == 422, (name, bad)
        assert bad["error"]["message"].startswith("requests[1].inputs[0]:"), bad
    assert text_api.get("/v1/clients/other").status_code == 404
    assert len(text_api.get("/v1/clients/bot").json()["versions"]) == 1


def test_text_at_the_limit_is_encoded_truncated(text_api: TestClient) -> None:
    created(text_api.post(ADAPT, json=adaptation()))
    longest = ("book a flight to rome " * 100)[:2000]  # ~500 word pieces: past the 256
    answered = predictions(text_api, [longest], out_of_scope_threshold=0.0)
    assert answered[0]["label"] == "flight"


def test_invalid_unicode_is_422_naming_the_problem(text_api: TestClient) -> None:
    created(text_api.post(ADAPT, json=adaptation()))
    raw = text_api.post(
        PREDICT,
        content=b'{"inputs": ["book a flight \xff\xfe to rome"]}',
        headers={"Content-Type": "application/json"},
    )
    assert_invalid(raw, "body", "not UTF-8")
    surrogate = text_api.post(
        PREDICT,
        content=b'{"inputs": ["book a flight \\ud800 to rome"]}',
        headers={"Content-Type": "application/json"},
    )
    assert_invalid(surrogate, "inputs[0]", "surrogate")


def labelled(ways: int, per_class: int) -> dict[str, Any]:
    inputs = [f"request number {i} of intent {c}" for c in range(ways) for i in range(per_class)]
    targets = [f"intent-{c}" for c in range(ways) for _ in range(per_class)]
    return adaptation() | {"support": {"inputs": inputs, "targets": targets}}


LIMITS = [  # body, status, field, words
    (labelled(1, 3), 422, "support.targets", ("a single label", "at least 2")),
    (labelled(161, 1), 422, "support.targets", ("161 distinct labels", "at most 160")),
    (labelled(2, 101), 422, "support.targets[0]", ("101 example(s)", "1 to 100 per class")),
    (labelled(11, 91), 413, "support.inputs", ("1001 points", "limit of 1000")),
]


def test_support_sets_outside_the_limits_are_refused_naming_the_field(
    text_api: TestClient,
) -> None:
    """One class, more classes than max_way, more examples per class than trained_for,
    more support points than max_support (413, as for every family: a size limit)."""
    for body, status, field, words in LIMITS:
        assert_invalid(text_api.post(ADAPT, json=body), field, *words, status=status)
    within = labelled(160, 1)  # max_way classes of 1 example: accepted
    assert created(text_api.post(ADAPT, json=within))["labels"][-1] == "intent-159"


def test_thresholds_outside_0_to_1_or_not_numbers_are_422(text_api: TestClient) -> None:
    created(text_api.post(ADAPT, json=adaptation()))
    for value in (-0.1, 1.5, "0.5", True):
        refused = text_api.post(PREDICT, json={"inputs": QUERIES, "out_of_scope_threshold": value})
        assert_invalid(refused, "out_of_scope_threshold")
        refused = text_api.post(ADAPT, json=adaptation(out_of_scope_threshold=value))
        assert_invalid(refused, "out_of_scope_threshold")


def test_bulk_adaptations_and_predictions_carry_the_threshold(text_api: TestClient) -> None:
    items = [
        {"client_id": "strict", **adaptation(out_of_scope_threshold=1.0)},
        {"client_id": "lenient", **adaptation(out_of_scope_threshold=0.0)},
        {
            "client_id": "wave",
            "meta_model": "sinusoid",
            "support": {"inputs": [[0.0], [1.0]], "targets": [0.0, 0.8]},
            "out_of_scope_threshold": 0.5,
        },
    ]
    made = text_api.post("/v1/adaptations:batch", json={"adaptations": items})
    assert made.status_code == 200, made.text
    strict, lenient, wave = made.json()["results"]
    assert (strict["out_of_scope_threshold"], lenient["out_of_scope_threshold"]) == (1.0, 0.0)
    assert wave["error"]["status"] == 422
    assert wave["error"]["message"].startswith("adaptations[2].out_of_scope_threshold:")
    requests = [
        {"client_id": "strict", "inputs": QUERIES},
        {"client_id": "lenient", "inputs": QUERIES},
        {"client_id": "strict", "inputs": QUERIES, "out_of_scope_threshold": 0.0},
    ]
    answered = text_api.post("/v1/predictions:batch", json={"requests": requests})
    assert answered.status_code == 200, answered.text
    labels = [[p["label"] for p in r["predictions"]] for r in answered.json()["results"]]
    assert labels == [[None] * 3, EXPECTED, EXPECTED]


def test_idempotent_retries_and_tenants_hold_for_text_clients(
    make_api: ApiFactory, text_models_dir: Path, session: Session
) -> None:
    api = make_api(models_dir=text_models_dir, auth="required", auth_cache_s=0)
    keys = {
        tenant: {
            "Authorization": "Bearer "
            + usecases.keys.create(session=session, tenant_id=tenant, scope="client").token
        }
        for tenant in ("acme", "globex")
    }
    retry = {**keys["acme"], "Idempotency-Key": "text-1"}
    first = created(api.post(ADAPT, json=adaptation(), headers=retry))
    again = api.post(ADAPT, json=adaptation(), headers=retry)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["version_id"] == first["version_id"]
    swapped = {"inputs": TEXTS, "targets": LABELS[3:6] + LABELS[6:] + LABELS[:3]}
    theirs = created(
        api.post(ADAPT, json=adaptation() | {"support": swapped}, headers=keys["globex"])
    )
    assert (first["version"], theirs["version"]) == (1, 1)  # the same client id, apart
    query = {"inputs": QUERIES[:1], "out_of_scope_threshold": 0.0}
    mine = api.post(PREDICT, json=query, headers=keys["acme"]).json()["predictions"][0]
    other = api.post(PREDICT, json=query, headers=keys["globex"]).json()["predictions"][0]
    assert (mine["label"], other["label"]) == ("flight", "balance")  # each its own labels


def test_metrics_count_encoder_passes_and_embedding_cache_hits(text_api: TestClient) -> None:
    created(text_api.post(ADAPT, json=adaptation()))  # 9 new texts (and names): one pass
    predictions(text_api, [TEXTS[0], QUERIES[0]])  # one seen, one new: a pass of one text
    predictions(text_api, [QUERIES[0]])  # all seen: no pass
    _, samples = observed.scrape(text_api)
    seen = len(TEXTS) + len(NAMES) + 1
    assert observed.value(samples, "fastadapt_encoder_passes_total") == 2
    assert observed.value(samples, "fastadapt_encoder_texts_total") == seen
    assert observed.value(samples, "fastadapt_embedding_cache_hits_total") == 2
    assert observed.value(samples, "fastadapt_embedding_cache_misses_total") == seen
    assert observed.value(samples, "fastadapt_embedding_cache_entries") == seen
    assert observed.value(samples, "fastadapt_embedding_cache_bytes") > (seen) * 384 * 4
    assert observed.value(samples, "fastadapt_engine_batch_size_count", kind="encode") == 2
    stats = text_api.get("/v1/engine/stats").json()
    assert stats["predict"]["jobs"] == 2  # an encode pass is not counted as a prediction
