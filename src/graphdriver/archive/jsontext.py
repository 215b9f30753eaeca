"""JSON text of plain values, without the json package (whose decoder imports re).

The confined child (:mod:`.confine`) writes JSON — its answers to the parent, the apply's undo
journal, tar-split lines — after its chroot, where no module can be imported any more, and its
start-up should not pay for json's decoder.  :func:`dumps` writes what ``json.dumps(value,
separators=(",", ":"), ensure_ascii=...)`` writes for dicts with str keys, lists, tuples, str,
int, float, bool and None, through the json package's own C string encoders; anything else
(inf and nan included) raises TypeError.

A leaf: imports only the C module ``_json``.
"""

from __future__ import annotations

from _json import encode_basestring, encode_basestring_ascii

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:
    from collections.abc import Callable


def dumps(value: object, *, ensure_ascii: bool = True) -> str:
    """*value* as compact JSON (no spaces), as ``json.dumps`` writes it."""
    return _text(value, encode_basestring_ascii if ensure_ascii else encode_basestring)


def _text(value: object, enc: Callable[[str], str]) -> str:
    if isinstance(value, str):
        return enc(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float) and value - value == 0:  # neither inf nor nan
        return float.__repr__(value)
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return "{" + ",".join(f"{enc(k)}:{_text(v, enc)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_text(v, enc) for v in value) + "]"
    raise TypeError(f"{type(value).__name__} {value!r:.40} has no JSON form")
