"""Predictions of a stored client version."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from sqlalchemy.orm import Session

from models.checkpoint import MetaModel
from service import requests
from service.engine import NotCached, PredictJob
from service.errors import Conflict, InvalidInput, NotFound, Unavailable
from service.requests import Label, RawInput
from service.store import repository
from service.store.repository import Predictable, VersionRef
from service.usecases.runtime import WAIT_GRACE_S, Runtime, missing, storing

# the in-scope threshold of a meta-model whose config sets none (text meta-models)
DEFAULT_OUT_OF_SCOPE_THRESHOLD = 0.5


@dataclass(frozen=True)
class LabelPrediction:
    # the most probable of the client's labels; None when the in-scope score is below the
    # threshold (out of scope: none of the client's labels)
    label: Label | None
    probabilities: dict[str, float]  # every label of the client (as text): p
    in_scope: float | None = None  # the in-scope score (0 to 1); None: the model has none


@dataclass(frozen=True)
class Prediction:
    client_id: str
    version: int
    version_id: str  # the version's uid: never reused (the ETag)
    # one float per input for a single output; a LabelPrediction per input for classification
    predictions: list[float] | list[list[float]] | list[LabelPrediction]


@dataclass(frozen=True)
class Query:
    """One prediction request: the inputs, and whose version predicts them."""

    tenant_id: str
    client_id: str
    inputs: Sequence[RawInput]
    version: int | None = None  # None: the client's current version
    field: str = "inputs"  # the request's field holding the inputs (errors name it)
    out_of_scope_threshold: float | None = None  # None: the version's (else its model's)

    @property
    def key(self) -> tuple[str, str, int | None]:
        """The version's key in ``Runtime.predictables``."""
        return (self.tenant_id, self.client_id, self.version)


@dataclass(frozen=True)
class Pending:
    """A prediction submitted to the engine: its future, and what ``finish`` needs."""

    future: Future[list[list[float]]]  # (Q, O) outputs
    client_id: str
    version: int
    uid: str
    labels: list[Label] | None
    temperature: float
    field: str
    in_scope: tuple[float, float] | None = None  # the meta-model's (scale, bias), if any
    threshold: float = DEFAULT_OUT_OF_SCOPE_THRESHOLD  # resolved: request, version, model


@storing
def start(*, session: Session, runtime: Runtime, query: Query, fresh: bool = False) -> Pending:
    """Read the version (kept, or one query), validate the inputs, submit to the engine:
    the part of a prediction that may read the database (a worker thread's). The session
    is closed before it returns, so no connection is held while the engine works.
    ``fresh``: the caller awaited ``runtime.predictables.fresh()``, so a kept version may
    answer."""
    requests.prediction_size(query.inputs, runtime.settings, query.field)
    row = predictable(session=session, runtime=runtime, query=query, fresh=fresh)
    model = meta_model_of(session=session, runtime=runtime, sha=row.meta_model_version)
    job = _job(runtime, query, row, model)
    session.close()
    try:
        future = runtime.engine.submit_predict(job)
    except NotCached as miss:  # read the stored params, in this thread, and submit again
        params = repository.load_params(session=session, tenant_id=query.tenant_id, uid=row.uid)
        session.close()
        if params is None:
            raise NotFound(f"unknown client {query.client_id!r}") from None
        future = runtime.engine.submit_predict(miss.loaded(params))
    return _pending(future, query, row, model)


def start_on_loop(*, runtime: Runtime, query: Query) -> Pending | None:
    """``start`` where it needs neither the database nor a thread, so an event loop may
    run it (after awaiting ``runtime.predictables.fresh()``, which answered True): the
    version is kept (``Runtime.predictables``), its meta-model is loaded and
    takes numbers (no image to decode), and the client's params are on the device. The
    engine runs a small net's forward now when it is idle, else queues it. None: run
    ``start`` in a worker thread instead."""
    row = runtime.predictables.get(query.key)
    if row is None:
        return None
    model = runtime.registry.in_memory(row.meta_model_version)
    if model is None or len(model.config.input_shape) != 1:
        return None
    requests.prediction_size(query.inputs, runtime.settings, query.field)
    try:
        future = runtime.engine.submit_predict(_job(runtime, query, row, model), on_loop=True)
    except NotCached:
        return None
    return _pending(future, query, row, model)


