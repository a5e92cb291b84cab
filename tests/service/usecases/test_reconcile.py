"""Reconcile jobs against a real engine and real commits, on SQLite and PostgreSQL: claims
are disjoint, an expired lease is taken over without a second version, the append is a
compare-and-swap (a deleted client stays deleted, one adapted meanwhile is left alone),
failures are listed, cancel stops the work, and two runners racing re-adapt each stale
client exactly once."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.background import Reconciler
from service.engine import Engine
from service.errors import Conflict, NotFound
from service.settings import Settings
from service.store import jobs, repository
from service.store.group_commit import GroupCommit
from service.store.session import connect, session_factory
from service.usecases import DEFAULT_TENANT, Runtime, adapt, clients, meta_models, reconcile
from service.usecases.registry import ModelRegistry
from tests.service.reconcile_fixtures import models_dir_with, perturbed_copy
from tests.service.store_fixtures import BACKENDS

XS = [[-3.0], [-1.0], [0.5], [2.0], [4.5]]
YS = [0.3, -1.1, 0.9, 1.7, -0.4]
T = DEFAULT_TENANT

RuntimeFactory = Callable[..., Runtime]


def shipped_sha(models: Path) -> str:
    """The version (sha256) of the sinusoid artifact under ``models``."""
    return (models / "sinusoid" / "weights.sha256").read_text().strip()


@pytest.fixture
def make_runtime(tmp_path: Path) -> Iterator[RuntimeFactory]:
    engines: list[Engine] = []

    def make(models: Path, **overrides: Any) -> Runtime:
        """A process shipping the artifacts under ``models``: registered (the start-up
        rule: a sha first seen is promoted) on its first use of the registry."""
        settings = Settings(
            data_dir=tmp_path, models_dir=models, device="cpu", promotion_refresh_s=0, **overrides
        )
        registry = ModelRegistry(settings)
        registry.pending = partial(
            meta_models.register_shipped, registry=registry, directory=models
        )
        engine = Engine({}, settings)
        registry.engine = engine
        engine.start()
        engines.append(engine)
        return Runtime(engine=engine, commits=GroupCommit(), registry=registry, settings=settings)

    yield make
    for engine in engines:
        engine.stop()


@pytest.fixture
def dirs(models_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(v1, v2): sinusoid and plane as shipped by the fixtures; then sinusoid re-saved with
    other weights (plane unchanged)."""
    v1 = models_dir_with(
        tmp_path / "v1", {"sinusoid": models_dir / "sinusoid", "plane": models_dir / "plane"}
    )
    v2 = models_dir_with(tmp_path / "v2", {"plane": models_dir / "plane"})
    perturbed_copy(models_dir / "sinusoid", v2 / "sinusoid")
    return v1, v2


@pytest.fixture(params=BACKENDS)
def sessions(
    request: pytest.FixtureRequest, fresh_database: Callable[[str], str]
) -> Iterator[sessionmaker[Session]]:
    engine = connect(fresh_database(request.param))
    yield session_factory(engine)
    engine.dispose()


def adapt_clients(sessions: sessionmaker[Session], runtime: Runtime, ids: list[str]) -> None:
    for i, client_id in enumerate(ids):
        with sessions() as session:
            ys = [y + 0.1 * i for y in YS]
            adapt.adapt(
                session=session,
                runtime=runtime,
                tenant_id=T,
                client_id=client_id,
                meta_model="sinusoid",
                inputs=XS,
                targets=ys,
            )


def versions(sessions: sessionmaker[Session], client_id: str) -> list[tuple[int, str]]:
    with sessions() as session:
        client = repository.get_client(session=session, tenant_id=T, client_id=client_id)
        return (
            [] if client is None else [(v.version, v.meta_model_version) for v in client.versions]
        )


