"""Version identity and safe retries: every client version gets a ``uid`` that is never
reused (existing versions get fresh random ones), and the ``Idempotency-Key`` (with the
request's hash) of the request that made it, unique per tenant.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BACKFILL_BATCH = 1000


def upgrade() -> None:
    op.add_column("client_versions", sa.Column("uid", sa.String(32), nullable=True))
    op.add_column("client_versions", sa.Column("idempotency_key", sa.String(255), nullable=True))
    op.add_column("client_versions", sa.Column("request_hash", sa.String(64), nullable=True))
    _backfill_uids()
    with op.batch_alter_table("client_versions") as batch:  # SQLite rebuilds the table
        batch.alter_column("uid", existing_type=sa.String(32), nullable=False)
        batch.create_unique_constraint(batch.f("uq_client_versions_uid"), ["uid"])
        batch.create_unique_constraint(
            batch.f("uq_client_versions_tenant_id"), ["tenant_id", "idempotency_key"]
        )


def _backfill_uids() -> None:
    """A fresh random uid for every existing version, in batches of primary keys."""
    connection = op.get_bind()
    versions = sa.table(
        "client_versions",
        sa.column("tenant_id", sa.String),
        sa.column("client_id", sa.String),
        sa.column("version", sa.Integer),
        sa.column("uid", sa.String),
    )
    update = (
        versions.update()
        .where(
            versions.c.tenant_id == sa.bindparam("t"),
            versions.c.client_id == sa.bindparam("c"),
            versions.c.version == sa.bindparam("v"),
        )
        .values(uid=sa.bindparam("u"))
    )
    pending = sa.select(versions.c.tenant_id, versions.c.client_id, versions.c.version).where(
        versions.c.uid.is_(None)
    )
    while True:
        keys = connection.execute(pending.limit(BACKFILL_BATCH)).all()
        if not keys:
            return
        connection.execute(
            update, [{"t": t, "c": c, "v": v, "u": uuid.uuid4().hex} for t, c, v in keys]
        )


def downgrade() -> None:
    with op.batch_alter_table("client_versions") as batch:
        batch.drop_constraint(batch.f("uq_client_versions_tenant_id"), type_="unique")
        batch.drop_constraint(batch.f("uq_client_versions_uid"), type_="unique")
        batch.drop_column("request_hash")
        batch.drop_column("idempotency_key")
        batch.drop_column("uid")
