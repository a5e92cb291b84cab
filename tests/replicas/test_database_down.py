"""PostgreSQL stops under a running replica: every /v1 route answers 503 with Retry-After,
/readyz is not ready, /healthz still answers; once PostgreSQL is back the replica recovers
by itself (no restart) and has lost nothing. The test runs its own PostgreSQL cluster (initdb
into a temporary directory, on its own port): the shared server is never touched."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.store import migrate
from tests.live import Replica, clean_env, free_port
from tests.replicas.conftest import create_key
from tests.replicas.helpers import adapt, body, predict, versions
from tests.service.tiny_models import meta_model

RECOVERY_S = 30.0  # generous: pool_pre_ping reconnects on the first request after the restart


def postgres_bindir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: ``pg_config --bindir``, else on PATH."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        bindir = Path(done.stdout.strip())
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


class Cluster:
    """A throw-away PostgreSQL cluster on a free loopback port; as root, run as ``postgres``
    (initdb refuses root)."""

    def __init__(self, bindir: Path, user: str | None) -> None:
        self.bindir = bindir
        self.user = user
        self.root = Path(tempfile.mkdtemp(prefix="fastadapt-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def _run(self, *args: str) -> None:
        done = subprocess.run(args, user=self.user, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{args[0]}: {done.stdout}{done.stderr}"

    def initdb(self) -> None:
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
            "--auth=trust", "--no-sync", "--encoding=UTF8",
        )  # fmt: skip

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c full_page_writes=off"
        )
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        """Stop it if it runs, and delete its files."""
        pid = self.data / "postmaster.pid"
        if pid.exists():
            subprocess.run(
                [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                user=self.user,
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's initdb and pg_ctl are not installed")
    user = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres").pw_name
        except KeyError:
            pytest.skip("running as root without a postgres user to run initdb as")
    cluster = Cluster(bindir, user)
    try:
        cluster.initdb()
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["error"]["type"] == "unavailable"


def test_postgres_stopped_answers_503_everywhere_and_recovers_without_a_restart(
    cluster: Cluster, tmp_path: Path
) -> None:
    migrate.upgrade(cluster.url)
    _, key = create_key(cluster.url, "client")
    meta_model("sinusoid").save(tmp_path / "models" / "sinusoid")
    env = clean_env(
        database_url=cluster.url,
        models_dir=str(tmp_path / "models"),
        data_dir=str(tmp_path / "data"),
        threads="1",
        auth="required",
        auth_cache_s="0",  # every request reads its key: no route answers from a cache
        access_log="false",
    )
    replica = Replica("db-down", env, tmp_path / "db-down.log").start().wait_ready()
    try:
        with replica.client(key, timeout=30) as client:
            assert adapt(client, "steady", 1).status_code == 201
            before = predict(client, "steady", 1)
            cluster.stop()
            requests: list[tuple[str, str, dict[str, Any] | None]] = [
                ("GET", "/v1/meta-models", None),
                ("GET", "/v1/meta-models/sinusoid", None),
                ("POST", "/v1/clients/steady/adaptations", body(2)),
                ("POST", "/v1/clients/steady/predictions", {"inputs": [[0.5]]}),
                ("GET", "/v1/clients/steady/predictions?x=0.5", None),
                ("GET", "/v1/clients/steady", None),
                ("DELETE", "/v1/clients/steady", None),
                ("GET", "/v1/engine/stats", None),
            ]
            for method, path, json in requests:
                assert_unavailable(client.request(method, path, json=json))
            assert_unavailable(client.get("/readyz"))
            assert client.get("/healthz").status_code == 200  # alive: do not restart it
            cluster.start()
            deadline = time.monotonic() + RECOVERY_S
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, replica.tail()
                time.sleep(0.2)
            assert predict(client, "steady", 1) == before  # nothing lost, nothing changed
            assert versions(client, "steady") == [1]  # the refused ones stored nothing
            created = adapt(client, "steady", 2)
            assert created.status_code == 201 and created.json()["version"] == 2
        assert replica.terminate() == 0
    finally:
        replica.kill()
