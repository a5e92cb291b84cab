"""The use cases against a real engine and database: the engine's narrow contract as the
use cases drive it (a stored adaptation is cached; a miss reads the store, then caches)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from service.engine import Engine
from service.errors import NotFound
from service.settings import Settings
from service.store.group_commit import GroupCommit
from service.usecases import DEFAULT_TENANT, Runtime, adapt, clients, meta_models, predict
from service.usecases.registry import ModelRegistry

XS = [[-3.0], [-1.0], [0.5], [2.0], [4.5]]
YS = [0.3, -1.1, 0.9, 1.7, -0.4]


@pytest.fixture
def runtime(models_dir: Path, tmp_path: Path, session: Session) -> Iterator[Runtime]:
    settings = Settings(data_dir=tmp_path, models_dir=models_dir, device="cpu")
    registry = ModelRegistry(settings)
    shipped = meta_models.register_shipped(session=session, registry=registry, directory=models_dir)
    engine = Engine({m.name: m for m in shipped}, settings)
    registry.engine = engine
    engine.start()
    yield Runtime(engine=engine, commits=GroupCommit(), registry=registry, settings=settings)
    engine.stop()


def test_the_store_is_read_only_on_a_miss_and_never_after_a_delete(
    session: Session, runtime: Runtime
) -> None:
    who = {"session": session, "runtime": runtime, "tenant_id": DEFAULT_TENANT}
    row = adapt.adapt(**who, client_id="alice", meta_model="sinusoid", inputs=XS, targets=YS)
    assert row.version == 1
    first = predict.predict(**who, client_id="alice", inputs=[[0.5]])
    cache = runtime.engine.stats().cache
    assert (cache.hits, cache.misses) == (1, 0)  # cached when stored: no read
    runtime.engine.forget(DEFAULT_TENANT, "alice")  # as if evicted
    assert predict.predict(**who, client_id="alice", inputs=[[0.5]]) == first  # read, cached
    assert predict.predict(**who, client_id="alice", inputs=[[0.5]]) == first  # a hit
    cache = runtime.engine.stats().cache
    assert (cache.hits, cache.misses, cache.entries) == (2, 1, 1)
    clients.delete(
        session=session, engine=runtime.engine, tenant_id=DEFAULT_TENANT, client_id="alice"
    )
    assert runtime.engine.stats().cache.entries == 0
    with pytest.raises(NotFound):
        predict.predict(**who, client_id="alice", inputs=[[0.5]])
