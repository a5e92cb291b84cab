"""Every shell and Python example of the docs runs, as written, against a real server.

Each page (README.md, docs/*.md, clients/python/README.md) gets its own ``fastadapt
serve``, with the settings ``make serve`` has but a fresh SQLite database and a free
port, and its own working folder; its examples run in order, as a reader runs them, so
an example may use what an earlier one on the page made (``tests.docs.examples`` says
how each kind runs and how shown outputs are checked). Pages share nothing, so two run
at a time; each example's test reports its own outcome.

A block that cannot run here (Docker, a benchmark, hours of training) is preceded by
``<!-- not-run: why -->``: it is reported as skipped, with its reason. Output examples
are ``text`` or ``json`` blocks. The files an example calls the reader's own (images)
are drawn in each page's folder beforehand (``stand_ins``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.client.test_live import png
from tests.docs.examples import at_port, run_python, run_shell
from tests.docs.markdown import Block, blocks, pages
from tests.live import Replica, clean_env

SHELL = {"sh", "bash"}
PYTHON = {"python"}
SHOWN = {"text", "json"}  # outputs, formats and listings: never run
BLOCKS = [block for page in pages() for block in blocks(page)]
EXAMPLES = [block for block in BLOCKS if block.language in SHELL | PYTHON]
SHELL_TIMEOUT_S = 300.0  # the longest block trains a small meta-model (~15 s when quiet)
PARALLEL_PAGES = 2


def stand_ins(folder: Path) -> None:
    """The images the examples call the reader's own: one-stroke characters (a horizontal
    bar for a1 and a2, a vertical one for b1, b2 and the query, a diagonal for c1)."""
    for names, kind in ((("a1", "a2"), "h"), (("b1", "b2", "query"), "v"), (("c1",), "d")):
        for name in names:
            (folder / f"{name}.png").write_bytes(png(kind))


Outcome = list[str] | BaseException  # what went wrong in an example, or what it raised


class Page:
    """One page's server, folder and Python namespace, and its examples run in order."""

    def __init__(self, page: Path, tmp: Path) -> None:
        self.page = page
        self.folder = tmp / "work"
        self.folder.mkdir(parents=True)
        stand_ins(self.folder)
        self.settings = clean_env(data_dir=tmp / "data", threads="1")
        self.server = Replica(str(page), self.settings, tmp / "server.log")
        self.namespace: dict[str, Any] = {"__name__": "__docs__"}
        self.marks = tmp / "marks"
        self.shell_variables: dict[str, str] = {}  # what the page's blocks set so far

    def run_all(self) -> dict[int, Outcome]:
        """Every example of the page that is not marked not-run, in order: {line: what
        went wrong, or the exception it raised}."""
        examples = [b for b in blocks(self.page) if b in EXAMPLES and b.not_run is None]
        outcomes: dict[int, Outcome] = {}
        try:
            self.server.start().wait_ready()
        except BaseException as exc:  # the page's examples cannot run: each says why
            self.server.kill()
            return dict.fromkeys((b.line for b in examples), exc)
        try:
            for n, block in enumerate(examples):
                try:
                    outcomes[block.line] = self.run(block, n)
                except Exception as exc:
                    outcomes[block.line] = exc
        finally:
            code = self.server.terminate()
        if code != 0 and examples:
            last = outcomes[examples[-1].line]
            if isinstance(last, list):
                last.append(f"the page's server exited {code}: {self.server.tail()}")
        return outcomes

    def run(self, block: Block, n: int) -> list[str]:
        code = at_port(block.text, self.server.port)
        if block.language in PYTHON:
            return run_python(
                code,
                namespace=self.namespace,
                cwd=self.folder,
                filename=str(block.page),
                offset=block.line,
            )
        venv_bin = str(Path(sys.executable).parent)
        path = {"PATH": f"{venv_bin}:{self.settings.get('PATH', '')}"}
        return run_shell(
            code,
            cwd=self.folder,
            env=self.settings | self.shell_variables | path,
            marks=self.marks / str(n),
            timeout=SHELL_TIMEOUT_S,
            keep=self.shell_variables,
            offset=block.line,
        )


class Pages:
    """The pages whose examples were selected, each run whole (a later example may need
    an earlier one), ``PARALLEL_PAGES`` at a time: pages share nothing, and most of a
    page's time is a server starting, a command line importing torch, or a wait."""

    def __init__(self, pages: list[Path], tmp: pytest.TempPathFactory) -> None:
        self.pool = ThreadPoolExecutor(PARALLEL_PAGES, thread_name_prefix="docs")
        self.runs = {
            page: self.pool.submit(Page(page, tmp.mktemp("docs")).run_all) for page in pages
        }

    def outcome(self, block: Block) -> list[str]:
        outcome = self.runs[block.page].result()[block.line]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def docs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pages]:
    """The pages of the examples this session runs (all of a page's examples run, the
    selected ones or not), started together when the first example needs them."""
    selected = {
        item.callspec.params["block"].page
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_example_runs_as_written"
        and item.callspec.params["block"].not_run is None
    }
    running = Pages([page for page in pages() if page in selected], tmp_path_factory)
    try:
        yield running
    finally:
        running.close()


@pytest.mark.parametrize("block", EXAMPLES, ids=lambda block: block.where)
def test_example_runs_as_written(block: Block, docs: Pages) -> None:
    if block.not_run is not None:
        pytest.skip(f"{block.where} is not run: {block.not_run}")
    problems = docs.outcome(block)
    assert not problems, f"{block.where}:\n" + "\n".join(problems)


def test_every_block_is_an_example_or_an_output() -> None:
    unknown = [
        f"{b.where}: {b.language or 'no language'}"
        for b in BLOCKS
        if b.language not in SHELL | PYTHON | SHOWN
    ]
    assert unknown == [], "name each block's language: sh, python, text or json"


def test_every_block_not_run_says_why() -> None:
    marked = [b for b in BLOCKS if b.not_run is not None]
    assert [b.where for b in marked if not b.not_run] == []
    assert [b.where for b in marked if b.language not in SHELL | PYTHON] == []
