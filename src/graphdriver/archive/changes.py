"""Change detection: what differs between a layer's tree and its parent's.

(Stub holding the shared types; the comparison itself lands with the tar engine.)
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple


class ChangeKind(IntEnum):
    """moby's numbers, kept on every wire: MODIFY=0 ("C"), ADD=1 ("A"), DELETE=2 ("D")."""

    MODIFY = 0
    ADD = 1
    DELETE = 2

    @property
    def letter(self) -> str:
        return "CAD"[self.value]


class Change(NamedTuple):
    """One changed path, absolute inside the layer ("/etc/passwd"), and how it changed."""

    path: str
    kind: ChangeKind

    def __str__(self) -> str:
        return f"{self.kind.letter} {self.path}"
