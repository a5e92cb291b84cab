"""ORM tables (SQLAlchemy 2.0 typed mappings). The schema itself is created by Alembic.

A client is keyed by ``(tenant_id, client_id)``: the tenant is the API key's (everyone
is ``DEFAULT_TENANT`` when a loopback server runs without keys). Each adaptation adds an
immutable ``ClientVersion`` (1, 2, 3, ...); ``Client.current_version`` is the newest.
A version's number comes back when a client is deleted and re-created; its ``uid`` (32
random hex digits) never does: caches and ETags key on it. A version made by a request
with an ``Idempotency-Key`` keeps the key and the request's hash, unique per tenant.
Support sets are stored as JSON text, exactly the numbers the client sent; adapted
parameters as safetensors bytes. ``ApiKey`` holds a tenant's keys as SHA-256 hashes.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

DEFAULT_TENANT = "default"
# how a client version was made (ClientVersion.origin)
ORIGINS = ("adapt", "readapt", "examples", "rollback", "reconcile")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_uid() -> str:
    """A client version's identity: 32 lowercase hex digits (a random UUID), never reused."""
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Client(Base):
    __tablename__ = "clients"

    tenant_id: Mapped[str] = mapped_column(
        String(64), primary_key=True, default=DEFAULT_TENANT, server_default=DEFAULT_TENANT
    )
    client_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    current_version: Mapped[int] = mapped_column(Integer)  # 0 only inside the creating txn
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    versions: Mapped[list[ClientVersion]] = relationship(
        back_populates="client",
        order_by="ClientVersion.version",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class ClientVersion(Base):
    __tablename__ = "client_versions"
    __table_args__ = (
        ForeignKeyConstraint(
            ["tenant_id", "client_id"],
            ["clients.tenant_id", "clients.client_id"],
            ondelete="CASCADE",
        ),
        UniqueConstraint("tenant_id", "idempotency_key"),
    )

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)  # 1, 2, 3, ... per client
    # -- identity (issue 11): never reused, unlike (client_id, version) ---------------------
    uid: Mapped[str] = mapped_column(String(32), unique=True, default=new_uid)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)  # sha256 hex

    meta_model: Mapped[str] = mapped_column(String(128))
    meta_model_version: Mapped[str] = mapped_column(String(64))  # sha256 of its weights
    params: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)  # safetensors
    # JSON, (K, D) and (K,); one deferred group: reading either loads both in one query
    support_inputs: Mapped[str] = mapped_column(Text, deferred=True, deferred_group="support")
    support_targets: Mapped[str] = mapped_column(Text, deferred=True, deferred_group="support")
    support_size: Mapped[int] = mapped_column(Integer)
    inner_steps: Mapped[int] = mapped_column(Integer)
    inner_lr: Mapped[float | None] = mapped_column(Float)  # None: the meta-model's learned rates
    support_loss_before: Mapped[float] = mapped_column(Float)
    support_loss_after: Mapped[float] = mapped_column(Float)
    adapt_ms: Mapped[float] = mapped_column(Float)
    # classification: the client's labels in output order (output i predicts labels[i])
    labels: Mapped[list[int | str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # how it was made: one of ORIGINS; source_version: the version a readapt, rollback,
    # reconcile or examples started from (None for a plain adaptation)
    origin: Mapped[str] = mapped_column(String(16), default="adapt", server_default="adapt")
    source_version: Mapped[int | None] = mapped_column(Integer, default=None)
    # guardrails (migration 0007): what the adaptation did outside what its meta-model was
    # trained for, or a support loss that rose, when settings allowed storing it anyway
    warnings: Mapped[list[str]] = mapped_column(JSON, default=list, server_default="[]")
    # out of scope (migration 0010): the in-scope score below which this version's
    # predictions answer no label; None: its meta-model's default (text meta-models only)
    out_of_scope_threshold: Mapped[float | None] = mapped_column(Float, default=None)

    client: Mapped[Client] = relationship(back_populates="versions")


class ApiKey(Base):
    """An API key of a tenant: only its SHA-256 is stored; revoked keys stay listed."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # key_<16 hex>, public
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    scope: Mapped[str] = mapped_column(String(16))  # client | admin
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the key
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


# -- meta-model registry (issue 11) ----------------------------------------------------------
class MetaModelVersion(Base):
    """One registered meta-model artifact, content-addressed: the sha256 of its weights is
    its key, so registering the same weights twice is one row."""

    __tablename__ = "meta_model_versions"

    sha: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the weights
    name: Mapped[str] = mapped_column(String(128), index=True)
    config: Mapped[str] = mapped_column(Text)  # the artifact's config.json
    weights: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)  # safetensors
    size_bytes: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(512))  # "shipped:<path>", "cli:<path>", "api"
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class MetaModelName(Base):
    """A meta-model name and the version new adaptations of it use."""

    __tablename__ = "meta_models"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    promoted_sha: Mapped[str] = mapped_column(String(64))
    promoted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# -- reconcile jobs (issue 11) -----------------------------------------------------------------
JOB_STATES = ("queued", "running", "done", "cancelled")
ITEM_STATES = ("pending", "claimed", "done", "failed", "skipped")


class Job(Base):
    """A background job of a tenant, stored so that it survives restarts and is shared by
    every process: ``kind`` "reconcile" re-adapts the tenant's clients of ``meta_model``
    that are on another version than ``target`` (the sha promoted when it was created)."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex, public
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # reconcile
    meta_model: Mapped[str] = mapped_column(String(128))
    target: Mapped[str] = mapped_column(String(64))  # sha256 of the promoted weights
    state: Mapped[str] = mapped_column(String(16))  # JOB_STATES
    total: Mapped[int] = mapped_column(Integer)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class JobItem(Base):
    """One client of a job: claimed by one process at a time, for a lease that the process
    renews while it works (an expired lease, of a killed process, is claimed again)."""

    __tablename__ = "job_items"
    __table_args__ = (
        ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        Index("ix_job_items_state_claimed_at", "state", "claimed_at"),
    )

    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    # the client's current version when the job was created: the new version is appended
    # only if it is still current (and still of this meta-model version)
    from_version: Mapped[int] = mapped_column(Integer)
    from_sha: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # ITEM_STATES
    claimed_by: Mapped[str | None] = mapped_column(String(128), default=None)  # a process id
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)  # the lease
    to_version: Mapped[int | None] = mapped_column(Integer, default=None)  # the new version
    error: Mapped[str | None] = mapped_column(Text, default=None)  # why failed or skipped
