"""Replicas on one PostgreSQL database: real ``fastadapt serve`` processes on their own
ports (``tests.live``), a fresh schema of ``FASTADAPT_TEST_POSTGRES_URL``, a tiny sinusoid
meta-model (and, for the pair up all session, the shipped ``intents`` text meta-model),
keys required, and keys made directly in the database."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from service.store import migrate
from service.store.session import connect, session_factory
from service.usecases import keys
from tests.live import Replica, clean_env, start_all, stop_all
from tests.service.store_fixtures import Databases
from tests.service.text_fixtures import INTENTS
from tests.service.tiny_models import meta_model

POSTGRES_ENV = "FASTADAPT_TEST_POSTGRES_URL"
TENANT = "replicas"


class Deployment(NamedTuple):
    database_url: str  # the schema every replica uses
    models_dir: Path  # a tiny "sinusoid" meta-model
    key: str  # a client key of TENANT
    admin_key: str  # an admin key of TENANT
    tmp: Path
    text_models_dir: Path  # "sinusoid" and the shipped text meta-model "intents"

    def env(self, **settings: str) -> dict[str, str]:
        """A replica's environment; ``settings`` override (auth_cache_s="0", ...)."""
        base = {
            "database_url": self.database_url,
            "models_dir": str(self.models_dir),
            "data_dir": str(self.tmp / "data"),
            "threads": "1",
            "auth": "required",
            "access_log": "false",
            "versions_kept": "1000",  # retention (where it exists) must not prune these tests
        }
        return clean_env(**(base | settings))

    def replica(self, name: str, **settings: str) -> Replica:
        return Replica(name, self.env(**settings), self.tmp / f"{name}.log")


def create_key(database_url: str, scope: str) -> tuple[str, str]:
    """A new key of TENANT: (its id, the key itself)."""
    database = connect(database_url)
    try:
        with session_factory(database)() as session:
            created = keys.create(session=session, tenant_id=TENANT, scope=scope)
            return created.key.id, created.token
    finally:
        database.dispose()


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    server = os.environ.get(POSTGRES_ENV)
    if not server:
        pytest.skip(f"{POSTGRES_ENV} is not set: replicas need a shared PostgreSQL")
    databases = Databases(tmp_path_factory)
    try:
        url = databases.postgresql(server)
        migrate.upgrade(url)
        tmp = tmp_path_factory.mktemp("replicas")
        meta_model("sinusoid").save(tmp / "models" / "sinusoid")
        shutil.copytree(tmp / "models", tmp / "text-models")
        shutil.copytree(INTENTS, tmp / "text-models" / "intents")
        _, key = create_key(url, "client")
        _, admin = create_key(url, "admin")
        yield Deployment(url, tmp / "models", key, admin, tmp, tmp / "text-models")
    finally:
        databases.drop_all()


@pytest.fixture(scope="session")
def pair(deployment: Deployment) -> Iterator[tuple[Replica, Replica]]:
    """Replicas A and B, up for the whole session, serving the text meta-model too (the
    other replicas do not: each would load the sentence encoder)."""
    models = str(deployment.text_models_dir)
    a, b = deployment.replica("a", models_dir=models), deployment.replica("b", models_dir=models)
    try:
        start_all(a, b)
        yield a, b
    finally:
        assert stop_all(a, b) == [0, 0]
