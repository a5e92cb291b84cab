"""The meta-model registry against a real database (SQLite and PostgreSQL): the start-up
rule, promotions seen by another process within the refresh bound, the LRU bound, and the
sha256 check of every load."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from models.checkpoint import MetaModel
from service.engine import Engine
from service.errors import FastAdaptError, InvalidInput, NotFound
from service.settings import Settings
from service.store import registry as store
from service.store.session import connect, session_factory
from service.store.tables import MetaModelVersion, utcnow
from service.usecases import meta_models
from service.usecases.registry import ModelRegistry
from tests.diverged import write_diverged
from tests.service.registry_helpers import perturbed
from tests.service.store_fixtures import BACKENDS


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Releases:
    """Stands in for the engine: records the versions the registry unloads."""

    def __init__(self) -> None:
        self.released: list[str] = []

    def release(self, version: str) -> None:
        self.released.append(version)


def registry(tmp_path: Path, clock: Clock | None = None, **overrides: object) -> ModelRegistry:
    settings = Settings(data_dir=tmp_path, **overrides)  # type: ignore[arg-type]
    return ModelRegistry(settings, clock=clock or Clock())


def shipped_dir(tmp_path: Path, models_dir: Path, name: str = "sinusoid") -> Path:
    root = tmp_path / "shipped"
    root.mkdir(exist_ok=True)
    link = root / name
    if not link.exists():
        link.symlink_to(models_dir / name)
    return root


def test_start_up_registers_promotes_new_shas_and_never_undoes_a_promotion(
    session: Session, models_dir: Path, tmp_path: Path, sinusoid: MetaModel
) -> None:
    reg = registry(tmp_path)
    shipped = shipped_dir(tmp_path, models_dir)
    meta_models.register_shipped(session=session, registry=reg, directory=shipped)
    assert reg.promoted(session, "sinusoid").version == sinusoid.version
    assert meta_models.register_shipped(session=session, registry=reg, directory=shipped)  # again

    newer = perturbed(models_dir / "sinusoid", tmp_path / "newer" / "sinusoid")
    meta_models.register(session=session, registry=reg, model=newer, source="cli:test")
    assert reg.promoted(session, "sinusoid").version == sinusoid.version  # registered only
    meta_models.promote(session=session, registry=reg, name="sinusoid", version=newer.version[:12])
    assert reg.promoted(session, "sinusoid").version == newer.version

    # a restart with the old image: its sha is known, the operator's promotion stands
    meta_models.register_shipped(session=session, registry=reg, directory=shipped)
    assert reg.promoted(session, "sinusoid").version == newer.version
    # a new image ships a sha never seen: it is promoted
    image = perturbed(models_dir / "sinusoid", tmp_path / "image" / "sinusoid", delta=-0.05)
    meta_models.register_shipped(session=session, registry=reg, directory=tmp_path / "image")
    assert reg.promoted(session, "sinusoid").version == image.version

    versions = meta_models.versions(session=session, name="sinusoid")
    shas = {v.sha for v in versions}
    assert {sinusoid.version, newer.version, image.version} <= shas
    assert [v.sha for v in versions if v.promoted] == [image.version]
    assert {v.source for v in versions if v.sha == newer.version} == {"cli:test"}


def test_promote_checks_the_version(
    session: Session, models_dir: Path, tmp_path: Path, sinusoid: MetaModel
) -> None:
    reg = registry(tmp_path)
    meta_models.register_shipped(session=session, registry=reg, directory=models_dir)
    with pytest.raises(InvalidInput, match="version"):
        meta_models.promote(session=session, registry=reg, name="sinusoid", version="abc")
    with pytest.raises(NotFound):
        meta_models.promote(session=session, registry=reg, name="sinusoid", version="0" * 64)
    plane = reg.promoted(session, "plane").version
    with pytest.raises(NotFound):  # a version of another name
        meta_models.promote(session=session, registry=reg, name="sinusoid", version=plane)
    with pytest.raises(NotFound):
        reg.promoted(session, "nope")


def test_two_registries_agree_after_the_refresh_bound(
    session: Session, models_dir: Path, tmp_path: Path, sinusoid: MetaModel
) -> None:
    """Two processes on one database: a promotion on one reaches the other once its view
    is ``promotion_refresh_s`` old (an injected clock: no sleeping)."""
    clock = Clock()
    one = registry(tmp_path, clock, promotion_refresh_s=2.0)
    two = registry(tmp_path, clock, promotion_refresh_s=2.0)
    meta_models.register_shipped(session=session, registry=one, directory=models_dir)
    assert two.promoted(session, "sinusoid").version == sinusoid.version
    newer = perturbed(models_dir / "sinusoid", tmp_path / "newer" / "sinusoid")
    meta_models.register(session=session, registry=one, model=newer, source="api", promote=True)
    assert one.promoted(session, "sinusoid").version == newer.version  # its own: at once
    clock.now = 1.9
    assert two.promoted(session, "sinusoid").version == sinusoid.version  # within the bound
    clock.now = 2.0
    assert two.promoted(session, "sinusoid").version == newer.version  # at the bound
    assert two.loads == 2  # both versions, from the database, sha-checked

    fresh = registry(tmp_path, clock, promotion_refresh_s=0.0)  # 0: every use reads
    assert fresh.promoted(session, "sinusoid").version == newer.version
    meta_models.promote(session=session, registry=one, name="sinusoid", version=sinusoid.version)
    assert fresh.promoted(session, "sinusoid").version == sinusoid.version


def test_loaded_versions_are_bounded_least_recently_used_first(
    session: Session, models_dir: Path, tmp_path: Path, sinusoid: MetaModel
) -> None:
    size = len(sinusoid.weights_bytes())
    writer = registry(tmp_path)
    meta_models.register_shipped(session=session, registry=writer, directory=models_dir)
    versions = [sinusoid.version]
    for i in range(2):
        out = tmp_path / f"v{i}" / "sinusoid"
        model = perturbed(models_dir / "sinusoid", out, delta=0.01 * (i + 1))
        meta_models.register(session=session, registry=writer, model=model, source="test")
        versions.append(model.version)

    reader = registry(tmp_path, meta_model_cache_bytes=2 * size)  # room for two
    engine = Releases()
    reader.engine = cast(Engine, engine)
    a, b, c = (reader.version(session, sha) for sha in versions)
    assert reader.loaded() == [b.version, c.version]  # a was the least recently used
    assert engine.released == [a.version] and reader.evictions == 1
    assert reader.version(session, b.version) is b  # a hit: now the most recent
    reader.version(session, a.version)  # read again: c goes
    assert reader.loaded() == [b.version, a.version]
    assert engine.released == [a.version, c.version] and reader.loads == 4

    tiny = registry(tmp_path, meta_model_cache_bytes=0)  # the one in use always stays
    assert tiny.version(session, a.version).version == a.version
    assert tiny.loaded() == [a.version]


def test_every_load_checks_the_sha256(
    session: Session, models_dir: Path, tmp_path: Path, sinusoid: MetaModel
) -> None:
    writer = registry(tmp_path)
    meta_models.register_shipped(session=session, registry=writer, directory=models_dir)
    newer = perturbed(models_dir / "sinusoid", tmp_path / "newer" / "sinusoid")
    meta_models.register(session=session, registry=writer, model=newer, source="test")
    tampered = perturbed(models_dir / "sinusoid", tmp_path / "evil" / "sinusoid", delta=1.0)
    session.execute(
        update(MetaModelVersion)
        .where(MetaModelVersion.sha == newer.version)
        .values(weights=tampered.weights_bytes())
    )
    with pytest.raises(FastAdaptError, match="corrupt"):
        registry(tmp_path).version(session, newer.version)
    with pytest.raises(NotFound, match="not registered"):
        registry(tmp_path).version(session, "e" * 64)


def test_weights_that_are_not_finite_are_never_registered_nor_loaded(
    session: Session, models_dir: Path, tmp_path: Path
) -> None:
    """Issue 20: a diverged training's artifact (NaN weights) was registered, promoted and
    served. Shipped, it stops the start-up, naming it; a version registered before that
    was checked (its row NaN) does not load, and the error says why."""
    root = tmp_path / "shipped"
    sha = write_diverged(models_dir / "sinusoid", root / "sinusoid")
    with pytest.raises(ValueError, match=f"^{root / 'sinusoid'}: .*NaN or infinity"):
        meta_models.register_shipped(session=session, registry=registry(tmp_path), directory=root)
    assert store.get_version(session=session, sha=sha) is None
    nan = root / "sinusoid"
    store.add_version(
        session=session,
        sha=sha,
        name="sinusoid",
        config=(nan / "config.json").read_text(),
        weights=(nan / "weights.safetensors").read_bytes(),
        source="cli:registered before issue 20",
        at=utcnow(),
    )
    with pytest.raises(FastAdaptError, match=f"{sha[:12]} is corrupt: .*NaN or infinity"):
        registry(tmp_path).version(session, sha)


@pytest.mark.parametrize("backend", BACKENDS)
def test_replicas_starting_together_register_each_artifact_once(
    backend: str,
    fresh_database: Callable[[str], str],
    models_dir: Path,
    tmp_path: Path,
    sinusoid: MetaModel,
) -> None:
    url = fresh_database(backend)  # real commits, one connection per replica
    database = connect(url)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def replica() -> None:
        try:
            start.wait()
            with session_factory(database)() as session:
                reg = registry(tmp_path)
                meta_models.register_shipped(session=session, registry=reg, directory=models_dir)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert errors == []
        with session_factory(database)() as session:
            versions = meta_models.versions(session=session)
            assert sorted(v.name for v in versions) == ["plane", "sinusoid", "sinusoid-metasgd"]
            assert all(v.promoted for v in versions)
            assert registry(tmp_path).promoted(session, "sinusoid").version == sinusoid.version
    finally:
        database.dispose()
