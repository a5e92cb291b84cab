"""Outputs shown in the docs, checked in shape.

An example shows what a command or expression gives in a comment that starts with
``# ->``: an HTTP status, a JSON or Python value, or text, with ``...`` for what may vary.
``check(shown, actual)`` compares; its rules:

- a number shown as a float stands for any number (floats are never compared); an
  integer or a boolean must be equal (a version, a count, a status);
- a string must be equal, except that ``...`` inside it stands for any characters
  (``"9f3c..."``: any string starting ``9f3c``);
- ``...`` as a value stands for any value; as a member of an object (``{"a": 1, ...}``)
  it allows members not shown; as the last item of a list (``[1.0, ...]``) it allows
  more items, so ``[...]`` is any list. Without it an object has exactly the members
  shown and a list exactly the items shown;
- a number written ``0.079...`` is a float;
- what parses as neither JSON nor Python is text: equal to the output with runs of
  spaces made one, ``...`` standing for any characters.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any

STATUS = re.compile(r"^(?P<status>[1-5]\d\d)(?:\s+(?P<rest>.*))?$", re.DOTALL)
WORDS = {"true": "True", "false": "False", "null": "None"}


@dataclass(frozen=True)
class Shown:
    status: int | None  # for an HTTP call: the status it answers
    value: Any  # the parsed value (Ellipsis for "anything"), or None with ``text``
    text: str | None  # when the output is shown as text

    @property
    def anything(self) -> bool:
        return self.text is None and self.value is ...


def parse(sketch: str, *, http: bool = False) -> Shown:
    """A ``# ->`` comment's content (``http``: it may start with a status code)."""
    sketch = sketch.strip()
    status = None
    if http:
        head = STATUS.match(sketch)
        if head:
            status, sketch = int(head["status"]), (head["rest"] or "...").strip()
    try:
        return Shown(status, ast.literal_eval(_as_python(sketch)), None)
    except (SyntaxError, ValueError):
        return Shown(status, None, sketch)


def _as_python(sketch: str) -> str:
    """JSON words as Python's, ``...`` as an object's member as ``...: ...``, and numbers
    written with a trailing ``...`` as plain numbers; strings untouched."""
    out: list[str] = []
    stack: list[str] = []
    i = 0
    while i < len(sketch):
        c = sketch[i]
        if c in "\"'":
            end = _string_end(sketch, i)
            out.append(sketch[i:end])
            i = end
            continue
        if sketch.startswith("...", i):
            previous = "".join(out).rstrip()[-1:]
            if previous.isdigit():
                i += 3  # 0.079... is a float
                continue
            key_expected = stack[-1:] == ["{"] and previous in ("{", ",")
            out.append("...: ..." if key_expected else "...")
            i += 3
            continue
        word = re.match(r"[A-Za-z_]+", sketch[i:])
        if word:
            out.append(WORDS.get(word.group(0), word.group(0)))
            i += len(word.group(0))
            continue
        if c in "{[(":
            stack.append(c)
        elif c in "}])" and stack:
            stack.pop()
        out.append(c)
        i += 1
    return "".join(out)


def _string_end(text: str, start: int) -> int:
    quote, i = text[start], start + 1
    while i < len(text) and text[i] != quote:
        i += 2 if text[i] == "\\" else 1
    return i + 1


def balanced(sketch: str) -> bool:
    """Whether every bracket opened in ``sketch`` (outside strings) is closed."""
    depth, i = 0, 0
    while i < len(sketch):
        if sketch[i] in "\"'" and _quoted(sketch, i):
            i = _string_end(sketch, i)
            continue
        depth += sketch[i] in "{[("
        depth -= sketch[i] in "}])"
        i += 1
    return depth <= 0


def _quoted(text: str, i: int) -> bool:
    """A quote that opens a string (an apostrophe inside a word does not)."""
    return text[i] == '"' or not (text[i - 1 : i].isalnum() and text[i + 1 : i + 2].isalpha())


def check(shown: Shown, output: str | None = None, value: Any = None) -> list[str]:
    """What differs between ``shown`` and a command's ``output`` (text, parsed here as
    JSON when the shown value is one) or an expression's ``value``: one line each."""
    if shown.text is not None:
        actual = output if output is not None else repr(value)
        return (
            [] if _text_matches(shown.text, actual) else [f"shown {shown.text!r}, got {actual!r}"]
        )
    if shown.value is ...:
        return []
    if output is not None:
        try:
            value, _ = json.JSONDecoder().raw_decode(output.strip())
        except ValueError:
            return [f"shown a value, got output that is not JSON: {output[:300]!r}"]
    return _compare(shown.value, _plain(value), "")


def _text_matches(shown: str, actual: str) -> bool:
    squeeze = lambda s: re.sub(r"\s+", " ", s).strip()  # noqa: E731
    pattern = ".*?".join(re.escape(part) for part in squeeze(shown).split("..."))
    return re.fullmatch(pattern, squeeze(actual), re.DOTALL) is not None


def _plain(value: Any) -> Any:
    """Pydantic models as their JSON data, tuples as lists, recursively."""
    if hasattr(value, "model_dump"):
        return _plain(value.model_dump(mode="json"))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _compare(shown: Any, actual: Any, path: str) -> list[str]:
    at = path or "the value"
    if shown is ...:
        return []
    if isinstance(shown, bool) or shown is None:
        return [] if actual is shown else [f"{at}: shown {shown!r}, got {actual!r}"]
    if isinstance(shown, float):
        number = isinstance(actual, int | float) and not isinstance(actual, bool)
        return [] if number else [f"{at}: shown a number, got {actual!r}"]
    if isinstance(shown, int):
        same = type(actual) is int and actual == shown
        return [] if same else [f"{at}: shown {shown!r}, got {actual!r}"]
    if isinstance(shown, str):
        if not isinstance(actual, str):
            return [f"{at}: shown a string, got {actual!r}"]
        pattern = ".*?".join(re.escape(part) for part in shown.split("..."))
        return (
            []
            if re.fullmatch(pattern, actual, re.DOTALL)
            else [f"{at}: shown {shown!r}, got {actual!r}"]
        )
    if isinstance(shown, dict):
        return _compare_members(shown, actual, path)
    if isinstance(shown, list | tuple):
        return _compare_items(list(shown), actual, path)
    return [f"{at}: cannot compare with {shown!r}"]


def _compare_members(shown: dict[Any, Any], actual: Any, path: str) -> list[str]:
    at = path or "the value"
    if not isinstance(actual, dict):
        return [f"{at}: shown an object, got {actual!r}"]
    problems = [f"{at}: no member {k!r}" for k in shown if k is not ... and k not in actual]
    if ... not in shown:
        problems += [f"{at}: member {k!r} is not shown" for k in actual if k not in shown]
    for key, value in shown.items():
        if key is not ... and key in actual:
            problems += _compare(value, actual[key], f"{path}.{key}" if path else str(key))
    return problems


def _compare_items(shown: list[Any], actual: Any, path: str) -> list[str]:
    at = path or "the value"
    if not isinstance(actual, list):
        return [f"{at}: shown a list, got {actual!r}"]
    more = bool(shown) and shown[-1] is ...
    items = shown[:-1] if more else shown
    if len(actual) < len(items) or (not more and len(actual) != len(items)):
        return [f"{at}: shown {len(items)}{'+' if more else ''} items, got {len(actual)}"]
    problems: list[str] = []
    for i, item in enumerate(items):
        problems += _compare(item, actual[i], f"{path}[{i}]")
    return problems
