"""Out of scope: a version's ``out_of_scope_threshold`` (text meta-models), the in-scope
score below which its predictions answer no label.

Existing versions have none (null): their predictions use the meta-model's default.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("client_versions", sa.Column("out_of_scope_threshold", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("client_versions", "out_of_scope_threshold")
