"""The user docs as data: their pages, fenced code blocks, links and anchors.

- ``PAGES``: the Markdown files the docs tests read (README.md, docs/*.md, the client
  library's README), as paths relative to the repository root.
- ``blocks(page)``: every fenced code block with its line, language and text, and the
  reason it is not run when an HTML comment ``<!-- not-run: reason -->`` stands on the
  line just before its fence.
- ``links(page)``: every link and image target outside code, with its line.
- ``anchors(page)``: the ``#fragment`` each heading gets on GitHub (and any ``id=``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def pages() -> list[Path]:
    """The pages, relative to ``REPO``: the front page, the guide, the client library's."""
    guide = sorted(p.relative_to(REPO) for p in (REPO / "docs").glob("*.md"))
    return [Path("README.md"), *guide, Path("clients/python/README.md")]


FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:(?P<reason>.*?)-->\s*$")


@dataclass(frozen=True)
class Block:
    page: Path  # relative to REPO
    line: int  # of the opening fence, 1-based
    end: int  # of the closing fence
    language: str  # the info string's first word ("" when there is none)
    text: str  # the code, indentation of the fence removed
    not_run: str | None  # the reason, when the block is marked not to be run

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


@cache
def read(page: Path) -> str:
    return (REPO / page).read_text(encoding="utf-8")


@cache
def blocks(page: Path) -> tuple[Block, ...]:
    lines = read(page).splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not _closes(lines[j], fence):
            line = lines[j]
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
            j += 1
        marker = NOT_RUN.match(lines[i - 1]) if i > 0 else None
        info = opening["info"].strip().split()
        found.append(
            Block(
                page=page,
                line=i + 1,
                end=j + 1,
                language=info[0].lower() if info else "",
                text="\n".join(body) + "\n",
                not_run=marker["reason"].strip() if marker else None,
            )
        )
        i = j + 1
    return tuple(found)


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0])


def prose(page: Path) -> list[tuple[int, str]]:
    """The page's lines outside fenced code, numbered from 1, inline code blanked out."""
    inside: set[int] = set()
    for block in blocks(page):
        inside.update(range(block.line, block.end + 1))
    return [
        (n, _blank_code(line))
        for n, line in enumerate(read(page).splitlines(), start=1)
        if n not in inside
    ]


def _blank_code(line: str) -> str:
    return re.sub(r"(`+)(.+?)\1", lambda m: " " * len(m.group(0)), line)


# -- links and anchors ---------------------------------------------------------------------------
INLINE = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?(?P<target>[^)\s>]+)>?(?:\s+\"[^\"]*\")?\)"
)
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(?P<target>\S+?)>?(?:\s+.*)?$")
HTML_TARGET = re.compile(r"<(?:a|img)\b[^>]*\b(?:href|src)=\"(?P<target>[^\"]+)\"", re.IGNORECASE)


def links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown or HTML link and image outside code."""
    found: list[tuple[int, str]] = []
    for n, line in prose(page):
        for pattern in (INLINE, REFERENCE, HTML_TARGET):
            found.extend((n, m["target"]) for m in pattern.finditer(line))
    return found


HEADING = re.compile(r"^\s{0,3}(?P<level>#{1,6})\s+(?P<text>.*?)\s*#*\s*$")
HTML_ID = re.compile(r"<[a-z]+\b[^>]*\b(?:id|name)=\"(?P<id>[^\"]+)\"", re.IGNORECASE)


@cache
def anchors(page: Path) -> frozenset[str]:
    """The fragments GitHub renders for the page: one per heading (the second of a name
    gets ``-1``, the third ``-2``...), plus any HTML ``id``/``name``."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in prose_with_code(page):
        heading = HEADING.match(line)
        if heading:
            slug = slugify(heading["text"])
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
        found.update(m["id"] for m in HTML_ID.finditer(line))
    return frozenset(found)


def prose_with_code(page: Path) -> list[tuple[int, str]]:
    """The lines outside fenced code, inline code kept (headings keep its text)."""
    outside = {n for n, _ in prose(page)}
    return [(n, line) for n, line in enumerate(read(page).splitlines(), 1) if n in outside]


def slugify(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text (markup, links' targets and HTML
    dropped), lower-cased, every character but letters, digits, ``_``, ``-`` and spaces
    removed, then each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags
    text = text.replace("`", "")
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)  # emphasis, not snake_case
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")
