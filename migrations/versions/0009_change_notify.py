"""PostgreSQL: a notification on every change to clients and their versions.

Statement-level triggers on ``clients`` and ``client_versions`` notify the channel
``fastadapt_changes`` (service/store/rowcache.py), which every replica listens on to keep
what predictions read of a version only until it changes. A notification is sent at
commit, once per channel and payload per transaction, whoever writes (fastadapt or not).
SQLite needs nothing: its ``PRAGMA data_version`` counts commits itself.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("clients", "client_versions")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE FUNCTION fastadapt_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('fastadapt_changes', '');
            RETURN NULL;
        END
        $$
        """
    )
    for table in TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_notify_change "
            f"AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION fastadapt_notify_change()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(f"DROP TRIGGER {table}_notify_change ON {table}")
    op.execute("DROP FUNCTION fastadapt_notify_change()")
