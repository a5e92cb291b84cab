"""Use cases: one transaction each, and the only place that commits (new versions commit
through ``GroupCommit``, which shares one transaction among concurrent adaptations).

Heavy work (adaptation, prediction) runs on the engine with no database transaction
open, so a slow adaptation never holds a lock, and a failed or rejected one leaves the
client's previous version current and intact.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from models.checkpoint import MetaModel
from models.tasks import image_preprocess
from service import inputs as parse
from service import validation
from service.engine import Adapted, AdaptJob, Engine
from service.errors import Conflict, InvalidInput, NotFound, Unavailable
from service.inputs import Label, RawInput
from service.settings import Settings
from service.store import repository
from service.store.group_commit import GroupCommit
from service.store.tables import DEFAULT_TENANT as DEFAULT_TENANT  # the API's tenant, for now
from service.store.tables import Client, ClientVersion, utcnow

MetaModels = Mapping[str, MetaModel]
T = TypeVar("T")
WAIT_GRACE_S = 5.0  # waited past a job's deadline, by when the engine has expired it (503)


@dataclass(frozen=True)
class MetaModelInfo:
    name: str
    version: str  # sha256 of the weights
    family: str
    task_kind: str
    input_shape: list[int]
    output: str
    inner_steps: int  # default adaptation
    inner_lr: float | None  # None: learned rates
    first_order: bool
    adapt: str
    learned_lr: str
    max_way: int | None  # classification: the most labels one client may use
    accepts_images: bool  # inputs may be base64 PNG/JPEG


@dataclass(frozen=True)
class LabelPrediction:
    label: Label  # the most probable of the client's labels
    probabilities: dict[str, float]  # every label of the client (as text): p


@dataclass(frozen=True)
class Prediction:
    client_id: str
    version: int
    # one float per input for a single output; a LabelPrediction per input for classification
    predictions: list[float] | list[list[float]] | list[LabelPrediction]


# -- meta-models -----------------------------------------------------------------------------
def describe(model: MetaModel) -> MetaModelInfo:
    config, inner = model.config, model.config.inner
    return MetaModelInfo(
        name=model.name,
        version=model.version,
        family=config.family,
        task_kind=config.kind,
        input_shape=list(config.input_shape),
        output=str(config.task.get("output", "")),
        inner_steps=inner.steps,
        inner_lr=None if inner.learned_lr != "none" else inner.lr,
        first_order=inner.first_order,
        adapt=inner.adapt,
        learned_lr=inner.learned_lr,
        max_way=config.task.get("max_way"),
        accepts_images=image_preprocess(config.family) is not None,
    )


def list_meta_models(meta_models: MetaModels) -> list[MetaModelInfo]:
    return [describe(meta_models[name]) for name in sorted(meta_models)]


def get_meta_model(meta_models: MetaModels, name: str) -> MetaModelInfo:
    if name not in meta_models:
        raise NotFound(f"unknown meta-model {name!r}")
    return describe(meta_models[name])


# -- clients ---------------------------------------------------------------------------------
def adapt(
    *,
    session: Session,
    engine: Engine,
    commits: GroupCommit,
    meta_models: MetaModels,
    settings: Settings,
    tenant_id: str,
    client_id: str,
    meta_model: str,
    inputs: Sequence[RawInput],
    targets: Sequence[float | str],
    inner_steps: int | None = None,
    inner_lr: float | None = None,
) -> ClientVersion:
    """Adapt the meta-model to the support set and store the result as the next version."""
    model = validation.meta_model(meta_models, meta_model)
    validation.support(inputs, targets, settings)
    validation.inner(model, inner_steps, inner_lr, settings)
    x = parse.rows(model, inputs, field="support.inputs", settings=settings)
    y, labels = parse.targets(model, targets)
    job = AdaptJob(model.name, x, y, inner_steps, inner_lr)
    adapted = _wait(engine.submit_adapt(job), settings)
    if not (math.isfinite(adapted.loss_before) and math.isfinite(adapted.loss_after)):
        raise InvalidInput(
            "support",
            f"the adaptation diverged (support loss {adapted.loss_before:g} -> "
            f"{adapted.loss_after:g}); lower inner_lr or inner_steps, or rescale the data",
        )
    row = version_row(
        tenant_id=tenant_id,
        client_id=client_id,
        model=model,
        adapted=adapted,
        inputs=inputs,
        targets=targets,
        labels=labels,
    )
    ticket = engine.ticket()  # before the write: a delete from now on keeps the params uncached
    try:
        commits.append(session=session, row=row)  # committed with concurrent adaptations
    except IntegrityError:  # the row lock makes this unexpected; the primary key still holds
        raise Conflict(f"client {client_id!r} was adapted concurrently; retry") from None
    engine.prime(model.name, (tenant_id, client_id, row.version), adapted.params, ticket)
    return row


def readapt(
    *,
    session: Session,
    engine: Engine,
    commits: GroupCommit,
    meta_models: MetaModels,
    settings: Settings,
    tenant_id: str,
    client_id: str,
    version: int | None = None,
    inner_steps: int | None = None,
    inner_lr: float | None = None,
) -> ClientVersion:
    """Adapt a stored version's support set again (the current version's by default) to
    the meta-model of the same name as loaded now, with that meta-model's inner-loop
    defaults unless overridden; the result is the client's new version. After an artifact
    is replaced, this brings a client onto it without the client sending its data again."""
    row = repository.get_version(
        session=session, tenant_id=tenant_id, client_id=client_id, version=version
    )
    if row is None:
        raise _missing(session=session, tenant_id=tenant_id, client_id=client_id, version=version)
    meta_model = row.meta_model
    inputs = json.loads(row.support_inputs)  # as the client sent them: rows, arrays or images
    targets = json.loads(row.support_targets)
    session.close()  # nothing pending: adapt() appends the new version through the group commit
    return adapt(
        session=session,
        engine=engine,
        commits=commits,
        meta_models=meta_models,
        settings=settings,
        tenant_id=tenant_id,
        client_id=client_id,
        meta_model=meta_model,
        inputs=inputs,
        targets=targets,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
    )


def version_row(
    *,
    tenant_id: str,
    client_id: str,
    model: MetaModel,
    adapted: Adapted,
    inputs: Sequence[RawInput],
    targets: Sequence[float | str],
    labels: list[Label] | None,
) -> ClientVersion:
    """A client's next version, not yet stored: the adapted params, the support set as the
    client sent it, the labels, the inner-loop settings and losses."""
    return ClientVersion(
        tenant_id=tenant_id,
        client_id=client_id,
        meta_model=model.name,
        meta_model_version=model.version,
        params=adapted.params,
        support_inputs=json.dumps(inputs, separators=(",", ":")),
        support_targets=json.dumps(targets, separators=(",", ":")),
        support_size=len(inputs),
        inner_steps=adapted.steps,
        inner_lr=adapted.lr,
        support_loss_before=adapted.loss_before,
        support_loss_after=adapted.loss_after,
        adapt_ms=adapted.adapt_ms,
        labels=labels,
        created_at=utcnow(),
    )


def predict(
    *,
    session: Session,
    engine: Engine,
    meta_models: MetaModels,
    settings: Settings,
    tenant_id: str,
    client_id: str,
    inputs: Sequence[RawInput],
    version: int | None = None,
    field: str = "inputs",
) -> Prediction:
    """Predictions of one client version (the current one by default)."""
    validation.batch(inputs, settings, field)
    row = repository.get_version(
        session=session, tenant_id=tenant_id, client_id=client_id, version=version
    )
    if row is None:
        raise _missing(session=session, tenant_id=tenant_id, client_id=client_id, version=version)
    model = meta_models.get(row.meta_model)
    if model is None or model.version != row.meta_model_version:
        loaded = "not loaded" if model is None else f"loaded at {model.version[:12]}"
        raise Conflict(
            f"client {client_id!r} version {row.version} was adapted from meta-model "
            f"{row.meta_model}@{row.meta_model_version[:12]}, which is {loaded}; adapt it "
            f"again (POST /v1/clients/{client_id}/readaptations reuses its support set)"
        )
    x = parse.rows(model, inputs, field=field, settings=settings)
    labels = row.labels
    number = row.version
    session.close()  # no connection is held while the engine works; params() reads afresh

    def params() -> bytes:
        data = repository.load_params(
            session=session, tenant_id=tenant_id, client_id=client_id, version=number
        )
        if data is None:
            raise NotFound(f"unknown client {client_id!r}")
        return data

    future = engine.submit_predict(model.name, (tenant_id, client_id, number), params, x)
    session.close()
    outputs = _wait(future, settings)
    if not validation.all_finite(outputs):
        raise InvalidInput(field, "the predictions are not finite for these inputs")
    if labels is not None:
        return Prediction(client_id, number, [classify(out, labels) for out in outputs])
    single = all(len(out) == 1 for out in outputs)
    return Prediction(client_id, number, [out[0] for out in outputs] if single else outputs)


def get_client(*, session: Session, tenant_id: str, client_id: str) -> Client:
    client = repository.get_client(session=session, tenant_id=tenant_id, client_id=client_id)
    if client is None:
        raise NotFound(f"unknown client {client_id!r}")
    return client


def delete_client(*, session: Session, engine: Engine, tenant_id: str, client_id: str) -> None:
    """Delete the client with every version and support set, and drop its cached models."""
    if not repository.delete_client(session=session, tenant_id=tenant_id, client_id=client_id):
        raise NotFound(f"unknown client {client_id!r}")
    session.commit()
    engine.forget(tenant_id, client_id)


def check_ready(*, session: Session, meta_models: MetaModels) -> None:
    if not meta_models:
        raise Unavailable("no meta-models are loaded")
    try:
        repository.ping(session=session)
    except SQLAlchemyError as exc:
        raise Unavailable(f"the database is unreachable ({type(exc).__name__})") from None


# -- helpers ---------------------------------------------------------------------------------
def classify(logits: list[float], labels: list[Label]) -> LabelPrediction:
    """Softmax over the outputs the client's labels use (the first len(labels))."""
    used = logits[: len(labels)]
    top = max(used)
    weights = [math.exp(v - top) for v in used]
    total = sum(weights)
    probabilities = {str(label): w / total for label, w in zip(labels, weights, strict=True)}
    return LabelPrediction(labels[used.index(top)], probabilities)


def _wait(future: Future[T], settings: Settings) -> T:
    try:
        return future.result(timeout=settings.job_timeout_s + WAIT_GRACE_S)
    except TimeoutError:
        future.cancel()
        raise Unavailable(
            f"the engine did not answer within {settings.job_timeout_s + WAIT_GRACE_S:g} s",
            retry_after=1.0,
        ) from None


def _missing(*, session: Session, tenant_id: str, client_id: str, version: int | None) -> NotFound:
    if version is not None and repository.client_exists(
        session=session, tenant_id=tenant_id, client_id=client_id
    ):
        return NotFound(f"client {client_id!r} has no version {version}")
    return NotFound(f"unknown client {client_id!r}")
