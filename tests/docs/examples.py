"""Running the docs' examples as a reader would, and checking what they show.

A shell block (``sh``, ``bash``) runs in bash (``set -euo pipefail``) in the page's own
folder, with the project's ``fastadapt`` and ``python3`` first on ``PATH`` and the
settings of the page's server (its SQLite database). ``curl`` is a function that records
each call's status: every call must answer below 400 unless the command shows its status
(``# -> 422 {...}``). A command followed by a ``# ->`` comment (on its last line, or on the
lines after it) must print what the comment shows (``tests.docs.shown``).

A Python block runs in the page's namespace (a later block sees an earlier one's names),
in the page's folder; an expression statement followed by a ``# ->`` comment must
evaluate to what the comment shows.

In both, ``localhost:8000`` and ``127.0.0.1:8000`` become the server's address.
"""

from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import threading
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.docs.shown import Shown, balanced, check, parse

DOCS_PORT = re.compile(r"\b(localhost|127\.0\.0\.1):8000\b")


def at_port(text: str, port: int) -> str:
    return DOCS_PORT.sub(lambda m: f"{m.group(1)}:{port}", text)


# -- shell ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    first: int  # its first line in the block, 0-based
    last: int  # its last line
    shown: str | None  # the content of its ``# ->`` comment


def commands(script: str) -> list[Command]:
    """The block's commands (a line, with the lines an open quote or parenthesis, a
    trailing backslash, ``|``, ``&&`` or ``||`` carry on), each with the output it shows.
    Comment-only lines are not commands."""
    lines = script.splitlines()
    found: list[Command] = []
    i = 0
    while i < len(lines):
        if not lines[i].strip() or lines[i].lstrip().startswith("#"):
            i += 1
            continue
        first, state = i, _Shell()
        while True:
            comment = state.scan(lines[i])
            if not state.open:
                break
            if i + 1 == len(lines):
                raise ValueError(f"line {i + 1}: a quote or a line continuation is not closed")
            i += 1
        shown = None
        if comment is not None and lines[i][comment:].startswith("# ->"):
            shown = lines[i][comment + 4 :]
        last, i = i, i + 1
        if shown is None and i < len(lines) and lines[i].lstrip().startswith("# ->"):
            shown, i = lines[i].lstrip()[4:], i + 1
        while shown is not None and not balanced(shown) and i < len(lines):
            if not lines[i].lstrip().startswith("#"):
                raise ValueError(f"line {i + 1}: a shown output's brackets are not closed")
            shown, i = shown + "\n" + lines[i].lstrip()[1:], i + 1
        found.append(Command(first, last, shown))
    return found


@dataclass
class _Shell:
    """Bash's quoting, line by line: what is still open after the lines read so far."""

    quote: str | None = None
    depth: int = 0  # parentheses open: $( ... ), ( ... )
    carried: bool = False  # a trailing backslash or operator carries the command on

    @property
    def open(self) -> bool:
        return self.quote is not None or self.depth > 0 or self.carried

    def scan(self, line: str) -> int | None:
        """Read ``line``; where its comment starts, if it has one."""
        self.carried, code_end, comment = False, len(line), None
        i = 0
        while i < len(line):
            c = line[i]
            if self.quote == "'":
                self.quote = None if c == "'" else self.quote
            elif c == "\\":
                self.carried = i + 1 == len(line)
                i += 1
            elif self.quote == '"':
                if c == '"':
                    self.quote = None
                elif c == "(" and line[i - 1 : i] == "$":
                    self.depth += 1
                elif c == ")" and self.depth > 0:
                    self.depth -= 1
            elif c in "'\"":
                self.quote = c
            elif c == "#" and (i == 0 or line[i - 1].isspace()):
                code_end, comment = i, i
                break
            elif c in "()":
                self.depth += 1 if c == "(" else -1
            i += 1
        if self.quote is None and line[:code_end].rstrip().endswith(("|", "&&")):
            self.carried = True
        return comment


