"""containerd's List filters (``filters`` package of containerd 1.6) over snapshot infos.

A filter is selectors joined by commas, all of which must match; a List request carries several
filters, any of which selects a snapshot.  A selector is ``fieldpath``, ``fieldpath==value``,
``fieldpath!=value`` or ``fieldpath~=regexp``; fields are ``kind`` (``active``, ``view``,
``committed``), ``name``, ``parent`` and ``labels.<key>`` (a key with dots or slashes quoted:
``labels."containerd.io/gc.root"``).  A bare fieldpath tests presence.  As in containerd, an
absent field compares as the empty string under ``!=`` and ``~=``.

It owns the parsing and matching only; it never imports the rest of graphdriver but ``errors``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping, Sequence

from ..errors import InvalidArgument

# (fieldpath, operator, value); operator "" = present
Selector = tuple[tuple[str, ...], str, str]
#: what a filter asks of a snapshot: the value of a fieldpath, or None when it has none
Fields = Callable[[tuple[str, ...]], "str | None"]

_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VALUE = re.compile(r"[^\s,]+")
_OPERATORS = ("==", "!=", "~=")


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def fail(self, what: str) -> InvalidArgument:
        return InvalidArgument(f"filters: {what} at {self.pos} in {self.text!r}")

    def quoted(self, alternatives: str = "") -> str | None:
        quote = self.peek()
        if quote not in ('"', "'", *alternatives):
            return None
        end = self.pos + 1
        while end < len(self.text) and self.text[end] != quote:
            end += 2 if self.text[end] == "\\" else 1
        if end >= len(self.text):
            raise self.fail("unterminated quoted string")
        body = self.text[self.pos:end + 1]
        self.pos = end + 1
        if quote in ('"', "'"):
            try:
                value = ast.literal_eval(body)
            except (ValueError, SyntaxError) as exc:
                raise self.fail(f"invalid quoted string {body}") from exc
            return str(value)
        return body[1:-1].replace("\\" + quote, quote)

    def match(self, pattern: re.Pattern[str]) -> str | None:
        self.skip_space()
        m = pattern.match(self.text, self.pos)
        if m is None:
            return None
        self.pos = m.end()
        return m.group()

    def field(self) -> str:
        value = self.quoted()
        if value is None:
            value = self.match(_FIELD)
        if value is None:
            raise self.fail("expected a field or a quoted string")
        return value


def parse(text: str) -> list[Selector]:
    """One filter: its selectors, all of which must match.  Bad syntax is InvalidArgument."""
    scan = _Scanner(text)
    selectors: list[Selector] = []
    while True:
        path = [scan.field()]
        while scan.peek() == ".":
            scan.pos += 1
            path.append(scan.field())
        op = ""
        value = ""
        if scan.peek() not in (",", ""):
            op = scan.text[scan.pos:scan.pos + 2]
            if op not in _OPERATORS:
                raise scan.fail('expected an operator ("==", "!=", "~=")')
            scan.pos += 2
            quoted = scan.quoted("/|" if op == "~=" else "")
            value = quoted if quoted is not None else (scan.match(_VALUE) or "")
            if quoted is None and not value:
                raise scan.fail("expected a value")
            if op == "~=":
                try:
                    re.compile(value)
                except re.error as exc:
                    raise scan.fail(f"invalid regular expression {value!r}: {exc}") from exc
        selectors.append((tuple(path), op, value))
        nxt = scan.peek()
        if nxt == "":
            return selectors
        if nxt != ",":
            raise scan.fail(f"unexpected input {nxt!r}")
        scan.pos += 1


def compile_filters(texts: Sequence[str]) -> Callable[[Fields], bool]:
    """The predicate of a List request: any filter matches (no filter, or an empty one: all)."""
    filters = [parse(t) for t in texts if t != ""]
    if len(filters) < len(texts) or not filters:
        return lambda fields: True

    def match(fields: Fields) -> bool:
        return any(all(_matches(sel, fields) for sel in selectors) for selectors in filters)

    return match


def _matches(selector: Selector, fields: Fields) -> bool:
    path, op, value = selector
    found = fields(path)
    if op == "":
        return found is not None
    if op == "==":
        return found == value
    if op == "!=":
        return (found or "") != value
    return re.search(value, found or "") is not None


def snapshot_fields(kind: str, name: str, parent: str,
                    labels: Mapping[str, str]) -> Fields:
    """The fields of one snapshot as containerd's snapshot adaptor exposes them."""

    def field(path: tuple[str, ...]) -> str | None:
        head = path[0] if path else ""
        if head == "kind":
            return kind
        if head == "name":
            return name
        if head == "parent":
            return parent
        if head == "labels" and labels:
            return labels.get(".".join(path[1:]))
        return None

    return field
