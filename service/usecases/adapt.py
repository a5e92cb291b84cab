"""Adaptations: a support set becomes a client's next version."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import requests
from service.engine import Adapted
from service.errors import Conflict, InvalidInput
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
    row, adapted = adapted_version(
        runtime=runtime,
        tenant_id=tenant_id,
        client_id=client_id,
        meta_model=meta_model,
        inputs=inputs,
        targets=targets,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
    )
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


def adapted_version(
    *,
    runtime: Runtime,
    tenant_id: str,
    client_id: str,
    meta_model: str,
    inputs: Sequence[RawInput],
    targets: Sequence[RawTarget],
    inner_steps: int | None = None,
    inner_lr: float | None = None,
) -> tuple[ClientVersion, Adapted]:
    """Validate an adaptation, run it on the engine (no transaction open) and return the
    client's next version, not yet stored, with the engine's result."""
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
    if not (math.isfinite(adapted.loss_before) and math.isfinite(adapted.loss_after)):
        raise InvalidInput(
            "support",
            f"the adaptation diverged (support loss {adapted.loss_before:g} -> "
            f"{adapted.loss_after:g}); lower inner_lr or inner_steps, or rescale the data",
        )
    row = version_row(tenant_id=tenant_id, client_id=client_id, request=request, adapted=adapted)
    return row, adapted


def version_row(
    *, tenant_id: str, client_id: str, request: Adaptation, adapted: Adapted
) -> ClientVersion:
    """A client's next version, not yet stored: the adapted params, the support set as the
    client sent it, the labels, the inner-loop settings and losses."""
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
        created_at=utcnow(),
    )
