"""Fresh, empty test databases: SQLite files, or PostgreSQL schemas dropped at the end."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import Engine, make_url, text

from service.store.session import connect

BACKENDS = ["sqlite", "postgresql"]


class Databases:
    """Fresh empty databases: a SQLite file, or a PostgreSQL schema dropped at the end."""

    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        self.tmp = tmp
        self.schemas: list[tuple[Engine, str]] = []

    def sqlite(self) -> str:
        return f"sqlite:///{self.tmp.mktemp('sqlite') / 'fastadapt.db'}"

    def postgresql(self, server: str) -> str:
        schema = f"fastadapt_test_{uuid.uuid4().hex[:12]}"
        admin = connect(server)
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        self.schemas.append((admin, schema))
        url = make_url(server).update_query_dict({"options": f"-csearch_path={schema}"})
        return url.render_as_string(hide_password=False)

    def new(self, backend: str, request: pytest.FixtureRequest) -> str:
        if backend == "sqlite":
            return self.sqlite()
        return self.postgresql(request.getfixturevalue("postgres_url"))

    def drop_all(self) -> None:
        for admin, schema in self.schemas:
            with admin.begin() as connection:
                connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()
