"""Clients and their immutable adapted versions.

Revision ID: 0001
Revises:
Create Date: 2025-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "clients",
        sa.Column("tenant_id", sa.String(64), server_default="default", nullable=False),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("current_version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "client_id", name=op.f("pk_clients")),
    )
    op.create_table(
        "client_versions",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("meta_model", sa.String(128), nullable=False),
        sa.Column("meta_model_version", sa.String(64), nullable=False),
        sa.Column("params", sa.LargeBinary(), nullable=False),
        sa.Column("support_inputs", sa.Text(), nullable=False),
        sa.Column("support_targets", sa.Text(), nullable=False),
        sa.Column("support_size", sa.Integer(), nullable=False),
        sa.Column("inner_steps", sa.Integer(), nullable=False),
        sa.Column("inner_lr", sa.Float(), nullable=True),
        sa.Column("support_loss_before", sa.Float(), nullable=False),
        sa.Column("support_loss_after", sa.Float(), nullable=False),
        sa.Column("adapt_ms", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id", "client_id"],
            ["clients.tenant_id", "clients.client_id"],
            name=op.f("fk_client_versions_tenant_id_clients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "tenant_id", "client_id", "version", name=op.f("pk_client_versions")
        ),
    )


def downgrade() -> None:
    op.drop_table("client_versions")
    op.drop_table("clients")
