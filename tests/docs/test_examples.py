"""Every shell and Python example of the docs runs, as written, against a real server.

Each page (README.md, docs/*.md, clients/python/README.md) gets its own ``fastadapt
serve``, with the settings ``make serve`` has but a fresh SQLite database and a free
port, and its own working folder; its examples run in order, as a reader runs them, so
an example may use what an earlier one on the page made (``tests.docs.examples`` says
how each kind runs and how shown outputs are checked).

A block that cannot run here (Docker, a benchmark, hours of training) is preceded by
``<!-- not-run: why -->``: it is reported as skipped, with its reason. Output examples
are ``text`` or ``json`` blocks. The files an example calls the reader's own (images)
are drawn in each page's folder beforehand (``stand_ins``).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.docs.examples import at_port, run_python, run_shell
from tests.docs.markdown import Block, blocks, pages
from tests.live import Replica, clean_env

SHELL = {"sh", "bash"}
PYTHON = {"python"}
SHOWN = {"text", "json"}  # outputs, formats and listings: never run
BLOCKS = [block for page in pages() for block in blocks(page)]
EXAMPLES = [block for block in BLOCKS if block.language in SHELL | PYTHON]
SHELL_TIMEOUT_S = 300.0  # the longest block trains a small meta-model (~15 s when quiet)


def stand_ins(folder: Path) -> None:
    """The images the examples call the reader's own: three one-stroke characters (a
    horizontal bar, a vertical one, a diagonal), two drawings of the first two, and a
    query that is another drawing of the vertical bar."""
    strokes = {
        "a1.png": ("h", 0),
        "a2.png": ("h", 4),
        "b1.png": ("v", 0),
        "b2.png": ("v", 4),
        "c1.png": ("d", 0),
        "query.png": ("v", -3),
    }
    for name, (kind, shift) in strokes.items():
        (folder / name).write_bytes(_drawing(kind, shift))


def _drawing(kind: str, shift: int, size: int = 105) -> bytes:
    image = np.full((size, size), 255, dtype=np.uint8)
    middle, third = size // 2 + shift, slice(size // 3 + shift, 2 * size // 3 + shift)
    if kind == "h":
        image[middle - 5 : middle + 5, third] = 0
    elif kind == "v":
        image[third, middle - 5 : middle + 5] = 0
    else:
        for i in range(size // 4, 3 * size // 4):
            image[i, max(i - 5, 0) : i + 5] = 0
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


class Page:
    """One page's server (started at its first example), folder and Python namespace."""

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
        self.ready = False
        self.runs = 0

    def run(self, block: Block) -> list[str]:
        if self.server.process is None:
            self.server.start()
        if not self.ready:
            self.server.wait_ready()
            self.ready = True
        self.runs += 1
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
            marks=self.marks / str(self.runs),
            timeout=SHELL_TIMEOUT_S,
            keep=self.shell_variables,
            offset=block.line,
        )

    def close(self) -> None:
        code = self.server.terminate()
        assert code == 0, self.server.tail()


class Pages:
    """The page whose examples run now. The examples are collected page by page, in
    order: when a page starts, the next page's server starts too (its start-up overlaps
    this page's examples), and the previous page's server stops."""

    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        self.tmp = tmp
        self.current: Page | None = None
        self.upcoming: Page | None = None
        self.order = list(dict.fromkeys(b.page for b in EXAMPLES if b.not_run is None))

    def page(self, page: Path) -> Page:
        if self.current is None or self.current.page != page:
            self.close_current()
            if self.upcoming is not None and self.upcoming.page == page:
                self.current, self.upcoming = self.upcoming, None
            else:
                self.current = self._new(page)
            later = self.order[self.order.index(page) + 1 :] if page in self.order else []
            if later and self.upcoming is None:
                self.upcoming = self._new(later[0])
                self.upcoming.server.start()
        return self.current

    def _new(self, page: Path) -> Page:
        return Page(page, self.tmp.mktemp("docs"))

    def close_current(self) -> None:
        if self.current is not None:
            current, self.current = self.current, None
            current.close()

    def close(self) -> None:
        self.close_current()
        if self.upcoming is not None:
            upcoming, self.upcoming = self.upcoming, None
            upcoming.close()


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pages]:
    running = Pages(tmp_path_factory)
    try:
        yield running
    finally:
        running.close()


@pytest.mark.parametrize("block", EXAMPLES, ids=lambda block: block.where)
def test_example_runs_as_written(block: Block, docs: Pages) -> None:
    if block.not_run is not None:
        pytest.skip(f"{block.where} is not run: {block.not_run}")
    problems = docs.page(block.page).run(block)
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
