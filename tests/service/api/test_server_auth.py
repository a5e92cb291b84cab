"""Real processes: a key revoked with `fastadapt keys revoke` is refused within 5 s by two
`fastadapt serve` replicas that were already running and trusted it (SQLite and PostgreSQL),
and no key reaches their logs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.service.api.test_server import REPO, server
from tests.service.store_fixtures import BACKENDS

REVOKED_WITHIN_S = 5.0


def keys(env: dict[str, str], *argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "keys", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_key_revoked_by_the_cli_is_refused_by_running_replicas_within_5_s(
    backend: str, fresh_database: Callable[[str], str], models_dir: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTADAPT_")}
    env |= {
        "FASTADAPT_DATABASE_URL": fresh_database(backend),
        "FASTADAPT_MODELS_DIR": str(models_dir),
        "FASTADAPT_THREADS": "1",
        "FASTADAPT_AUTH": "required",
        "FASTADAPT_AUTH_CACHE_S": "2",
    }
    token = keys(env, "create", "--tenant", "acme").splitlines()[-1]
    other = keys(env, "create", "--tenant", "acme").splitlines()[-1]
    key_id = keys(env, "list", "--tenant", "acme").splitlines()[1].split()[0]
    headers = {"Authorization": f"Bearer {token}"}
    log = tmp_path / "servers.log"
    support = {"inputs": [[-3.0], [-0.5], [1.0], [2.5]], "targets": [-0.1, -1.4, 0.8, 1.9]}
    with server(env, log) as first, server(env, log) as second:
        assert first.get("/v1/meta-models").status_code == 401  # keys are required
        body = {"meta_model": "sinusoid", "support": support}
        response = first.post("/v1/clients/alice/adaptations", json=body, headers=headers)
        assert response.status_code == 201, response.text
        for replica in (first, second):  # both trust the key now (cached)
            assert replica.get("/v1/clients/alice", headers=headers).status_code == 200

        keys(env, "revoke", key_id)
        revoked = time.monotonic()
        pending = {"first": first, "second": second}
        while pending:
            for name, replica in list(pending.items()):
                if replica.get("/v1/clients/alice", headers=headers).status_code == 401:
                    del pending[name]
            assert time.monotonic() - revoked < REVOKED_WITHIN_S, f"still accepted: {pending}"
            time.sleep(0.1)
        still = {"Authorization": f"Bearer {other}"}  # the tenant's other key still works
        assert second.get("/v1/clients/alice", headers=still).status_code == 200
    logged = log.read_text()
    assert '"route": "/v1/clients/{client_id}"' in logged  # the access log is there, no keys
    assert token not in logged and other not in logged
