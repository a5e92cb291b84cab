"""Client versions users manage: listing clients and versions page by page, rolling
back to an older version, and adding examples to the current support set.

Every version-creating use case here appends through the group commit (with the
retention it applies) and answers the new ``ClientVersion``, exactly as ``adapt`` does,
so a route-level wrapper (idempotent retries) sees the same shape for all of them.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.engine import Adapted
from service.errors import Conflict, InvalidInput, NotFound
from service.requests import RawInput, RawTarget
from service.store import repository
from service.store.repository import ClientSummary
from service.store.tables import ClientVersion, new_uid, utcnow
from service.usecases import adapt
from service.usecases.idempotency import IdempotencyKey, stamp
from service.usecases.runtime import Runtime, missing, storing

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None  # None: this was the last page


def promoted_versions(session: Session, runtime: Runtime) -> dict[str, str]:
    """The sha of the version of each meta-model name that new adaptations use (a client
    whose current version is on another sha of its name is stale). The one place that
    knows where promoted versions live."""
    return {name: p.sha for name, p in runtime.registry.promotions(session).items()}


# -- listing ---------------------------------------------------------------------------------
@storing
def list_clients(
    *,
    session: Session,
    runtime: Runtime,
    tenant_id: str,
    limit: int,
    cursor: str | None = None,
    meta_model: str | None = None,
    stale: bool = False,
) -> Page[ClientSummary]:
    """One page of the tenant's clients, by client id; the cursor continues it."""
    after = _decode(cursor, "clients", str) if cursor else None
    if meta_model is not None and not meta_model.isprintable():  # PostgreSQL refuses NUL
        raise InvalidInput("meta_model", "not a meta-model name (control characters)")
    rows = repository.list_clients(
        session=session,
        tenant_id=tenant_id,
        after=after,
        limit=limit + 1,  # one more says whether a next page exists
        meta_model=meta_model,
        stale_against=promoted_versions(session, runtime) if stale else None,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, _encode("clients", rows[-1].client_id) if more else None)


