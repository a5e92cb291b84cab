"""Every relative link and ``#anchor`` in the docs resolves, by GitHub's rules: a path
relative to the page names a file or folder of the repository, and a fragment names a
heading (or an HTML ``id``) of the page it points into."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tests.docs.markdown import REPO, anchors, links, pages, slugify

EXTERNAL = ("http", "https", "mailto")


def broken(page: Path, root: Path = REPO) -> list[str]:
    """What is wrong with ``page``'s links (a path relative to ``root``), one line each."""
    problems = []
    for line, target in links(root / page):
        parts = urlsplit(target)
        if parts.scheme in EXTERNAL or parts.netloc:
            continue
        where = f"{page}:{line}: {target}"
        path = (root / page).parent / unquote(parts.path) if parts.path else root / page
        resolved = path.resolve()
        if not resolved.is_relative_to(root):
            problems.append(f"{where}: outside the repository")
        elif not resolved.exists():
            problems.append(f"{where}: no such file")
        elif (
            parts.fragment
            and resolved.suffix == ".md"
            and unquote(parts.fragment) not in anchors(resolved)
        ):
            problems.append(f"{where}: no heading has this anchor")
    return problems


@pytest.mark.parametrize("page", pages(), ids=str)
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    assert broken(page) == []


def test_pages_are_found() -> None:
    found = [str(p) for p in pages()]
    assert found[0] == "README.md" and found[-1] == "clients/python/README.md"
    assert all((REPO / p).is_file() for p in found)


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Keys and tenants", "keys-and-tenants"),
        ("omniglot (shipped)", "omniglot-shipped"),
        ("tabular: bring your own task distribution", "tabular-bring-your-own-task-distribution"),
        ("`FASTADAPT_AUTH` and *keys*", "fastadapt_auth-and-keys"),
        ("Errors, retries — and bulk", "errors-retries--and-bulk"),
        ("[The API](docs/api.md) in 5 minutes", "the-api-in-5-minutes"),
        ("2b. fastadapt against the HTTP ceiling", "2b-fastadapt-against-the-http-ceiling"),
    ],
)
def test_anchors_follow_githubs_rule(heading: str, anchor: str) -> None:
    assert slugify(heading) == anchor


def test_a_repeated_heading_gets_a_numbered_anchor(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Setup\n\n```sh\n# Not a heading\n```\n\n## Setup\n\n### Setup\n")
    assert anchors(page) == {"setup", "setup-1", "setup-2"}


def test_a_broken_link_or_anchor_is_reported(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "api.md").write_text("# The API\n\n## Safe retries\n")
    (tmp_path / "README.md").write_text(
        "# Front\n\n"
        "[ok](docs/api.md#safe-retries) [ok](#front) [ok](docs) [web](https://example.com/x#y)\n"
        "[gone](docs/nope.md) [no anchor](docs/api.md#retries) [here](#nowhere)\n"
        "`[in code](nope.md)`\n\n```sh\necho '[in a block](nope.md)'\n```\n"
        "[up](../../etc/passwd)\n"
    )
    assert broken(Path("README.md"), root=tmp_path) == [
        "README.md:4: docs/nope.md: no such file",
        "README.md:4: docs/api.md#retries: no heading has this anchor",
        "README.md:4: #nowhere: no heading has this anchor",
        "README.md:10: ../../etc/passwd: outside the repository",
    ]
