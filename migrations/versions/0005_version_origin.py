"""How each client version was made: ``origin`` and the ``source_version`` it started from.

Existing versions were all plain adaptations (readaptations were not told apart), so
they are backfilled ``origin = 'adapt'`` by the column's server default.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "client_versions",
        sa.Column("origin", sa.String(16), server_default="adapt", nullable=False),
    )
    op.add_column("client_versions", sa.Column("source_version", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("client_versions", "source_version")
    op.drop_column("client_versions", "origin")