def _job(runtime: Runtime, query: Query, row: Predictable, model: MetaModel) -> PredictJob:
    """The engine's job: the inputs (and a threshold) validated for the version's meta-model."""
    requests.out_of_scope(model, query.out_of_scope_threshold)
    x = requests.model_inputs(model, query.inputs, field=query.field, settings=runtime.settings)
    return PredictJob(model.version, (query.tenant_id, query.client_id, row.uid), x, model=model)


def _pending(
    future: Future[list[list[float]]], query: Query, row: Predictable, model: MetaModel
) -> Pending:
    labels, temperature = row.labels, model.temperature
    threshold = DEFAULT_OUT_OF_SCOPE_THRESHOLD  # unused without an in-scope score
    if model.in_scope is not None:
        threshold = out_of_scope_threshold(query.out_of_scope_threshold, row, model)
    return Pending(
        future,
        query.client_id,
        row.version,
        row.uid,
        labels,
        temperature,
        query.field,
        model.in_scope,
        threshold,
    )


def out_of_scope_threshold(
    requested: float | None, row: Predictable | VersionRef, model: MetaModel
) -> float:
    """The threshold a prediction applies: the request's, else the version's, else the
    meta-model's (its config's ``task.out_of_scope_threshold``, else 0.5)."""
    if requested is not None:
        return requested
    if row.out_of_scope_threshold is not None:
        return row.out_of_scope_threshold
    default = model.config.task.get("out_of_scope_threshold", DEFAULT_OUT_OF_SCOPE_THRESHOLD)
    return float(default)


def predictable(
    *, session: Session, runtime: Runtime, query: Query, fresh: bool = False
) -> Predictable:
    """What a prediction reads of the version: kept while the database has not changed
    (``Runtime.predictables``; only if ``fresh``, see ``start``), else one query (then
    kept). ``NotFound`` if missing."""
    cache = runtime.predictables
    row = cache.get(query.key) if fresh else None
    if row is not None:
        return row
    # a session already in a transaction may read a snapshot older than the counter's
    generation = None if session.in_transaction() else cache.generation()
    tenant_id, client_id, version = query.key
    row = repository.get_predictable(
        session=session, tenant_id=tenant_id, client_id=client_id, version=version
    )
    if row is None:
        raise missing(session=session, tenant_id=tenant_id, client_id=client_id, version=version)
    cache.put(query.key, row, generation)
    return row


def finish(pending: Pending, outputs: list[list[float]]) -> Prediction:
    """The prediction from the engine's outputs (no database, no device: any thread)."""
    return answer(
        outputs,
        client_id=pending.client_id,
        version=pending.version,
        uid=pending.uid,
        labels=pending.labels,
        temperature=pending.temperature,
        field=pending.field,
        in_scope=pending.in_scope,
        threshold=pending.threshold,
    )


def answer(
    outputs: list[list[float]],
    *,
    client_id: str,
    version: int,
    uid: str,
    labels: list[Label] | None,
    temperature: float,
    field: str,
    in_scope: tuple[float, float] | None = None,
    threshold: float = DEFAULT_OUT_OF_SCOPE_THRESHOLD,
) -> Prediction:
    """A client version's outputs (Q, O) as the API answers them: labels with calibrated
    probabilities (and the in-scope score, if the meta-model has one) for classification,
    one float per input for a single output."""
    if not all(math.isfinite(v) for out in outputs for v in out):
        raise InvalidInput(field, "the predictions are not finite for these inputs")
    if labels is not None:
        predictions = [
            classify(out, labels, temperature, in_scope=in_scope, threshold=threshold)
            for out in outputs
        ]
        return Prediction(client_id, version, uid, predictions)
    single = all(len(out) == 1 for out in outputs)
    flat = [out[0] for out in outputs] if single else outputs
    return Prediction(client_id, version, uid, flat)


