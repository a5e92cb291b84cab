"""Bulk requests: many clients' predictions, or adaptations, in one request.

For server-to-server callers that hold many clients. A bulk request answers one result
per item, in order: the item's answer, or its error (``Failed``); one bad item fails only
itself. What is wrong with the request as a whole (too many items, too many inputs in
all) fails it whole. Each item is validated exactly as its single-client request is, its
errors naming the item's field (``requests[3].inputs[0]``, ``adaptations[1].support``).

Both read the database once for all their items (one query for every item's version; one
more for the parameters the engine has not cached) and hold no connection while the
engine works. Predictions submit every item in one engine call (``submit_predict_many``:
one gathered forward over the clients' stacked parameters); adaptations submit every
item before waiting on any (the engine's batcher groups the queued jobs), and store every
successful item's version in one transaction; a client may appear once per batch (a
repeat is refused: ``duplicate``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from models.checkpoint import MetaModel
from service import requests
from service.engine import NotCached, PredictJob
from service.errors import FastAdaptError, InvalidInput, NotFound, TooLarge
from service.requests import RawInput, RawTarget
from service.store import repository
from service.store.repository import VersionRef
from service.store.tables import ClientVersion
from service.usecases import predict
from service.usecases.adapt import divergence, version_row
from service.usecases.predict import Prediction, meta_model_of
from service.usecases.runtime import Runtime, database_down, missing, storing


@dataclass(frozen=True)
class PredictItem:
    client_id: str
    inputs: Sequence[RawInput]
    version: int | None = None  # None: the current version
    out_of_scope_threshold: float | None = None  # None: the version's (else its model's)


@dataclass(frozen=True)
class AdaptItem:
    client_id: str
    meta_model: str
    inputs: Sequence[RawInput]
    targets: Sequence[RawTarget]
    inner_steps: int | None = None
    inner_lr: float | None = None
    out_of_scope_threshold: float | None = None


@dataclass(frozen=True)
class Failed:
    """An item's error: what its single-client request would have answered."""

    client_id: str
    error: FastAdaptError


def within(error: FastAdaptError, prefix: str) -> FastAdaptError:
    """``error`` with its field named inside the item (``adaptations[2].support...``)."""
    if isinstance(error, InvalidInput):  # the message starts with the field: "field: ..."
        return type(error)(f"{prefix}.{error.field}", error.message.split(": ", 1)[-1])
    if isinstance(error, TooLarge):  # likewise
        return TooLarge(f"{prefix}.{error.message}")
    return error


def bulk_size(count: int, settings_limit: int, field: str) -> None:
    """The item count of a bulk request: 1 to ``max_bulk`` (else 422 naming ``field``)."""
    if count == 0:
        raise InvalidInput(field, "no items")
    if count > settings_limit:
        raise InvalidInput(
            field, f"{count} items exceed the limit of {settings_limit} (FASTADAPT_MAX_BULK)"
        )


# -- predictions --------------------------------------------------------------------------------
@dataclass
class _Pending:
    """A prediction item between validation and its answer."""

    index: int
    client_id: str
    row: VersionRef
    model: MetaModel
    job: PredictJob
    threshold: float  # the out-of-scope threshold its answer applies
    future: Future[list[list[float]]] | None = None
    miss: NotCached | None = None


