"""Service fixtures: one tiny set of meta-models, databases on SQLite and PostgreSQL, and
API clients whose requests run inside a transaction that each test rolls back."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from models import nets
from models.checkpoint import ArtifactConfig, MetaModel
from models.maml import InnerLoopConfig, Learner, mse_loss
from models.params import from_bytes
from service.api.deps import get_sessions
from service.app import create_app
from service.settings import Settings
from service.store import migrate
from service.store.session import connect
from tests.service.sgd_reference import Reference
from tests.service.store_fixtures import BACKENDS, Databases
from tests.service.text_fixtures import copy_intents

torch.set_num_threads(1)

POSTGRES_ENV = "FASTADAPT_TEST_POSTGRES_URL"


# -- meta-models -----------------------------------------------------------------------------
def build_artifact(
    root: Path, name: str, *, in_features: int = 1, learned_lr: str = "none", seed: int = 0
) -> MetaModel:
    """A seeded, untrained 1-40-40-1 (or D-40-40-1) MLP saved as an artifact."""
    torch.manual_seed(seed)
    architecture = {"kind": "mlp", "in_features": in_features, "hidden": [40, 40]}
    architecture["out_features"] = 1
    config = ArtifactConfig(
        name=name,
        family="sinusoid",
        architecture=architecture,
        task={"kind": "regression", "input_shape": [in_features], "output": "one float per input"},
        inner=InnerLoopConfig(steps=5, lr=0.01, learned_lr=learned_lr),  # type: ignore[arg-type]
        training={"seed": seed, "command": "tests/service/conftest.py"},
    )
    net = nets.build(architecture)
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    lrs = Learner(net, mse_loss, config.inner).init_lrs(params)
    model = MetaModel(config, params, lrs, version="")
    model.save(root / name)
    return model


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sinusoid`` (the one most tests use), a Meta-SGD variant, and a 2-D input model."""
    root = tmp_path_factory.mktemp("artifacts")
    build_artifact(root, "sinusoid")
    build_artifact(root, "sinusoid-metasgd", learned_lr="per_param", seed=1)
    build_artifact(root, "plane", in_features=2, seed=2)
    return root


@pytest.fixture(scope="session")
def text_models_dir(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    """The shipped ``intents`` text meta-model (on the pinned encoder) beside the tiny
    ``sinusoid`` (a meta-model without an in-scope score)."""
    root = tmp_path_factory.mktemp("text-artifacts")
    copy_intents(root / "intents")
    shutil.copytree(models_dir / "sinusoid", root / "sinusoid")
    return root


@pytest.fixture(scope="session")
def sinusoid(models_dir: Path) -> MetaModel:
    return MetaModel.load(models_dir / "sinusoid")


@pytest.fixture(scope="session")
def reference(sinusoid: MetaModel) -> Reference:
    return Reference(from_bytes(sinusoid.weights_bytes()))


# -- databases -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The PostgreSQL server of ``FASTADAPT_TEST_POSTGRES_URL``; skipped when unset (CI sets it,
    and then an unreachable server fails the tests)."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_ENV} is not set")
    return url


@pytest.fixture(scope="session")
def databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Databases]:
    dbs = Databases(tmp_path_factory)
    yield dbs
    dbs.drop_all()


@pytest.fixture(scope="session", params=BACKENDS)
def database_url(request: pytest.FixtureRequest, databases: Databases) -> str:
    """A migrated database per backend, shared by the session's tests."""
    url = databases.new(request.param, request)
    migrate.upgrade(url)
    return url


@pytest.fixture(scope="session")
def db_engine(database_url: str) -> Iterator[Engine]:
    engine = connect(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(db_engine: Engine) -> Iterator[Session]:
    """A session inside a transaction that is rolled back after the test; the code under
    test may commit (each commit releases a savepoint)."""
    with db_engine.connect() as connection:
        transaction = connection.begin()
        with Session(
            bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
        ) as s:
            yield s
        transaction.rollback()


@pytest.fixture
def fresh_database(request: pytest.FixtureRequest, databases: Databases) -> Callable[[str], str]:
    """A new migrated database whose commits are real (for concurrency tests)."""

    def make(backend: str) -> str:
        url = databases.new(backend, request)
        migrate.upgrade(url)
        return url

    return make


# -- the API ---------------------------------------------------------------------------------
ApiFactory = Callable[..., TestClient]


@pytest.fixture
def make_api(
    tmp_path: Path, models_dir: Path, database_url: str, session: Session
) -> Iterator[ApiFactory]:
    """API clients on the test's transaction; keyword arguments override settings."""
    with ExitStack() as stack:

        def make(**overrides: Any) -> TestClient:
            values: dict[str, Any] = {
                "data_dir": tmp_path,
                "models_dir": models_dir,
                "database_url": database_url,
                "threads": 1,
            }
            settings = Settings(**{**values, **overrides})
            app = create_app(settings)
            app.dependency_overrides[get_sessions] = lambda: lambda: nullcontext(session)
            return stack.enter_context(TestClient(app))

        yield make


@pytest.fixture
def api(make_api: ApiFactory) -> TestClient:
    return make_api()


@pytest.fixture
def text_api(make_api: ApiFactory, text_models_dir: Path) -> TestClient:
    """An app serving ``intents`` and ``sinusoid`` (``text_models_dir``)."""
    return make_api(models_dir=text_models_dir)