# The function every curl of a block goes through (the file ``calls`` counts them), and
# the marks around a command that shows its output.
PREAMBLE = r"""set -euo pipefail
set -a  # every variable a block sets is kept for the page's next blocks
trap 'env -0 > "$FA_DOCS/env"' EXIT
curl() {
  local n
  echo >> "$FA_DOCS/calls"
  n=$(wc -l < "$FA_DOCS/calls")
  command curl -sS -D "$FA_DOCS/call-$n.head" "$@" > "$FA_DOCS/call-$n.out" || return $?
  cat "$FA_DOCS/call-$n.out"
}
__fa_mark() { wc -l < "$FA_DOCS/calls" > "$FA_DOCS/$1"; }
"""


def instrumented(script: str, found: list[Command]) -> str:
    """The block with each command that shows its output marked (the calls it made) and
    its standard output kept in ``out-K`` as well as printed."""
    lines = script.splitlines()
    out = [PREAMBLE]
    done = 0
    for k, command in enumerate(found):
        if command.shown is None:
            continue
        out.extend(lines[done : command.first])
        out.append(f"__fa_mark before-{k}")
        out.append("{ " + lines[command.first])
        out.extend(lines[command.first + 1 : command.last + 1])
        out.append(f'}} > "$FA_DOCS/out-{k}"; cat "$FA_DOCS/out-{k}"; __fa_mark after-{k}')
        done = command.last + 1
    out.extend(lines[done:])
    return "\n".join(out) + "\n"


@dataclass
class Call:
    status: int | None
    output: str


NOT_KEPT = {"_", "SHLVL", "PWD", "OLDPWD", "FA_DOCS"}


