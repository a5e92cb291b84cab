"""`fastadapt keys create|list|revoke` on the configured database (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from service import cli, usecases
from service.errors import Unauthorized
from service.store.session import connect, session_factory
from tests.service.store_fixtures import BACKENDS

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture(params=BACKENDS)
def database(
    request: pytest.FixtureRequest,
    fresh_database: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> str:
    url = fresh_database(request.param)
    monkeypatch.setenv("FASTADAPT_DATABASE_URL", url)
    return url


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    def call(*argv: str) -> tuple[int, str, str]:
        code = cli.main(["keys", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return call


def tenant_of(url: str, token: str) -> str:
    database = connect(url)
    try:
        with session_factory(database)() as session:
            principal = usecases.keys.authenticate(session=session, token=token)
            return f"{principal.tenant_id}/{principal.scope}"
    finally:
        database.dispose()


def test_create_prints_the_key_once_alone_on_the_last_line(database: str, run: Run) -> None:
    code, out, _ = run("create", "--tenant", "acme")
    assert code == 0
    token = out.splitlines()[-1]
    assert token.startswith("fa_") and token == token.strip() and out.count(token) == 1
    assert tenant_of(database, token) == "acme/client"
    code, out, _ = run("create", "--tenant", "acme", "--scope", "admin")
    assert code == 0 and tenant_of(database, out.splitlines()[-1]) == "acme/admin"


def test_list_shows_ids_tenants_and_scopes_never_keys(database: str, run: Run) -> None:
    tokens = [run("create", "--tenant", t)[1].splitlines()[-1] for t in ("acme", "globex")]
    code, out, _ = run("list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["id", "tenant", "scope", "created", "revoked"]
    assert [line.split()[1] for line in lines[1:]] == ["acme", "globex"]
    assert all(line.split()[0].startswith("key_") for line in lines[1:])
    assert not any(token in out or token[3:20] in out for token in tokens)
    code, out, _ = run("list", "--tenant", "globex")
    assert code == 0 and [line.split()[1] for line in out.splitlines()[1:]] == ["globex"]


def test_revoke(database: str, run: Run) -> None:
    token = run("create", "--tenant", "acme")[1].splitlines()[-1]
    key_id = run("list")[1].splitlines()[1].split()[0]
    code, out, _ = run("revoke", key_id)
    assert code == 0 and key_id in out
    with pytest.raises(Unauthorized):
        tenant_of(database, token)
    revoked = run("list")[1].splitlines()[1].split()
    assert revoked[0] == key_id and revoked[4] != "-"
    assert run("revoke", key_id)[0] == 0  # again: nothing changes


def test_mistakes_are_named(database: str, run: Run) -> None:
    code, _, err = run("revoke", "key_0000000000000000")
    assert code == 1 and "unknown key 'key_0000000000000000'" in err
    code, _, err = run("create", "--tenant", "Not A Tenant")
    assert code == 1 and "tenant: " in err
    with pytest.raises(SystemExit) as exit_:
        run("create", "--tenant", "acme", "--scope", "root")
    assert exit_.value.code == 2