@storing
def predict_many(
    *, session: Session, runtime: Runtime, tenant_id: str, items: Sequence[PredictItem]
) -> list[Prediction | Failed]:
    """Predictions of many client versions (each the current one unless pinned), in the
    order of ``items``; an unknown client or invalid inputs fail only their item."""
    settings = runtime.settings
    bulk_size(len(items), settings.max_bulk, "requests")
    total = sum(len(item.inputs) for item in items)
    if total > settings.max_predict_batch:
        raise TooLarge(
            f"requests: {total} inputs in all exceed the limit of {settings.max_predict_batch}"
        )
    found = repository.versions_of(
        session=session,
        tenant_id=tenant_id,
        wanted=[(item.client_id, item.version) for item in items],
    )
    results: list[Prediction | Failed | None] = [None] * len(items)
    pending: list[_Pending] = []
    for i, item in enumerate(items):
        try:
            pending.append(
                _validated(
                    session=session,
                    runtime=runtime,
                    tenant_id=tenant_id,
                    found=found,
                    index=i,
                    item=item,
                )
            )
        except FastAdaptError as error:
            results[i] = Failed(item.client_id, error)
    session.close()  # no connection is held while the engine works
    try:
        _submit_all(session=session, runtime=runtime, tenant_id=tenant_id, pending=pending)
        for p in pending:
            assert p.future is not None
            try:
                outputs = runtime.wait(p.future)
                results[p.index] = _answer(p, outputs, field=f"requests[{p.index}].inputs")
            except FastAdaptError as error:
                results[p.index] = Failed(p.client_id, error)
    finally:
        for p in pending:  # what a whole-request failure left queued
            if p.future is not None:
                p.future.cancel()
    return [r for r in results if r is not None]


def _validated(
    *,
    session: Session,
    runtime: Runtime,
    tenant_id: str,
    found: dict[tuple[str, int | None], VersionRef],
    index: int,
    item: PredictItem,
) -> _Pending:
    """One item, validated as ``usecases.predict.predict`` does: its job, not yet submitted."""
    field = f"requests[{index}].inputs"
    requests.prediction_size(item.inputs, runtime.settings, field)
    row = found.get((item.client_id, item.version))
    if row is None:
        raise missing(
            session=session, tenant_id=tenant_id, client_id=item.client_id, version=item.version
        )
    model = meta_model_of(session=session, runtime=runtime, sha=row.meta_model_version)
    requested = requests.out_of_scope(
        model, item.out_of_scope_threshold, field=f"requests[{index}].out_of_scope_threshold"
    )
    x = requests.model_inputs(model, item.inputs, field=field, settings=runtime.settings)
    job = PredictJob(model.version, (tenant_id, item.client_id, row.uid), x, model=model)
    threshold = predict.out_of_scope_threshold(requested, row, model)
    return _Pending(index, item.client_id, row, model, job, threshold)


def _submit_all(
    *, session: Session, runtime: Runtime, tenant_id: str, pending: list[_Pending]
) -> None:
    """Submit every job in one engine call (one gathered forward per meta-model when the
    engine is idle, else one queue operation); the cache's misses are then read from the
    store in one query and submitted together with their params."""
    futures = runtime.engine.submit_predict_many([p.job for p in pending])
    misses: list[_Pending] = []
    for p, future in zip(pending, futures, strict=True):
        refused = future.exception() if future.done() else None
        if isinstance(refused, NotCached):
            p.miss = refused
            misses.append(p)
        else:
            p.future = future
    if not misses:
        return
    params = repository.params_of(
        session=session, tenant_id=tenant_id, uids=[p.row.uid for p in misses]
    )
    session.close()
    loaded: list[tuple[_Pending, PredictJob]] = []
    for p in misses:
        assert p.miss is not None
        stored = params.get(p.row.uid)
        if stored is None:  # deleted since the versions were read
            p.future = _failed(NotFound(f"unknown client {p.client_id!r}"))
        else:
            loaded.append((p, p.miss.loaded(stored)))
    again = runtime.engine.submit_predict_many([job for _, job in loaded])
    for (p, _), future in zip(loaded, again, strict=True):
        p.future = future


def _failed(error: FastAdaptError) -> Future[list[list[float]]]:
    future: Future[list[list[float]]] = Future()
    future.set_exception(error)
    return future


def _answer(p: _Pending, outputs: list[list[float]], *, field: str) -> Prediction:
    """An item's outputs as ``usecases.predict.predict`` answers them."""
    row = p.row
    return predict.answer(
        outputs,
        client_id=p.client_id,
        version=row.version,
        uid=row.uid,
        labels=row.labels,
        temperature=p.model.temperature,
        field=field,
        in_scope=p.model.in_scope,
        threshold=p.threshold,
    )


