"""CRC-64 with the ISO polynomial, as Go's ``hash/crc64`` computes it for tar-split's payloads.

Owns the one CRC-64 implementation graphdriver uses: anycrc's (a declared dependency, ~1 GB/s).
A leaf: imports nothing from graphdriver.  Import it before a chroot (the confined child does):
it loads anycrc's extension when first imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anycrc  # type: ignore[import-not-found, import-untyped, unused-ignore]

if TYPE_CHECKING:

    def crc64(data: bytes | memoryview, crc: int = 0, /) -> int:
        """Continue a running CRC-64/GO-ISO (``crc``, 0 to start) over ``data``."""

else:
    # anycrc's method itself, not a wrapper: the tar reader calls it once per file
    crc64 = anycrc.Model("CRC64-GO-ISO").calc