async def outputs_of(runtime: Runtime, pending: Pending) -> list[list[float]]:
    """The engine's answer, awaited on the event loop (no thread waits for it), or
    ``Unavailable`` once it is overdue (as ``Runtime.wait``)."""
    if pending.future.done():  # the engine's fast path ran it in the submitting thread
        return pending.future.result()
    limit = runtime.settings.job_timeout_s + WAIT_GRACE_S
    try:
        return await asyncio.wait_for(asyncio.wrap_future(pending.future), limit)
    except TimeoutError:
        pending.future.cancel()
        raise Unavailable(
            f"the engine did not answer within {limit:g} s", retry_after=1.0
        ) from None


async def outputs_on_loop(runtime: Runtime, pending: Pending) -> list[list[float]] | None:
    """``outputs_of`` a prediction ``start_on_loop`` submitted; None where an engine
    process no longer held the client's params (``NotCached``): ``start`` it in a thread,
    which reads them."""
    try:
        return await outputs_of(runtime, pending)
    except NotCached:
        return None


def predict(
    *,
    session: Session,
    runtime: Runtime,
    tenant_id: str,
    client_id: str,
    inputs: Sequence[RawInput],
    version: int | None = None,
    field: str = "inputs",
    out_of_scope_threshold: float | None = None,
) -> Prediction:
    """Predictions of one client version (the current one by default), waiting in this
    thread (the API awaits ``start``'s future on the event loop instead)."""
    query = Query(tenant_id, client_id, inputs, version, field, out_of_scope_threshold)
    pending = start(session=session, runtime=runtime, query=query)
    return finish(pending, runtime.wait(pending.future))


def meta_model_of(*, session: Session, runtime: Runtime, sha: str) -> MetaModel:
    """The meta-model version a client version was adapted from, loaded on demand: any
    registered version, promoted or not. Only a version stored before the registry existed
    whose artifact was never registered is missing (409: register the artifact)."""
    try:
        return runtime.registry.version(session, sha)
    except NotFound:
        raise Conflict(
            f"this client version was adapted from meta-model version {sha[:12]}, which is "
            "not registered: register its artifact (`fastadapt meta-models register`) or "
            "adapt the client again"
        ) from None


def classify(
    logits: list[float],
    labels: list[Label],
    temperature: float = 1.0,
    *,
    in_scope: tuple[float, float] | None = None,
    threshold: float = DEFAULT_OUT_OF_SCOPE_THRESHOLD,
) -> LabelPrediction:
    """Softmax over the outputs the client's labels use (the first len(labels)), at the
    meta-model's fitted temperature (models/calibration.py; 1 when none was fitted).
    With the meta-model's in-scope calibration (scale, bias), the in-scope score is
    sigmoid(scale * the top raw logit + bias) (``in_scope`` in models/tasks/text.py), and
    a score below ``threshold`` answers no label (the probabilities stay)."""
    used = logits[: len(labels)]
    top = max(used)
    weights = [math.exp((v - top) / temperature) for v in used]
    total = sum(weights)
    probabilities = {str(label): w / total for label, w in zip(labels, weights, strict=True)}
    label: Label | None = labels[used.index(top)]
    if in_scope is None:
        return LabelPrediction(label, probabilities)
    scale, bias = in_scope
    score = _sigmoid(scale * top + bias)
    return LabelPrediction(None if score < threshold else label, probabilities, score)


def _sigmoid(z: float) -> float:
    """1 / (1 + e^-z) without overflow for any finite z."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)