# -- adaptations --------------------------------------------------------------------------------
@storing
def adapt_many(
    *, session: Session, runtime: Runtime, tenant_id: str, items: Sequence[AdaptItem]
) -> list[ClientVersion | Failed]:
    """Adapt many clients, each to the promoted version of its meta-model; every item that
    succeeds becomes its client's next version, all stored in one transaction. A client
    may appear once: a repeat fails (422 naming its ``client_id``)."""
    settings = runtime.settings
    bulk_size(len(items), settings.max_bulk, "adaptations")
    results: list[ClientVersion | Failed | None] = [None] * len(items)
    promoted = _promoted(session=session, runtime=runtime, names={i.meta_model for i in items})
    session.close()  # no transaction stays open while the engine works
    first: dict[str, int] = {}
    submitted = []
    for i, item in enumerate(items):
        try:
            if item.client_id in first:
                raise InvalidInput(
                    "client_id",
                    f"client {item.client_id!r} is already adapted by "
                    f"adaptations[{first[item.client_id]}]: one version per client per batch",
                )
            first[item.client_id] = i
            model = promoted[item.meta_model]
            if isinstance(model, FastAdaptError):
                raise model
            request = requests.adaptation(
                model=model,
                settings=settings,
                inputs=item.inputs,
                targets=item.targets,
                inner_steps=item.inner_steps,
                inner_lr=item.inner_lr,
                out_of_scope_threshold=item.out_of_scope_threshold,
                tenant=tenant_id,
            )
            submitted.append((i, request, runtime.engine.submit_adapt(request.job)))
        except FastAdaptError as error:
            results[i] = Failed(item.client_id, within(error, f"adaptations[{i}]"))
    made = []
    try:
        for i, request, future in submitted:
            client_id = items[i].client_id
            try:
                adapted = runtime.wait(future)
                diverged = divergence(adapted, allow=settings.allow_divergent)
            except FastAdaptError as error:
                results[i] = Failed(client_id, within(error, f"adaptations[{i}]"))
                continue
            row = version_row(
                tenant_id=tenant_id, client_id=client_id, request=request, adapted=adapted
            )
            row.warnings = [*row.warnings, *diverged]
            row.origin, row.source_version = "adapt", None
            made.append((i, row, adapted))
    finally:
        for _, _, future in submitted:
            future.cancel()
    stored = _store_all(session=session, runtime=runtime, rows=[row for _, row, _ in made])
    for (i, row, adapted), refused in zip(made, stored, strict=True):
        if refused is None:
            runtime.engine.stored(adapted, (tenant_id, row.client_id, row.uid))
            results[i] = row
        else:
            results[i] = Failed(row.client_id, refused)
    return [r for r in results if r is not None]


def _promoted(
    *, session: Session, runtime: Runtime, names: set[str]
) -> dict[str, MetaModel | FastAdaptError]:
    """The promoted version of each name, or the 422 an unknown name gets."""
    models: dict[str, MetaModel | FastAdaptError] = {}
    for name in sorted(names):
        try:
            models[name] = runtime.registry.promoted(session, name)
        except NotFound:
            models[name] = requests.unknown_meta_model(name, runtime.registry.names())
    return models


def _store_all(
    *, session: Session, runtime: Runtime, rows: list[ClientVersion]
) -> list[FastAdaptError | None]:
    """Store ``rows`` in one transaction (pruned to ``versions_kept`` as the group commit
    does); if that fails, each alone, so one bad row fails only its item. The database
    being down fails the whole request (503)."""
    keep = runtime.commits.keep

    def commit(group: list[ClientVersion]) -> None:
        try:
            repository.append_versions(session=session, rows=group, keep=keep)
            session.commit()
        except BaseException:
            session.rollback()
            raise

    try:
        commit(rows)
        return [None] * len(rows)
    except SQLAlchemyError as exc:
        if database_down(exc):
            raise
    return [_alone(commit, row) for row in rows]


def _alone(
    commit: Callable[[list[ClientVersion]], None], row: ClientVersion
) -> FastAdaptError | None:
    try:
        commit([row])
    except FastAdaptError as error:
        return error
    except SQLAlchemyError as exc:
        if database_down(exc):
            raise
        return FastAdaptError(f"client {row.client_id!r}: storing its version failed")
    return None
