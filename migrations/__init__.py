"""Alembic migrations: the only thing that creates or changes the database schema.

Run them with ``fastadapt migrate`` (any working directory); new revisions with
``alembic -c migrations/alembic.ini revision -m "..."`` from the repository root.
"""
