"""Adaptations: a support set becomes a client's next version."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import requests
from service.engine import Adapted
from service.errors import AdaptationDiverged, Conflict
from service.requests import Adaptation, RawInput, RawTarget
from service.store import repository
from service.store.tables import ClientVersion, utcnow
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
) -> ClientVersion:
    """Adapt the meta-model to the support set and store the result as the next version."""
    request = requests.adaptation(
        meta_models=runtime.meta_models,
        settings=runtime.settings,
        meta_model=meta_model,
        inputs=inputs,
        targets=targets,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
    )
    adapted = runtime.wait(runtime.engine.submit_adapt(request.job))
    diverged = divergence(adapted, allow=runtime.settings.allow_divergent)
    row = version_row(tenant_id=tenant_id, client_id=client_id, request=request, adapted=adapted)
    row.warnings = [*row.warnings, *diverged]  # a rise let through (allow_divergent)
    try:
        runtime.commits.append(session=session, row=row)  # committed with concurrent ones
    except IntegrityError:  # the row lock makes this unexpected; the primary key still holds
        raise Conflict(f"client {client_id!r} was adapted concurrently; retry") from None
    runtime.engine.stored(adapted, (tenant_id, client_id, row.version))  # its first prediction
    return row


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
) -> ClientVersion:
    """Adapt a stored version's support set again (the current version's by default) to
    the meta-model of the same name as loaded now, with that meta-model's inner-loop
    defaults unless overridden; the result is the client's new version. After an artifact
    is replaced, this brings a client onto it without the client sending its data again."""
    row = repository.get_version(
        session=session, tenant_id=tenant_id, client_id=client_id, version=version
    )
    if row is None:
        raise missing(session=session, tenant_id=tenant_id, client_id=client_id, version=version)
    meta_model = row.meta_model
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


def version_row(
    *, tenant_id: str, client_id: str, request: Adaptation, adapted: Adapted
) -> ClientVersion:
    """A client's next version, not yet stored: the adapted params, the support set as the
    client sent it, the labels, the inner-loop settings and losses, and the warnings of its
    validation (a caller adds the ``divergence`` one)."""
    return ClientVersion(
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
        created_at=utcnow(),
    )
