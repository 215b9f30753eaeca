"""CRC-64 with the ISO polynomial, as Go's ``hash/crc64`` computes it for tar-split's payloads.

Owns the one CRC-64 implementation graphdriver uses: anycrc's (a declared dependency, ~1 GB/s).
A leaf: imports nothing from graphdriver.  Import it before a chroot (the confined child does):
it loads anycrc's extension when first imported.

anycrc's extension (Cython, limited API) reads a few ``CO_*`` code flags from :mod:`inspect`
when it loads, and inspect costs ~6 ms of imports (ast, dis, tokenize) that nothing else of an
apply needs: unless inspect is already loaded, anycrc sees a stand-in holding CPython's values
of those flags (any other name loads the real inspect and answers from it), removed once
anycrc is in.
"""

from __future__ import annotations

import sys
from types import ModuleType

#: CPython's code flags (Include/cpython/code.h; inspect's CO_* names), stable across versions
_CODE_FLAGS = {"CO_OPTIMIZED": 0x1, "CO_NEWLOCALS": 0x2, "CO_VARARGS": 0x4,
               "CO_VARKEYWORDS": 0x8, "CO_NESTED": 0x10, "CO_GENERATOR": 0x20, "CO_NOFREE": 0x40,
               "CO_COROUTINE": 0x80, "CO_ITERABLE_COROUTINE": 0x100,
               "CO_ASYNC_GENERATOR": 0x200}


class _InspectFlags(ModuleType):
    """What anycrc's loading reads of inspect; anything else comes from the real module."""

    def __getattr__(self, name: str) -> object:
        if name in _CODE_FLAGS:
            return _CODE_FLAGS[name]
        if sys.modules.get("inspect") is self:
            del sys.modules["inspect"]
        import inspect

        return getattr(inspect, name)


def _load_anycrc() -> ModuleType:
    if "inspect" in sys.modules:
        import anycrc  # type: ignore[import-not-found, import-untyped, unused-ignore]

        return anycrc  # type: ignore[no-any-return, unused-ignore]
    sys.modules["inspect"] = _InspectFlags("inspect")
    try:
        import anycrc  # type: ignore[import-not-found, import-untyped, unused-ignore]
    finally:
        if isinstance(sys.modules.get("inspect"), _InspectFlags):
            del sys.modules["inspect"]
    return anycrc  # type: ignore[no-any-return, unused-ignore]


TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:

    def crc64(data: bytes | memoryview, crc: int = 0, /) -> int:
        """Continue a running CRC-64/GO-ISO (``crc``, 0 to start) over ``data``."""

else:
    # anycrc's method itself, not a wrapper: the tar reader calls it once per file
    crc64 = _load_anycrc().Model("CRC64-GO-ISO").calc