@storing
def list_versions(
    *, session: Session, tenant_id: str, client_id: str, limit: int, cursor: str | None = None
) -> tuple[int, Page[ClientVersion]]:
    """The client's current version number, and one page of its versions, newest first."""
    before = _decode(cursor, "versions", int) if cursor else None
    current = repository.current_version(session=session, tenant_id=tenant_id, client_id=client_id)
    if current is None:
        raise NotFound(f"unknown client {client_id!r}")
    rows = repository.list_versions(
        session=session, tenant_id=tenant_id, client_id=client_id, before=before, limit=limit + 1
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return current, Page(rows, _encode("versions", rows[-1].version) if more else None)


def _encode(kind: str, position: str | int) -> str:
    """An opaque cursor: where the next page starts. It names a position only (the
    tenant always comes from the caller's key), so it discloses and unlocks nothing."""
    raw = json.dumps([kind, position], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(cursor: str, kind: str, type_: type[T]) -> T:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        found, position = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        found, position = None, None
    if found != kind or type(position) is not type_ or not _in_range(position):
        raise InvalidInput("cursor", "not a cursor of this listing: pass next_cursor back as is")
    return position  # checked: exactly type_, and a position _encode could have written


MAX_POSITION = 2**31 - 1  # a version number: the INTEGER column's range


def _in_range(position: object) -> bool:
    """A client id (1-128 printable characters) or a version number: a forged cursor's
    NUL character or 30-digit integer would reach the database (a 500 on PostgreSQL)."""
    if isinstance(position, str):
        return 0 < len(position) <= 128 and position.isprintable()
    return isinstance(position, int) and 1 <= position <= MAX_POSITION


# -- rollback --------------------------------------------------------------------------------
@storing
def rollback(
    *,
    session: Session,
    runtime: Runtime,
    tenant_id: str,
    client_id: str,
    version: int,
    idempotency: IdempotencyKey | None = None,
) -> ClientVersion:
    """Make ``version`` current again: a new version that copies its parameters, support
    set, labels, meta-model and record (origin "rollback"), so history stays append-only.
    The engine caches it, as a new adaptation, for its first prediction."""
    ticket = runtime.engine.ticket()  # before the read: a delete meanwhile is not cached
    source = repository.get_version(
        session=session, tenant_id=tenant_id, client_id=client_id, version=version
    )
    if source is None:
        raise missing(session=session, tenant_id=tenant_id, client_id=client_id, version=version)
    row = ClientVersion(
        uid=new_uid(),  # a version of its own: never the source's identity
        tenant_id=tenant_id,
        client_id=client_id,
        meta_model=source.meta_model,
        meta_model_version=source.meta_model_version,
        params=source.params,
        support_inputs=source.support_inputs,
        support_targets=source.support_targets,
        support_size=source.support_size,
        inner_steps=source.inner_steps,
        inner_lr=source.inner_lr,
        support_loss_before=source.support_loss_before,
        support_loss_after=source.support_loss_after,
        adapt_ms=source.adapt_ms,
        labels=source.labels,
        warnings=list(source.warnings or []),  # what the source was stored despite, if any
        out_of_scope_threshold=source.out_of_scope_threshold,
        created_at=utcnow(),
        origin="rollback",
        source_version=version,
    )
    stamp(row, idempotency)
    session.close()  # nothing pending: the copy is appended through the group commit
    try:
        runtime.commits.append(session=session, row=row)
    except IntegrityError:
        raise Conflict(f"client {client_id!r} changed concurrently; retry") from None
    copy = Adapted(
        row.params,
        row.support_loss_before,
        row.support_loss_after,
        row.inner_steps,
        row.inner_lr,
        row.adapt_ms,
        meta_model=row.meta_model_version,  # cached only if that version is on the device
        ticket=ticket,
    )
    runtime.engine.stored(copy, (tenant_id, client_id, row.uid))
    return row


# -- examples --------------------------------------------------------------------------------
@storing
def add_examples(
    *,
    session: Session,
    runtime: Runtime,
    tenant_id: str,
    client_id: str,
    inputs: Sequence[RawInput],
    targets: Sequence[RawTarget],
    inner_steps: int | None = None,
    inner_lr: float | None = None,
    out_of_scope_threshold: float | None = None,
    idempotency: IdempotencyKey | None = None,
) -> ClientVersion:
    """The current support set plus these examples, adapted anew from the
    meta-initialisation of the same meta-model name (MAML's semantics: one adaptation of
    the whole set, not a fine-tune of the current params), as the client's new version
    (origin "examples", from the current version). Validated as an adaptation is; the
    combined set is bounded by ``max_support``; the inner-loop settings are the
    meta-model's defaults unless given, the out-of-scope threshold the current version's."""
    if not inputs:
        raise InvalidInput("inputs", "no examples to add")
    if len(targets) != len(inputs):
        raise InvalidInput("targets", f"{len(targets)} targets for {len(inputs)} inputs; one each")
    current = repository.get_version(session=session, tenant_id=tenant_id, client_id=client_id)
    if current is None:
        raise NotFound(f"unknown client {client_id!r}")
    stored_inputs: list[RawInput] = json.loads(current.support_inputs)
    stored_targets: list[RawTarget] = json.loads(current.support_targets)
    total, limit = len(stored_inputs) + len(inputs), runtime.settings.max_support
    if total > limit:
        raise InvalidInput(
            "inputs",
            f"{len(stored_inputs)} stored and {len(inputs)} new examples make {total} "
            f"support points, over the limit of {limit}",
        )
    meta_model, source = current.meta_model, current.version
    if out_of_scope_threshold is None:
        out_of_scope_threshold = current.out_of_scope_threshold  # the version's, kept
    session.close()  # nothing pending: adapt() appends the new version through the group commit
    try:
        return adapt.adapt(
            session=session,
            runtime=runtime,
            tenant_id=tenant_id,
            client_id=client_id,
            meta_model=meta_model,
            inputs=[*stored_inputs, *inputs],
            targets=[*stored_targets, *targets],
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            out_of_scope_threshold=out_of_scope_threshold,
            origin="examples",
            source_version=source,
            idempotency=idempotency,
        )
    except InvalidInput as error:
        raise _as_examples(error, len(stored_inputs)) from None


_SUPPORT_FIELD = re.compile(r"support\.(inputs|targets)(?:\[(\d+)\])?")


def _as_examples(error: InvalidInput, stored: int) -> InvalidInput:
    """An adaptation's error about the combined support set, named by the request's
    fields: ``support.inputs[7]`` is ``inputs[2]`` after 5 stored points."""
    match = _SUPPORT_FIELD.fullmatch(error.field)
    if match is None:
        return error
    message = error.message.removeprefix(f"{error.field}: ")
    if match[2] is None:
        return InvalidInput(match[1], message)
    index = int(match[2]) - stored
    if index < 0:  # a stored point the meta-model no longer takes
        return InvalidInput("support", f"the stored support point {match[2]}: {message}")
    return InvalidInput(f"{match[1]}[{index}]", message)
