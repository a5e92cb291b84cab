"""``/v1/meta-models``, end to end on SQLite and PostgreSQL: versions, promotions (admin
scope), uploads (off by default), and a promotion that never changes an old client's
predictions while new adaptations and readaptations use the promoted version."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from models.checkpoint import MetaModel
from service import usecases
from tests.diverged import write_diverged
from tests.service.registry_helpers import perturbed, same_bits

XS = [[-4.0], [-2.5], [-1.0], [0.0], [1.5], [3.0]]
YS = [0.7, -0.5, -1.6, -0.9, 1.2, 0.3]
QUERIES = [[-3.0], [-0.5], [0.25], [2.0]]


def adapt(api: TestClient, client_id: str, **headers: str) -> dict[str, Any]:
    body = {"meta_model": "sinusoid", "support": {"inputs": XS, "targets": YS}}
    response = api.post(f"/v1/clients/{client_id}/adaptations", json=body, headers=headers)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def predictions(api: TestClient, client_id: str, version: int | None = None) -> list[float]:
    body: dict[str, Any] = {"inputs": QUERIES}
    if version is not None:
        body["version"] = version
    response = api.post(f"/v1/clients/{client_id}/predictions", json=body)
    assert response.status_code == 200, response.text
    result: list[float] = response.json()["predictions"]
    return result


def upload_body(model: MetaModel, **changes: Any) -> dict[str, Any]:
    weights = model.weights_bytes()
    return {
        "config": json.loads(model.config.to_json()),
        "weights": base64.b64encode(weights).decode(),
        "sha256": model.version,
        **changes,
    }


def register(session: Session, api: TestClient, model: MetaModel) -> None:
    """As `fastadapt meta-models register` does it, on the test's transaction."""
    registry = api.app.state.runtime.registry  # type: ignore[attr-defined]
    usecases.meta_models.register(session=session, registry=registry, model=model, source="cli")


def test_a_promotion_leaves_old_clients_bit_identical_and_moves_new_adaptations(
    api: TestClient, session: Session, models_dir: Path, tmp_path: Path, sinusoid: MetaModel
) -> None:
    old = adapt(api, "alice")
    assert old["meta_model_version"] == sinusoid.version
    before = predictions(api, "alice")
    newer = perturbed(models_dir / "sinusoid", tmp_path / "newer" / "sinusoid")
    register(session, api, newer)
    assert api.get("/v1/meta-models/sinusoid").json()["version"] == sinusoid.version

    promoted = api.post("/v1/meta-models/sinusoid/promote", json={"version": newer.version})
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["sha"] == newer.version and promoted.json()["promoted"]
    assert api.get("/v1/meta-models/sinusoid").json()["version"] == newer.version
    listed = api.get("/v1/meta-models/sinusoid/versions").json()["versions"]
    flags = {v["sha"]: v["promoted"] for v in listed}
    assert flags[newer.version] and not flags[sinusoid.version]

    assert same_bits(predictions(api, "alice"), before)  # no 409, not a bit changed
    api.app.state.runtime.engine.forget("default", "alice")  # type: ignore[attr-defined]
    assert same_bits(predictions(api, "alice"), before)  # read back from the store too
    bob = adapt(api, "bob")
    assert bob["meta_model_version"] == newer.version
    assert not same_bits(predictions(api, "bob"), before)  # same support set, new meta-model

    moved = api.post("/v1/clients/alice/readaptations")
    assert moved.status_code == 201, moved.text
    assert (moved.json()["version"], moved.json()["meta_model_version"]) == (2, newer.version)
    assert same_bits(predictions(api, "alice"), predictions(api, "bob"))
    assert same_bits(predictions(api, "alice", version=1), before)  # pinned: the old one


def test_unloaded_versions_load_again_on_demand(
    make_api: Any, session: Session, models_dir: Path, tmp_path: Path, sinusoid: MetaModel
) -> None:
    api = make_api(meta_model_cache_bytes=0)  # only the version in use stays loaded
    adapt(api, "alice")
    before = predictions(api, "alice")
    newer = perturbed(models_dir / "sinusoid", tmp_path / "newer" / "sinusoid")
    register(session, api, newer)
    api.post("/v1/meta-models/sinusoid/promote", json={"version": newer.version[:12]})
    adapt(api, "bob")  # loads the new version, unloading the old one
    runtime = api.app.state.runtime  # type: ignore[attr-defined]
    assert sinusoid.version not in runtime.registry.loaded()
    assert sinusoid.version not in runtime.engine.loaded()
    api.app.state.runtime.engine.forget("default", "alice")  # type: ignore[attr-defined]
    assert same_bits(predictions(api, "alice"), before)  # loaded again, same bits
    assert runtime.registry.loaded() == [sinusoid.version]


