"""Guardrails: a version's warnings (what it did outside what its meta-model was trained
for, or a support loss that rose, when settings allowed storing it anyway).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # every existing version: no warnings (it was stored before any guardrail existed)
    op.add_column(
        "client_versions",
        sa.Column("warnings", sa.JSON(), nullable=False, server_default="[]"),
    )


def downgrade() -> None:
    op.drop_column("client_versions", "warnings")