def test_claims_leases_and_the_compare_and_swap(
    sessions: sessionmaker[Session], make_runtime: RuntimeFactory, dirs: tuple[Path, Path]
) -> None:
    old, new = make_runtime(dirs[0]), make_runtime(dirs[1])
    ids = [f"c{i}" for i in range(6)]
    adapt_clients(sessions, old, ids)
    with sessions() as session:  # not stale: another meta-model, and one already on v2
        adapt.adapt(
            session=session,
            runtime=new,
            tenant_id=T,
            client_id="fresh",
            meta_model="sinusoid",
            inputs=XS,
            targets=YS,
        )
    v1 = shipped_sha(dirs[0])
    target = shipped_sha(dirs[1])
    assert v1 != target
    with sessions() as session:
        started = reconcile.start(
            session=session, registry=new.registry, tenant_id=T, meta_model="sinusoid"
        )
    job = started.job
    assert (job.state, job.total, job.target) == ("queued", 6, target)
    with sessions() as session, pytest.raises(Conflict):  # one job at a time
        reconcile.start(session=session, registry=new.registry, tenant_id=T, meta_model="sinusoid")

    with sessions() as session:
        a = reconcile.claim(session=session, worker="A", lease_s=60, limit=2)
        b = reconcile.claim(session=session, worker="B", lease_s=60, limit=2)
    assert [c.client_id for c in a] == ["c0", "c1"] and [c.client_id for c in b] == ["c2", "c3"]
    assert all(c.from_version == 1 and c.from_sha == v1 for c in a + b)
    # C sees every lease as expired (lease 0): it takes A's and B's items over
    with sessions() as session:
        c = reconcile.claim(session=session, worker="C", lease_s=0, limit=10)
    assert sorted(x.client_id for x in c) == ids
    with sessions() as session:
        assert reconcile.run(session=session, runtime=new, worker="A", claim=a[0]) == "lost"
    assert versions(sessions, "c0") == [(1, v1)]  # A re-adapted it, but stored nothing

    # meanwhile: c4 is deleted, c5 is adapted again by its user
    with sessions() as session:
        clients.delete(session=session, engine=new.engine, tenant_id=T, client_id="c4")
    adapt_clients(sessions, new, ["c5"])
    outcomes = {}
    for item in c:
        with sessions() as session:
            outcomes[item.client_id] = reconcile.run(
                session=session, runtime=new, worker="C", claim=item
            )
    assert outcomes == {
        "c0": "done",
        "c1": "done",
        "c2": "done",
        "c3": "done",
        "c4": "skipped",
        "c5": "skipped",
    }
    for client_id in ("c0", "c1", "c2", "c3"):
        assert versions(sessions, client_id) == [(1, v1), (2, target)]
    assert versions(sessions, "c4") == []  # not resurrected
    assert versions(sessions, "c5") == [(1, v1), (2, target)]  # its user's, not the job's
    with sessions() as session:
        assert reconcile.run(session=session, runtime=new, worker="C", claim=c[0]) == "lost"
        status = reconcile.get(session=session, tenant_id=T, job_id=job.id)
        assert reconcile.claim(session=session, worker="D", lease_s=0, limit=10) == []
    assert (status.job.state, status.job.done, status.job.skipped) == ("done", 4, 2)
    assert status.eta_s == 0.0 and status.rate is not None and status.rate > 0
    assert {(p.client_id, p.reason) for p in status.problems} == {
        ("c4", "the client was deleted"),
        ("c5", "the client was adapted again meanwhile"),
    }
    with sessions() as session:  # nothing stale now: a job that is done at once
        again = reconcile.start(
            session=session, registry=new.registry, tenant_id=T, meta_model="sinusoid"
        )
    assert (again.job.state, again.job.total, again.eta_s) == ("done", 0, 0.0)


def test_a_failing_client_keeps_its_version_and_is_listed(
    sessions: sessionmaker[Session], make_runtime: RuntimeFactory, dirs: tuple[Path, Path]
) -> None:
    old = make_runtime(dirs[0])
    new = make_runtime(dirs[1], max_support=4)  # the re-adaptation of 5 points is refused
    adapt_clients(sessions, old, ["big"])
    with sessions() as session:
        job = reconcile.start(
            session=session, registry=new.registry, tenant_id=T, meta_model="sinusoid"
        ).job
        (item,) = reconcile.claim(session=session, worker="A", lease_s=60, limit=4)
        assert reconcile.run(session=session, runtime=new, worker="A", claim=item) == "failed"
        status = reconcile.get(session=session, tenant_id=T, job_id=job.id)
    assert (status.job.state, status.job.failed) == ("done", 1)
    (problem,) = status.problems
    assert problem.client_id == "big" and problem.state == "failed"
    assert problem.reason.startswith("too_large: support") and "4" in problem.reason
    assert str(XS[0][0]) not in problem.reason  # no support data
    assert len(versions(sessions, "big")) == 1


