"""Image and labelled meta-models through the API: PNG uploads, the client's own labels,
probabilities, and bad images that get 422 or 413, never 500."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from models import nets
from models.checkpoint import ArtifactConfig, MetaModel
from models.maml import InnerLoopConfig
from models.tasks.omniglot import preprocess
from tests.service.conftest import ApiFactory

MAX_WAY = 5


def save(
    root: Path,
    name: str,
    family: str,
    architecture: dict[str, Any],
    task: dict[str, Any],
    inner: InnerLoopConfig,
) -> None:
    torch.manual_seed(0)
    net = nets.build(architecture)
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    config = ArtifactConfig(name, family, architecture, task, inner, {"command": "tests"})
    MetaModel(config, params, {}, version="").save(root / name)


@pytest.fixture(scope="module")
def labelled_models(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    """A tiny untrained Conv4 image classifier, a 2-feature tabular classifier, and the
    regression ``sinusoid`` of the other tests."""
    root = tmp_path_factory.mktemp("labelled")
    head_only = InnerLoopConfig(steps=20, lr=2.0, adapt="head")
    save(
        root,
        "glyphs",
        "omniglot",
        {
            "kind": "conv4",
            "channels": 8,
            "groups": 2,
            "out_features": MAX_WAY,
            "feature_scale": 5.0,
        },
        {"kind": "classification", "input_shape": [1, 28, 28], "max_way": MAX_WAY},
        head_only,
    )
    save(
        root,
        "blobs",
        "tabular",
        {"kind": "mlp", "in_features": 2, "hidden": [16], "out_features": 3},
        {"kind": "classification", "input_shape": [2], "max_way": 3},
        InnerLoopConfig(steps=20, lr=0.5),
    )
    (root / "sinusoid").symlink_to(models_dir / "sinusoid")
    return root


@pytest.fixture
def api(make_api: ApiFactory, labelled_models: Path) -> TestClient:
    return make_api(models_dir=labelled_models)


def png(array: np.ndarray) -> str:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def glyph(kind: str, size: int = 105) -> np.ndarray:
    """Black strokes on white: a horizontal bar, a vertical bar or a diagonal."""
    image = np.full((size, size), 255, dtype=np.uint8)
    third = slice(size // 3, 2 * size // 3)
    if kind == "h":
        image[size // 2 - 6 : size // 2 + 6, third] = 0
    elif kind == "v":
        image[third, size // 2 - 6 : size // 2 + 6] = 0
    else:
        for i in range(size // 4, 3 * size // 4):
            image[i, max(i - 6, 0) : i + 6] = 0
    return image


def adapt(api: TestClient, client: str, body: dict[str, Any]) -> Any:
    return api.post(f"/v1/clients/{client}/adaptations", json=body)


def test_png_uploads_with_string_labels(api: TestClient) -> None:
    images = {kind: png(glyph(kind)) for kind in "hvd"}
    support = {"inputs": [images[k] for k in "hvdhvd"], "targets": ["bar", "pole", "slash"] * 2}
    created = adapt(api, "ann", {"meta_model": "glyphs", "support": support})
    assert created.status_code == 201, created.text
    assert created.json()["labels"] == ["bar", "pole", "slash"]

    answer = api.post("/v1/clients/ann/predictions", json={"inputs": [images[k] for k in "hvd"]})
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert [p["label"] for p in predictions] == ["bar", "pole", "slash"]
    for p in predictions:
        assert set(p["probabilities"]) == {"bar", "pole", "slash"}
        assert abs(sum(p["probabilities"].values()) - 1.0) < 1e-6
        assert p["probabilities"][p["label"]] == max(p["probabilities"].values())
    history = api.get("/v1/clients/ann").json()
    assert history["versions"][0]["labels"] == ["bar", "pole", "slash"]

    # the stored PNGs and labels adapt again, to the same result on the same artifact
    again = api.post("/v1/clients/ann/readaptations", json={})
    assert again.status_code == 201, again.text
    assert again.json()["version"] == 2 and again.json()["labels"] == ["bar", "pole", "slash"]
    for field in ("support_size", "support_loss_before", "support_loss_after"):
        assert again.json()[field] == pytest.approx(created.json()[field], rel=1e-6)
    replay = api.post("/v1/clients/ann/predictions", json={"inputs": [images[k] for k in "hvd"]})
    for now, then in zip(replay.json()["predictions"], predictions, strict=True):
        assert now["label"] == then["label"]
        assert now["probabilities"] == pytest.approx(then["probabilities"], rel=1e-5, abs=1e-9)


def test_an_array_of_the_input_shape_equals_its_image(api: TestClient) -> None:
    images = [glyph(k) for k in "hv"]
    support = {"inputs": [png(i) for i in images], "targets": [7, 3]}
    assert adapt(api, "bob", {"meta_model": "glyphs", "support": support}).status_code == 201
    as_array = preprocess(images[1]).tolist()  # (1, 28, 28)
    by_image = api.post("/v1/clients/bob/predictions", json={"inputs": [png(images[1])]}).json()
    by_array = api.post("/v1/clients/bob/predictions", json={"inputs": [as_array]}).json()
    assert by_image["predictions"] == by_array["predictions"]
    assert by_image["predictions"][0]["label"] == 3  # integer labels stay integers
    assert set(by_image["predictions"][0]["probabilities"]) == {"7", "3"}


def test_one_prediction_does_not_depend_on_the_others(api: TestClient) -> None:
    support = {"inputs": [png(glyph(k)) for k in "hvd"], "targets": ["h", "v", "d"]}
    assert adapt(api, "cat", {"meta_model": "glyphs", "support": support}).status_code == 201
    one = api.post("/v1/clients/cat/predictions", json={"inputs": [png(glyph("d"))]}).json()
    many = api.post(
        "/v1/clients/cat/predictions", json={"inputs": [png(glyph(k)) for k in "hvdd"]}
    ).json()
    assert many["predictions"][2] == many["predictions"][3]
    for label, p in one["predictions"][0]["probabilities"].items():
        assert abs(p - many["predictions"][2]["probabilities"][label]) < 1e-6


def test_tabular_classification_with_labels(api: TestClient) -> None:
    support = {
        "inputs": [[-2.0, -2.0], [-2.2, -1.8], [2.0, 2.0], [1.8, 2.1], [2.0, -2.0], [2.1, -1.9]],
        "targets": ["low", "low", "high", "high", "mixed", "mixed"],
    }
    assert adapt(api, "dan", {"meta_model": "blobs", "support": support}).status_code == 201
    answer = api.post("/v1/clients/dan/predictions", json={"inputs": [[-2.1, -2.0], [2.0, 1.9]]})
    assert [p["label"] for p in answer.json()["predictions"]] == ["low", "high"]


@pytest.mark.parametrize(
    ("meta_model", "inputs"),
    [
        ("glyphs", [png(glyph(k)) for k in "hvd"]),
        ("blobs", [[-2.0, -2.0], [-2.2, -1.8], [2.0, 2.0]]),
    ],
)
def test_a_support_set_of_one_class_is_refused(
    api: TestClient, meta_model: str, inputs: list[Any]
) -> None:
    """Issue 20: a classifier adapted to one class answers that label with probability 1
    whatever it is shown; every classification family refuses it, naming the field."""
    for targets in (["cat"] * len(inputs), [7] * len(inputs)):
        body = {"meta_model": meta_model, "support": {"inputs": inputs, "targets": targets}}
        response = adapt(api, "gil", body)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_input"
        assert error["message"].startswith("support.targets: a single label"), error
        assert "at least 2 classes" in error["message"]
    assert api.get("/v1/clients/gil").status_code == 404  # nothing was stored
    two = {"inputs": inputs, "targets": ["cat", "dog", "cat"]}
    assert adapt(api, "gil", {"meta_model": meta_model, "support": two}).status_code == 201


def header_only_png(width: int, height: int) -> str:
    """A PNG that claims a huge canvas and holds no pixels: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    return base64.b64encode(data).decode()


