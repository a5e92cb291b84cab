"""Adaptations: a support set becomes a client's next version."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.checkpoint import MetaModel
from service import requests
from service.engine import Adapted
from service.errors import AdaptationDiverged, Conflict, NotFound
from service.requests import Adaptation, RawInput, RawTarget
from service.store import repository
from service.store.tables import ClientVersion, new_uid, utcnow
from service.usecases.idempotency import IdempotencyKey, stamp
from service.usecases.runtime import Runtime, missing, storing


@storing
def adapt(
    *,
    session: Session,
    runtime: Runtime,
    tenant_id: str,
    client_id: str,
    meta_model: str,
    inputs: Sequence[RawInput],
    targets: Sequence[RawTarget],
    inner_steps: int | None = None,
    inner_lr: float | None = None,
    out_of_scope_threshold: float | None = None,
    origin: str = "adapt",
    source_version: int | None = None,
    idempotency: IdempotencyKey | None = None,
) -> ClientVersion:
    """Adapt the promoted version of the meta-model to the support set and store the
    result as the next version (made by ``origin``, from ``source_version``: see
    ``ClientVersion``; recording ``idempotency``'s key with it: see
    ``usecases.idempotency``), with its ``out_of_scope_threshold`` (text meta-models)."""
    row, adapted = adapted_version(
        runtime=runtime,
        model=promoted(session=session, runtime=runtime, name=meta_model),
        tenant_id=tenant_id,
        client_id=client_id,
        inputs=inputs,
        targets=targets,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        out_of_scope_threshold=out_of_scope_threshold,
    )
    row.origin, row.source_version = origin, source_version
    stamp(row, idempotency)
    try:
        runtime.commits.append(session=session, row=row)  # committed with concurrent ones
    except IntegrityError:  # the row lock makes this unexpected; the primary key still holds
        raise Conflict(f"client {client_id!r} was adapted concurrently; retry") from None
    runtime.engine.stored(adapted, (tenant_id, client_id, row.uid))  # its first prediction
    return row


def promoted(*, session: Session, runtime: Runtime, name: str) -> MetaModel:
    """The version new adaptations of ``name`` use (422 naming ``meta_model`` if unknown);
    the session is closed after it: no transaction stays open while the engine works."""
    try:
        return runtime.registry.promoted(session, name)
    except NotFound:
        raise requests.unknown_meta_model(name, runtime.registry.names()) from None
    finally:
        session.close()


@storing
def readapt(
    *,
    session: Session,
    runtime: Runtime,
    tenant_id: str,
    client_id: str,
    version: int | None = None,
    inner_steps: int | None = None,
    inner_lr: float | None = None,
    out_of_scope_threshold: float | None = None,
    idempotency: IdempotencyKey | None = None,
) -> ClientVersion:
    """Adapt a stored version's support set again (the current version's by default) to
    the promoted version of the same meta-model name, with its inner-loop defaults unless
    overridden, and its out-of-scope threshold unless one is given; the result is the
    client's new version. After a new version is promoted, this brings a client onto it
    without the client sending its data again."""
    row = repository.get_version(
        session=session, tenant_id=tenant_id, client_id=client_id, version=version
    )
    if row is None:
        raise missing(session=session, tenant_id=tenant_id, client_id=client_id, version=version)
    meta_model, source = row.meta_model, row.version
    if out_of_scope_threshold is None:
        out_of_scope_threshold = row.out_of_scope_threshold  # the version's, kept
    inputs = json.loads(row.support_inputs)  # as the client sent them: rows, arrays or images
    targets = json.loads(row.support_targets)
    session.close()  # nothing pending: adapt() appends the new version through the group commit
    return adapt(
        session=session,
        runtime=runtime,
        tenant_id=tenant_id,
        client_id=client_id,
        meta_model=meta_model,
        inputs=inputs,
        targets=targets,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        out_of_scope_threshold=out_of_scope_threshold,
        origin="readapt",
        source_version=source,
        idempotency=idempotency,
    )


# A support loss may end above where it started by float32 rounding alone (the losses are
# float32 means over up to max_support points, loss_before from the first step's forward
# pass and loss_after from another): 1e-4 relative is far above that, and far below any
# real rise (the one-point sinusoid: 2.76 -> 13.28, x4.8).
DIVERGENCE_TOLERANCE = 1e-4


def divergence(adapted: Adapted, *, allow: bool) -> list[str]:
    """An adaptation whose support loss ended higher than it started is refused (422
    ``adaptation_diverged``; nothing is stored), or, with ``allow``, flagged: the warning
    to store with it. A loss that is not finite is refused either way."""
    before, after = adapted.loss_before, adapted.loss_after
    message = (
        f"the adaptation diverged: support loss {before:.4g} before, {after:.4g} after; "
        "send more support points (within the meta-model's trained_support), keep the "
        "default inner_steps, or rescale the targets to the range it was meta-trained on"
    )
    if not (math.isfinite(before) and math.isfinite(after)):
        raise AdaptationDiverged("support", message)
    if after <= before * (1 + DIVERGENCE_TOLERANCE):
        return []
    if not allow:
        raise AdaptationDiverged("support", message)
    return [f"support: {message}"]


def adapted_version(
    *,
    runtime: Runtime,
    model: MetaModel,
    tenant_id: str,
    client_id: str,
    inputs: Sequence[RawInput],
    targets: Sequence[RawTarget],
    inner_steps: int | None = None,
    inner_lr: float | None = None,
    out_of_scope_threshold: float | None = None,
) -> tuple[ClientVersion, Adapted]:
    """Validate an adaptation of meta-model version ``model``, run it on the engine (no
    transaction open) and return the client's next version, not yet stored, with the
    engine's result; a support loss that rose is refused or flagged (``divergence``)."""
    request = requests.adaptation(
        model=model,
        settings=runtime.settings,
        inputs=inputs,
        targets=targets,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        out_of_scope_threshold=out_of_scope_threshold,
        tenant=tenant_id,
    )
    adapted = runtime.wait(runtime.engine.submit_adapt(request.job))
    diverged = divergence(adapted, allow=runtime.settings.allow_divergent)
    row = version_row(tenant_id=tenant_id, client_id=client_id, request=request, adapted=adapted)
    row.warnings = [*row.warnings, *diverged]  # a rise let through (allow_divergent)
    return row, adapted


def version_row(
    *, tenant_id: str, client_id: str, request: Adaptation, adapted: Adapted
) -> ClientVersion:
    """A client's next version, not yet stored: the adapted params, the support set as the
    client sent it, the labels, the inner-loop settings and losses, and the warnings of its
    validation (a caller adds the ``divergence`` one)."""
    return ClientVersion(
        uid=new_uid(),
        tenant_id=tenant_id,
        client_id=client_id,
        meta_model=request.model.name,
        meta_model_version=request.model.version,
        params=adapted.params,
        support_inputs=request.support_inputs,
        support_targets=request.support_targets,
        support_size=request.support_size,
        inner_steps=adapted.steps,
        inner_lr=adapted.lr,
        support_loss_before=adapted.loss_before,
        support_loss_after=adapted.loss_after,
        adapt_ms=adapted.adapt_ms,
        labels=request.labels,
        warnings=list(request.warnings),  # what validation let through (allow_untrained)
        out_of_scope_threshold=request.out_of_scope_threshold,
        created_at=utcnow(),
    )
