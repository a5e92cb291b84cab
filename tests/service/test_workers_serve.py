"""``fastadapt serve --workers 2`` on SQLite, as ``make serve`` would run it: the fronts
share the database file and one engine process; an engine process that cannot start
stops the whole server with exit status 3 instead of restarting forever."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from tests.live import REPO, clean_env, free_port, server
from tests.replicas.helpers import adapt, predict
from tests.service.tiny_models import meta_model


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    meta_model("sinusoid").save(folder / "sinusoid")
    return folder


def test_two_fronts_on_sqlite_adapt_and_predict_what_each_other_stored(
    tmp_path: Path, models_dir: Path
) -> None:
    env = clean_env(
        data_dir=tmp_path / "data", models_dir=models_dir, workers="2", access_log="false"
    )
    with server(env, tmp_path / "server.log") as client:
        for i in range(6):  # a new connection each: either front may take it
            with httpx.Client(base_url=client.base_url, timeout=30) as one:
                assert adapt(one, f"c{i}", i).status_code == 201
        for i in range(6):
            with httpx.Client(base_url=client.base_url, timeout=30) as one:
                assert len(predict(one, f"c{i}")["predictions"]) == 5
        stats = client.get("/v1/engine/stats").json()
        assert stats["adapt"]["jobs"] >= 6 and stats["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_engine_process_that_cannot_start_stops_the_server_with_status_3(
    tmp_path: Path, models_dir: Path
) -> None:
    env = clean_env(
        data_dir=tmp_path / "data", models_dir=models_dir, workers="2", device="cuda"
    )  # the engine process refuses a CUDA device it does not have, at start-up
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(free_port())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 3, done.stderr[-3000:]
    assert "engine process: failed 5 times at start-up; stopping" in done.stderr
    assert "CUDA is not available" in done.stderr
