"""CRC-64 with the ISO polynomial, as Go's ``hash/crc64`` computes it for tar-split's payloads.

Owns the CRC-64 graphdriver uses: ISA-L's (``crc64_iso_refl`` in the extension of isal, a
declared dependency for gzip: ~50 GB/s on large buffers with VPCLMULQDQ, ~4x anycrc's) where the
native digest helper is built, else anycrc's (a declared dependency, its crc-clmul library).
Import it before a chroot (the confined child does): it loads the extension when first imported.

Where the native digest helper is built (:mod:`.native`), the extension is loaded as a plain
library by ``_fastdigest.load_crc`` -- its file found by the import system's path finder, its
Python module not run (anycrc's import, ~2 ms with its models table and functools, is start-up
time of every confined child) -- and :func:`crc64` is ``_fastdigest.crc64`` (the same CRC as
the digest worker's frames).  Otherwise anycrc is imported: its extension (Cython, limited API)
reads a few ``CO_*`` code flags from :mod:`inspect` when it loads, and inspect costs ~6 ms of
imports (ast, dis, tokenize) that nothing else of an apply needs: unless inspect is already
loaded, anycrc sees a stand-in holding CPython's values of those flags (any other name loads
the real inspect and answers from it), removed once anycrc is in.

Imports only :mod:`.native` of graphdriver.
"""

from __future__ import annotations

import sys

from .native import native_module

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:
    from typing import Any

#: CPython's code flags (Include/cpython/code.h; inspect's CO_* names), stable across versions
_CODE_FLAGS = {"CO_OPTIMIZED": 0x1, "CO_NEWLOCALS": 0x2, "CO_VARARGS": 0x4,
               "CO_VARKEYWORDS": 0x8, "CO_NESTED": 0x10, "CO_GENERATOR": 0x20, "CO_NOFREE": 0x40,
               "CO_COROUTINE": 0x80, "CO_ITERABLE_COROUTINE": 0x100,
               "CO_ASYNC_GENERATOR": 0x200}


def _load_anycrc() -> Any:
    """anycrc, imported (its extension run as a Python module)."""
    from types import ModuleType

    class InspectFlags(ModuleType):
        """What anycrc's loading reads of inspect; anything else comes from the real module."""

        def __getattr__(self, name: str) -> object:
            if name in _CODE_FLAGS:
                return _CODE_FLAGS[name]
            if sys.modules.get("inspect") is self:
                del sys.modules["inspect"]
            import inspect

            return getattr(inspect, name)

    if "inspect" in sys.modules:
        import anycrc  # type: ignore[import-not-found, import-untyped, unused-ignore]

        return anycrc
    sys.modules["inspect"] = InspectFlags("inspect")
    try:
        import anycrc  # type: ignore[import-not-found, import-untyped, unused-ignore]
    finally:
        if isinstance(sys.modules.get("inspect"), InspectFlags):
            del sys.modules["inspect"]
    return anycrc


def _extension_file(package_name: str, module: str) -> str | None:
    """The file of a package's extension module (``anycrc.crc``), found as an import would
    find it but without running the package or the module (None: not found)."""
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        package = find_spec(package_name, None)
        if package is None:
            continue
        if not package.submodule_search_locations:
            return None
        spec = find_spec(f"{package_name}.{module}", package.submodule_search_locations)
        return spec.origin if spec is not None and spec.has_location else None
    return None


def _native_crc() -> Any:
    """``_fastdigest.crc64`` once it holds ISA-L's CRC (isal's extension) or anycrc's, else
    None."""
    fast = native_module("_fastdigest")
    if fast is None:
        return None
    if fast.CRC:  # isal or anycrc was imported before
        return fast.crc64
    for package, module in (("isal", "isal_zlib"), ("anycrc", "crc")):
        path = _extension_file(package, module)
        if path is not None and fast.load_crc(path):
            return fast.crc64
    return None


if TYPE_CHECKING:

    def crc64(data: bytes | memoryview, crc: int = 0, /) -> int:
        """Continue a running CRC-64/GO-ISO (``crc``, 0 to start) over ``data``."""

else:
    # a C function itself, not a wrapper: the tar reader calls it once per file
    crc64 = _native_crc() or _load_anycrc().Model("CRC64-GO-ISO").calc
