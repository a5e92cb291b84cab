"""Many stored clients, fast: adapted in-process by the batched engine and written with
the repository's bulk insert, as the service stores them (the HTTP path would take
minutes for 10,000 on two cores). Shared by the cache and storage benchmarks."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

from benchmarks.support_sets import STEPS, supports
from models.checkpoint import MetaModel
from service import requests
from service.engine import Adapted, Engine, EngineConfig
from service.settings import Settings
from service.store import migrate, repository
from service.store.session import connect, session_factory
from service.store.tables import DEFAULT_TENANT, ClientVersion
from service.usecases.adapt import version_row

ARTIFACT = Path(__file__).resolve().parent.parent / "models" / "artifacts" / "sinusoid"


def sinusoid() -> MetaModel:
    return MetaModel.load(ARTIFACT)


def adapted_rows(meta: MetaModel, count: int, prefix: str = "bench-") -> list[ClientVersion]:
    """``count`` clients ``<prefix>0`` ... adapted (10 steps), as rows of
    ``version_row`` (what the adaptation use case stores)."""
    settings = Settings(allow_untrained=True)  # 10 steps: beyond the trained 5 (guardrails)
    adaptations = [
        requests.adaptation(
            model=meta,
            settings=settings,
            inputs=x,
            targets=y,
            inner_steps=STEPS,
        )
        for x, y in supports(count)
    ]
    engine = Engine({meta.name: meta}, EngineConfig(device="cpu", queue_size=count + 1))
    engine.start()
    try:
        futures: list[Future[Adapted]] = [engine.submit_adapt(a.job) for a in adaptations]
        results = [f.result() for f in futures]
    finally:
        engine.stop()
    return [
        version_row(
            tenant_id=DEFAULT_TENANT, client_id=f"{prefix}{i}", request=request, adapted=adapted
        )
        for i, (request, adapted) in enumerate(zip(adaptations, results, strict=True))
    ]


def store(url: str, rows: list[ClientVersion], *, migrated: bool = False) -> None:
    """Migrate the database at ``url`` (unless ``migrated``) and store ``rows``."""
    if not migrated:
        migrate.upgrade(url)
    database = connect(url)
    try:
        with session_factory(database)() as session:
            for start in range(0, len(rows), 1000):
                repository.append_versions(session=session, rows=rows[start : start + 1000])
            session.commit()
    finally:
        database.dispose()