GOOD = png(glyph("h"))
TRUNCATED = base64.b64encode(base64.b64decode(GOOD)[:60]).decode()


@pytest.mark.parametrize(
    ("inputs", "targets", "status", "mention"),
    [
        (["not base64!"], ["a"], 422, "support.inputs[0]: not base64"),
        ([base64.b64encode(b"hello there").decode()], ["a"], 422, "not a PNG or JPEG"),
        ([GOOD, TRUNCATED], ["a", "b"], 422, "support.inputs[1]: the image is truncated"),
        ([header_only_png(50_000, 50_000)], ["a"], 413, "exceeds the limit"),  # a bomb
        ([header_only_png(3_000, 2_000)], ["a"], 413, "3000x2000 image exceeds the limit"),
        ([GOOD] * 6, list("abcdef"), 422, "6 distinct labels"),
        ([GOOD, GOOD], ["a", 1.5], 422, "support.targets[1]"),
        ([GOOD, GOOD], [1, "1"], 422, "clash"),
        ([[[[0.0] * 28] * 27]], ["a"], 422, "expected shape [1, 28, 28]"),
        ([[0.0] * 10], ["a"], 422, "expected 784 value(s)"),
    ],
)
def test_bad_images_and_labels(
    api: TestClient, inputs: list[Any], targets: list[Any], status: int, mention: str
) -> None:
    response = adapt(
        api, "eve", {"meta_model": "glyphs", "support": {"inputs": inputs, "targets": targets}}
    )
    assert response.status_code == status, response.text
    assert mention in response.json()["error"]["message"]
    assert api.get("/v1/clients/eve").status_code == 404  # nothing was stored


def test_regression_meta_models_take_neither_images_nor_labels(api: TestClient) -> None:
    image = adapt(
        api, "fay", {"meta_model": "sinusoid", "support": {"inputs": [GOOD], "targets": [1.0]}}
    )
    assert image.status_code == 422 and "takes numbers, not images" in image.text
    label = adapt(
        api, "fay", {"meta_model": "sinusoid", "support": {"inputs": [[1.0]], "targets": ["up"]}}
    )
    assert label.status_code == 422 and "support.targets[0]" in label.text


def test_integer_labels_of_any_size(api: TestClient) -> None:
    """A 400-digit integer is a label like any other (compared, never made a float)."""
    big = int("1" + "0" * 400)
    support = {"inputs": [[-2.0, -2.0], [-2.2, -1.8], [2.0, 2.0], [1.8, 2.1]]}
    text = json.dumps({"meta_model": "blobs", "support": support})
    text = text[:-2] + f', "targets": [{big}, {big}, -{big}, -{big}]}}}}'
    response = api.post(
        "/v1/clients/erin/adaptations", content=text, headers={"content-type": "application/json"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["labels"] == [big, -big]
    answer = api.post("/v1/clients/erin/predictions", json={"inputs": [[2.0, 2.1]]})
    assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == -big
    history = api.get("/v1/clients/erin").json()
    assert history["versions"][0]["labels"] == [big, -big]
