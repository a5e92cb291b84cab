"""Meta-model registry: every registered artifact (content-addressed by the sha256 of its
weights) and the version each name has promoted.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "meta_model_versions",
        sa.Column("sha", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("config", sa.Text(), nullable=False),
        sa.Column("weights", sa.LargeBinary(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(512), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha", name=op.f("pk_meta_model_versions")),
    )
    op.create_index(
        op.f("ix_meta_model_versions_name"), "meta_model_versions", ["name"], unique=False
    )
    op.create_table(
        "meta_models",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("promoted_sha", sa.String(64), nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_meta_models")),
    )


def downgrade() -> None:
    op.drop_table("meta_models")
    op.drop_index(op.f("ix_meta_model_versions_name"), table_name="meta_model_versions")
    op.drop_table("meta_model_versions")