def run_shell(
    script: str,
    *,
    cwd: Path,
    env: dict[str, str],
    marks: Path,
    timeout: float,
    keep: dict[str, str] | None = None,
    offset: int = 0,
) -> list[str]:
    """Run ``script``; what went wrong, one line each (empty: it ran as shown), its lines
    numbered from ``offset`` + 1. The variables it sets are put in ``keep`` (for the
    page's next blocks, as a reader's shell keeps them)."""
    found = commands(script)
    marks.mkdir(parents=True, exist_ok=True)
    (marks / "calls").write_text("")
    done = subprocess.run(
        ["bash", "-c", instrumented(script, found)],
        cwd=cwd,
        env=env | {"FA_DOCS": str(marks)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if keep is not None and (marks / "env").exists():
        pairs = (item.partition("=") for item in (marks / "env").read_text().split("\0") if item)
        keep.update(
            (name, value)
            for name, _, value in pairs
            if env.get(name) != value and name not in NOT_KEPT and not name.startswith("BASH")
        )
    if done.returncode != 0:
        return [f"exit status {done.returncode}", *_tail(done.stdout, done.stderr)]
    calls = _calls(marks)
    problems: list[str] = []
    checked: set[int] = set()
    lines = script.splitlines()
    for k, command in enumerate(found):
        if command.shown is None:
            continue
        where = f"line {offset + command.last + 1} ({lines[command.first].strip()[:60]})"
        made = range(_mark(marks, f"before-{k}"), _mark(marks, f"after-{k}"))
        shown = parse(command.shown, http=len(made) > 0)
        output = (marks / f"out-{k}").read_text()
        if made:
            last = calls[made[-1]]
            checked.add(made[-1])
            if shown.status is not None and last.status != shown.status:
                problems.append(f"{where}: shown status {shown.status}, got {last.status}")
            elif shown.status is None and not _ok(last.status):
                problems.append(f"{where}: status {last.status}: {last.output[:300]}")
        problems += [f"{where}: {p}" for p in check(shown, output=output)]
    for n, call in enumerate(calls):
        if call.status is None:
            problems.append(
                f"curl call {n + 1}: no status recorded (the test dumps the headers "
                "with -D: show them with -i instead)"
            )
        elif n not in checked and not _ok(call.status):
            problems.append(f"curl call {n + 1} answered {call.status}: {call.output[:300]}")
    return problems + (_tail(done.stdout, done.stderr) if problems else [])


def _ok(status: int | None) -> bool:
    return status is not None and status < 400


def _calls(marks: Path) -> list[Call]:
    count = len((marks / "calls").read_text().splitlines())
    calls = []
    for n in range(1, count + 1):
        head = marks / f"call-{n}.head"
        codes = re.findall(r"^HTTP/\S+ (\d{3})", head.read_text(), re.M) if head.exists() else []
        out = marks / f"call-{n}.out"
        calls.append(
            Call(int(codes[-1]) if codes else None, out.read_text() if out.exists() else "")
        )
    return calls


def _mark(marks: Path, name: str) -> int:
    return int((marks / name).read_text().strip())


def _tail(stdout: str, stderr: str, chars: int = 3000) -> list[str]:
    return [f"stdout: {stdout[-chars:]}", f"stderr: {stderr[-chars:]}"]


# -- Python --------------------------------------------------------------------------------------
SHOWN_NAME = "__docs_shown__"
WORKING_FOLDER = threading.Lock()  # a process has one: Python examples take turns


@dataclass
class Expressions:
    """The ``# ->`` comments of a Python block by the line of the statement they follow,
    and the differences found while it runs."""

    shown: dict[int, Shown]
    problems: list[str] = field(default_factory=list)

    def __call__(self, value: Any, line: int) -> Any:
        self.problems += [f"line {line}: {p}" for p in check(self.shown[line], value=value)]
        return value


def python_shown(source: str) -> dict[int, str]:
    """{line of the statement: the ``# ->`` comment after it} (lines are 1-based): a
    trailing comment, or comment lines right below the statement."""
    lines = source.splitlines()
    found: dict[int, str] = {}
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    comments = {t.start[0]: t for t in tokens if t.type == tokenize.COMMENT}
    consumed: set[int] = set()
    for row in sorted(comments):
        token = comments[row]
        if row in consumed or not token.string.startswith("# ->"):
            continue
        target = row
        if not lines[row - 1][: token.start[1]].strip():  # on a line of its own
            target -= 1
            while target > 0 and _not_code(lines[target - 1]):
                target -= 1
        text, nxt = token.string[4:], row + 1
        while not balanced(text) and nxt in comments and nxt - 1 < len(lines):
            if lines[nxt - 1].strip() != comments[nxt].string:
                break  # a comment after code: not a continuation
            text, nxt = text + "\n" + comments[nxt].string[1:], nxt + 1
            consumed.add(nxt - 1)
        found[target] = text
    return found


def _not_code(line: str) -> bool:
    return not line.strip() or line.lstrip().startswith("#")


class _Wrap(ast.NodeTransformer):
    def __init__(self, lines: set[int]) -> None:
        self.lines = lines
        self.wrapped: set[int] = set()

    def visit_Expr(self, node: ast.Expr) -> ast.Expr:
        assert node.end_lineno is not None
        if node.end_lineno in self.lines:
            self.wrapped.add(node.end_lineno)
            call = ast.Call(
                func=ast.Name(SHOWN_NAME, ast.Load()),
                args=[node.value, ast.Constant(node.end_lineno)],
                keywords=[],
            )
            return ast.copy_location(ast.Expr(ast.copy_location(call, node.value)), node)
        return node


def run_python(
    source: str, *, namespace: dict[str, Any], cwd: Path, filename: str, offset: int = 0
) -> list[str]:
    """Run ``source`` in ``namespace`` with ``cwd`` as the working folder; what went
    wrong, one line each, its lines numbered from ``offset`` + 1 (so are an exception's,
    which propagates)."""
    texts = {offset + line: text for line, text in python_shown(source).items()}
    expressions = Expressions({line: parse(text) for line, text in texts.items()})
    wrap = _Wrap(set(texts))
    tree = ast.increment_lineno(ast.parse(source, filename), offset)
    tree = ast.fix_missing_locations(wrap.visit(tree))
    problems = [
        f"line {line}: a shown output after something that is not an expression"
        for line in sorted(set(texts) - wrap.wrapped)
    ]
    namespace[SHOWN_NAME] = expressions
    with WORKING_FOLDER:
        before = Path.cwd()
        os.chdir(cwd)
        try:
            exec(compile(tree, filename, "exec"), namespace)
        finally:
            os.chdir(before)
    return problems + expressions.problems
