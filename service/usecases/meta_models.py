"""Meta-models: their promoted versions described for clients, and the registry's
versions registered, listed and promoted.

Start-up rule (``register_shipped``): every artifact under ``models_dir`` is registered
(once: its sha is its key). A name with no promoted version gets the shipped one; a
shipped sha registered for the first time is promoted (a new image ships a new model);
a shipped sha that was already registered changes nothing, so a later ``promote`` by an
operator is not undone by a restart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session

from models import tasks
from models.checkpoint import ArtifactConfig, MetaModel, discover
from service.errors import Conflict, InvalidInput, NotFound
from service.store import registry as store
from service.store.tables import utcnow
from service.usecases.registry import ModelRegistry, pinned_encoder

log = logging.getLogger(__name__)
SHA_PREFIX = re.compile(r"^[0-9a-f]{12,64}$")


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
    features: list[str] | None  # tabular: the feature names, in row order
    trained_support: list[int] | None  # [min, max] meta-trained for (None: not declared)
    trained_inner_steps: list[int] | None


def describe(model: MetaModel) -> MetaModelInfo:
    config, inner, trained = model.config, model.config.inner, model.config.trained_for
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
        accepts_images=tasks.family(config.family).preprocess is not None,
        features=list(config.task["features"]) if config.task.get("features") else None,
        trained_support=list(trained.support) if trained else None,
        trained_inner_steps=list(trained.inner_steps) if trained else None,
    )


def list_all(*, session: Session, registry: ModelRegistry) -> list[MetaModelInfo]:
    """The promoted version of every name."""
    promotions = registry.promotions(session)
    return [describe(registry.version(session, promotions[n].sha)) for n in sorted(promotions)]


def get(*, session: Session, registry: ModelRegistry, name: str) -> MetaModelInfo:
    return describe(registry.promoted(session, name))


# -- the registry ------------------------------------------------------------------------------
@dataclass(frozen=True)
class VersionInfo:
    name: str
    sha: str
    size_bytes: int
    source: str  # "shipped:<path>", "cli:<path>" or "api"
    registered_at: datetime
    promoted: bool  # the version new adaptations of ``name`` use


@dataclass(frozen=True)
class Registered:
    version: VersionInfo
    added: bool  # False: the sha was already registered (nothing changed but a promotion)


def versions(*, session: Session, name: str | None = None) -> list[VersionInfo]:
    """Registered versions, oldest first (of ``name``: ``NotFound`` if it has none)."""
    rows = store.list_versions(session=session, name=name)
    if name is not None and not rows:
        raise NotFound(f"unknown meta-model {name!r}")
    promoted = {p.name: p.promoted_sha for p in store.promoted(session=session)}
    return [
        VersionInfo(
            r.name, r.sha, r.size_bytes, r.source, r.registered_at, promoted.get(r.name) == r.sha
        )
        for r in rows
    ]


def check(model: MetaModel) -> None:
    """What a registered version must be beyond a loadable artifact: of a known family,
    and runnable here (a text meta-model's pinned encoder installed: else 422 naming
    ``config.task.encoder`` and what differs)."""
    try:
        tasks.family(model.config.family)
    except KeyError as exc:
        raise InvalidInput("config.family", str(exc.args[0] if exc.args else exc)) from None
    pinned_encoder(model)


def register(
    *,
    session: Session,
    registry: ModelRegistry,
    model: MetaModel,
    source: str,
    promote: bool = False,
) -> Registered:
    """Record ``model`` (already loaded and sha-checked) as a version of its name, and
    promote it if asked; commits. Registering a registered sha adds nothing."""
    check(model)
    now = utcnow()
    added = store.add_version(
        session=session,
        sha=model.version,
        name=model.name,
        config=model.config.to_json(),
        weights=model.weights_bytes(),
        source=source,
        at=now,
    )
    row = store.get_version(session=session, sha=model.version)
    if row is None:  # pragma: no cover - added or already there
        raise NotFound(f"meta-model version {model.version[:12]} vanished")
    if row.name != model.name:
        raise Conflict(
            f"version {model.version[:12]} is registered as meta-model {row.name!r}, "
            f"not {model.name!r}"
        )
    if promote:
        store.promote(session=session, name=model.name, sha=model.version, at=now)
    else:
        store.promote_if_none(session=session, name=model.name, sha=model.version, at=now)
    session.commit()
    registry.invalidate()
    registry.add(model)
    info = next(v for v in versions(session=session, name=model.name) if v.sha == model.version)
    return Registered(info, added)


def register_shipped(
    *, session: Session, registry: ModelRegistry, directory: Path
) -> list[MetaModel]:
    """Register every artifact under ``directory`` (the start-up rule, above); returns
    them, loaded. Writes only what is new, so replicas starting together do not wait on
    each other's locks once the artifacts are registered."""
    shipped: list[MetaModel] = []
    for path in discover(directory):
        model = MetaModel.load(path)  # the sha256 file checked, safetensors only
        try:
            check(model)
        except InvalidInput as exc:  # the server refuses to start: say which artifact
            log.error("shipped meta-model %s at %s cannot run: %s", model.name, path, exc.message)
            raise
        if any(m.name == model.name for m in shipped):
            raise ValueError(f"two artifacts named {model.name!r} under {directory}")
        shipped.append(model)
        registry.add(model)
        known = store.get_version(session=session, sha=model.version) is not None
        names = {p.name for p in store.promoted(session=session)}
        session.rollback()  # only read: the writes below start their own transaction
        if known and model.name in names:
            continue  # an earlier start registered it; a promotion since stands
        now = utcnow()
        added = store.add_version(
            session=session,
            sha=model.version,
            name=model.name,
            config=model.config.to_json(),
            weights=model.weights_bytes(),
            source=f"shipped:{path}",
            at=now,
        )
        if added:  # first seen here: a new image ships a new model
            store.promote(session=session, name=model.name, sha=model.version, at=now)
        else:
            store.promote_if_none(session=session, name=model.name, sha=model.version, at=now)
        session.commit()
        log.info("registered shipped meta-model %s@%s", model.name, model.version[:12])
    registry.invalidate()
    if not shipped:
        log.warning("no meta-model artifacts under %s", directory)
    return shipped