def test_promote_and_upload_need_the_admin_scope(
    make_api: Any, session: Session, models_dir: Path, tmp_path: Path
) -> None:
    api = make_api(auth="required", auth_cache_s=0, allow_model_upload=True)
    client = usecases.keys.create(session=session, tenant_id="acme", scope="client")
    headers = {"Authorization": f"Bearer {client.token}"}
    assert api.get("/v1/meta-models/sinusoid/versions", headers=headers).status_code == 200
    sha = api.get("/v1/meta-models/sinusoid", headers=headers).json()["version"]
    refused = api.post("/v1/meta-models/sinusoid/promote", json={"version": sha}, headers=headers)
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "forbidden"
    newer = perturbed(models_dir / "sinusoid", tmp_path / "newer" / "sinusoid")
    assert api.post("/v1/meta-models", json=upload_body(newer), headers=headers).status_code == 403
    assert api.post("/v1/meta-models/sinusoid/promote", json={"version": sha}).status_code == 401


def test_uploads_are_off_by_default(api: TestClient, models_dir: Path, tmp_path: Path) -> None:
    newer = perturbed(models_dir / "sinusoid", tmp_path / "newer" / "sinusoid")
    response = api.post("/v1/meta-models", json=upload_body(newer))  # open loopback: admin
    assert response.status_code == 403
    assert "FASTADAPT_ALLOW_MODEL_UPLOAD" in response.json()["error"]["message"]
    versions = api.get("/v1/meta-models/sinusoid/versions").json()["versions"]
    assert newer.version not in {v["sha"] for v in versions}


def test_an_enabled_upload_checks_everything_and_registers(
    make_api: Any, models_dir: Path, tmp_path: Path
) -> None:
    api = make_api(allow_model_upload=True)
    newer = perturbed(models_dir / "sinusoid", tmp_path / "newer" / "sinusoid")
    bad = [
        (upload_body(newer, sha256="0" * 64), "sha256"),
        (upload_body(newer, weights="not base64!"), "weights"),
        (upload_body(newer, config={"name": "sinusoid"}), "config"),
        (
            upload_body(
                newer, weights=base64.b64encode(b"\x80\x04pickle").decode(), sha256="a" * 64
            ),
            "sha256",
        ),
    ]
    for body, field in bad:
        response = api.post("/v1/meta-models", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["message"].startswith(field)
    pickled = b"\x80\x04\x95pickle"  # the right sha, but not safetensors
    body = upload_body(newer, weights=base64.b64encode(pickled).decode())
    body["sha256"] = hashlib.sha256(pickled).hexdigest()
    response = api.post("/v1/meta-models", json=body)
    assert response.status_code == 422 and "safetensors" in response.json()["error"]["message"]

    write_diverged(models_dir / "sinusoid", tmp_path / "diverged")  # issue 20: NaN weights
    nan = (tmp_path / "diverged" / "weights.safetensors").read_bytes()
    body = upload_body(newer, weights=base64.b64encode(nan).decode())
    body["sha256"] = hashlib.sha256(nan).hexdigest()
    response = api.post("/v1/meta-models", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith("weights: upload: ")
    assert "NaN or infinity" in response.json()["error"]["message"]

    created = api.post("/v1/meta-models", json=upload_body(newer, promote=True))
    assert created.status_code == 201, created.text
    assert created.json() | {"registered_at": None} == {
        "name": "sinusoid",
        "sha": newer.version,
        "size_bytes": len(newer.weights_bytes()),
        "source": "api",
        "registered_at": None,
        "promoted": True,
        "added": True,
    }
    again = api.post("/v1/meta-models", json=upload_body(newer))
    assert again.status_code == 201 and again.json()["added"] is False
    assert adapt(api, "carol")["meta_model_version"] == newer.version


def test_unknown_names_and_versions(api: TestClient) -> None:
    assert api.get("/v1/meta-models/nope").status_code == 404
    assert api.get("/v1/meta-models/nope/versions").status_code == 404
    response = api.post("/v1/meta-models/sinusoid/promote", json={"version": "0" * 64})
    assert response.status_code == 404
    short = api.post("/v1/meta-models/sinusoid/promote", json={"version": "abc"})
    assert short.status_code == 422 and "version" in short.json()["error"]["message"]
    paths = api.get("/openapi.json").json()["paths"]
    assert "403" in paths["/v1/meta-models/{name}/promote"]["post"]["responses"]
    assert "201" in paths["/v1/meta-models"]["post"]["responses"]


def test_meta_models_list_names_every_promoted_version(api: TestClient) -> None:
    listed = api.get("/v1/meta-models").json()["meta_models"]
    assert [m["name"] for m in listed] == ["plane", "sinusoid", "sinusoid-metasgd"]