def test_a_re_adaptation_keeps_the_newest_versions_only(
    sessions: sessionmaker[Session], make_runtime: RuntimeFactory, dirs: tuple[Path, Path]
) -> None:
    """Retention (``FASTADAPT_VERSIONS_KEPT``) holds for a reconcile's version too."""
    old, new = make_runtime(dirs[0]), make_runtime(dirs[1])
    new = dataclasses.replace(new, commits=GroupCommit(keep=2))
    adapt_clients(sessions, old, ["kept", "kept"])  # versions 1 and 2
    with sessions() as session:
        reconcile.start(session=session, registry=new.registry, tenant_id=T, meta_model="sinusoid")
        (item,) = reconcile.claim(session=session, worker="A", lease_s=60, limit=4)
        assert reconcile.run(session=session, runtime=new, worker="A", claim=item) == "done"
    assert [v for v, _ in versions(sessions, "kept")] == [2, 3]


def test_cancel_stops_claims(
    sessions: sessionmaker[Session], make_runtime: RuntimeFactory, dirs: tuple[Path, Path]
) -> None:
    old, new = make_runtime(dirs[0]), make_runtime(dirs[1])
    adapt_clients(sessions, old, ["a", "b"])
    with sessions() as session:
        job = reconcile.start(
            session=session, registry=new.registry, tenant_id=T, meta_model="sinusoid"
        ).job
        (held,) = reconcile.claim(session=session, worker="A", lease_s=60, limit=1)
        cancelled = reconcile.cancel(session=session, tenant_id=T, job_id=job.id)
        assert cancelled.job.state == "cancelled" and cancelled.eta_s == 0.0
        assert reconcile.cancel(session=session, tenant_id=T, job_id=job.id).job.state == (
            "cancelled"
        )
        assert reconcile.claim(session=session, worker="B", lease_s=0, limit=10) == []
        assert reconcile.run(session=session, runtime=new, worker="A", claim=held) == "released"
        with pytest.raises(NotFound):
            reconcile.get(session=session, tenant_id="other", job_id=job.id)
        assert jobs.count_items(session=session, job_id=job.id) == {"pending": 2}
    assert len(versions(sessions, "a")) == 1


def test_two_runners_racing_reconcile_each_client_exactly_once(
    sessions: sessionmaker[Session], make_runtime: RuntimeFactory, dirs: tuple[Path, Path]
) -> None:
    old = make_runtime(dirs[0])
    new = make_runtime(
        dirs[1], reconcile_rate=1000, reconcile_claim=3, reconcile_lease_s=0.05
    )  # leases expire mid-batch: runners take each other's items over
    ids = [f"r{i:02d}" for i in range(12)]
    adapt_clients(sessions, old, ids)
    with sessions() as session:
        job = reconcile.start(
            session=session, registry=new.registry, tenant_id=T, meta_model="sinusoid"
        ).job
    runners = [Reconciler(sessions, new), Reconciler(sessions, new)]

    def drain(runner: Reconciler) -> None:
        while runner.round():
            pass

    threads = [threading.Thread(target=drain, args=(r,)) for r in runners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    with sessions() as session:
        while reconcile.claimable(session=session, lease_s=0.05):  # leftovers of expired leases
            drain(runners[0])
        status = reconcile.get(session=session, tenant_id=T, job_id=job.id)
    target = shipped_sha(dirs[1])
    for client_id in ids:
        assert [sha for _, sha in versions(sessions, client_id)][1:] == [target], client_id
    assert (status.job.state, status.job.done, status.job.failed) == ("done", 12, 0)
    done = sum(r.outcomes.get("done", 0) for r in runners)
    assert done == 12  # each client's version appended once, whoever ran it


def test_a_re_adaptation_that_makes_the_loss_worse_creates_nothing(
    sessions: sessionmaker[Session],
    make_runtime: RuntimeFactory,
    dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old, new = make_runtime(dirs[0]), make_runtime(dirs[1])
    adapt_clients(sessions, old, ["worse"])
    real = reconcile.adapted_version

    def worse(**kwargs: Any) -> tuple[Any, Any]:  # the engine's answer, its loss raised
        row, adapted = real(**kwargs)
        return row, dataclasses.replace(adapted, loss_after=adapted.loss_before * 5 + 1)

    monkeypatch.setattr(reconcile, "adapted_version", worse)
    with sessions() as session:
        job = reconcile.start(
            session=session, registry=new.registry, tenant_id=T, meta_model="sinusoid"
        ).job
        (item,) = reconcile.claim(session=session, worker="A", lease_s=60, limit=4)
        assert reconcile.run(session=session, runtime=new, worker="A", claim=item) == "failed"
        (problem,) = reconcile.get(session=session, tenant_id=T, job_id=job.id).problems
    assert problem.reason.startswith("the re-adaptation made the support loss worse")
    assert len(versions(sessions, "worse")) == 1