def resolve(*, session: Session, name: str, version: str) -> str:
    """A full sha from a full sha or a unique prefix of at least 12 hex digits, of a
    version registered under ``name``."""
    prefix = version.strip().lower()
    if not SHA_PREFIX.match(prefix):
        raise InvalidInput("version", "a sha256 or a prefix of at least 12 hex digits")
    found = store.find_versions(session=session, prefix=prefix)
    if not found:
        raise NotFound(f"no registered version {prefix} of meta-model {name!r}")
    if len(found) > 1:
        raise InvalidInput("version", f"{prefix} is ambiguous: give more digits")
    row = store.get_version(session=session, sha=found[0])
    if row is None or row.name != name:
        raise NotFound(f"no registered version {prefix} of meta-model {name!r}")
    return row.sha


def promote(*, session: Session, registry: ModelRegistry, name: str, version: str) -> VersionInfo:
    """Make a registered version of ``name`` the one new adaptations use; commits."""
    sha = resolve(session=session, name=name, version=version)
    store.promote(session=session, name=name, sha=sha, at=utcnow())
    session.commit()
    registry.invalidate()
    log.info("promoted meta-model %s@%s", name, sha[:12])
    return next(v for v in versions(session=session, name=name) if v.sha == sha)


def summary(infos: Sequence[VersionInfo]) -> list[tuple[str, ...]]:
    """Rows for a table: name, sha, size, source, registered, promoted."""
    return [
        (
            v.name,
            v.sha,
            str(v.size_bytes),
            v.source,
            v.registered_at.isoformat(timespec="seconds"),
            "promoted" if v.promoted else "",
        )
        for v in infos
    ]


def upload(
    *,
    session: Session,
    registry: ModelRegistry,
    config: dict[str, object],
    weights: str,
    sha256: str,
    promote: bool = False,
) -> Registered:
    """Register an artifact sent over HTTP (the caller checked the setting that allows
    it): the weights are base64 safetensors whose sha256 must be ``sha256``, the config a
    complete config.json; nothing is unpickled and a bad part is a 422 naming it."""
    try:
        data = base64.b64decode(weights, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("weights", "not base64") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise InvalidInput("sha256", f"the weights' sha256 is {digest}, not {sha256}")
    text = json.dumps(config)
    try:
        ArtifactConfig.from_json(text, "config")
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidInput("config", str(exc)) from None
    try:
        model = MetaModel.from_bytes(text, data, expected_sha=sha256, source="upload")
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidInput("weights", str(exc)) from None
    return register(session=session, registry=registry, model=model, source="api", promote=promote)
