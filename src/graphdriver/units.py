"""Human sizes, as docker/go-units v0.5.0 (size.go) reads and writes them.

- ``ram_in_bytes("127GB") == 127 * 2**30``: binary multiples (RAMInBytes, used for ``size=``).
- ``from_human_size("32kB") == 32000``: decimal multiples (FromHumanSize).
- ``human_size(n)`` / ``bytes_size(n)``: "2.746MB" / "2.619MiB" (HumanSize / BytesSize).
- ``human_bytes(n)``: "2.6 MiB", what the command prints (tables, messages, progress).
- ``human_duration(seconds)``: "About an hour" (HumanDuration), the command's CREATED column.

The parser follows go-units' split exactly: the number is everything up to the last digit, dot or
space (a single space between number and suffix is dropped), the suffix is at most three bytes,
case-insensitive: ``b``, ``k``/``m``/``g``/``t``/``p`` optionally followed by ``b`` or ``ib``.

go-units hands the number to Go's ``strconv.ParseFloat``, which also takes ``+5``, ``1e3``,
``0x1p4``, ``inf`` and ``nan`` spellings; graphdriver accepts only plain ASCII decimals
(``[-]digits[.digits]``, ``.5`` and ``5.`` included) and rejects those, as issue 2 requires.  A
minus sign is accepted only for zero ("-0", as go-units' tests require); any other negative size
is an error.  A value that does not fit an int64 is an error (Go would silently wrap it).
"""

from __future__ import annotations

import re

from .errors import InvalidArgument

KB = 1000
MB = 1000 * KB
GB = 1000 * MB
TB = 1000 * GB
PB = 1000 * TB

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
PiB = 1024 * TiB

_DECIMAL = {"k": KB, "m": MB, "g": GB, "t": TB, "p": PB}
_BINARY = {"k": KiB, "m": MiB, "g": GiB, "t": TiB, "p": PiB}

_DECIMAL_ABBRS = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")
_BINARY_ABBRS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")

# The subset of ParseFloat's grammar graphdriver accepts: ASCII decimal, optional minus.
_NUMBER = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)\Z")
_SEPARATORS = frozenset("01234567890. ")
_INT64_MAX = 2**63 - 1


def _size_and_unit(size: float, base: float, abbrs: tuple[str, ...]) -> tuple[float, str]:
    i = 0
    while size >= base and i < len(abbrs) - 1:
        size /= base
        i += 1
    return size, abbrs[i]


def custom_size(fmt: str, size: float, base: float, abbrs: tuple[str, ...]) -> str:
    """go-units CustomSize: ``fmt % (scaled size, unit)``."""
    scaled, unit = _size_and_unit(size, base, abbrs)
    return fmt % (scaled, unit)


def human_size_with_precision(size: float, precision: int) -> str:
    """go-units HumanSizeWithPrecision: decimal units, ``%.<precision>g``."""
    scaled, unit = _size_and_unit(size, 1000.0, _DECIMAL_ABBRS)
    return f"{scaled:.{precision}g}{unit}"


def human_size(size: float) -> str:
    """go-units HumanSize: ``human_size(1048576) == "1.049MB"``."""
    return human_size_with_precision(size, 4)


def bytes_size(size: float) -> str:
    """go-units BytesSize: ``bytes_size(3.42 * GiB) == "3.42GiB"``."""
    return custom_size("%.4g%s", size, 1024.0, _BINARY_ABBRS)


def human_bytes(size: float) -> str:
    """What the command prints for a size: ``human_bytes(8 * MiB) == "8 MiB"``, ``"1.5 GiB"``,
    ``"512 B"`` (binary units, at most one decimal, a space before the unit)."""
    scaled, unit = _size_and_unit(float(size), 1024.0, _BINARY_ABBRS)
    if unit == "B":
        return f"{int(size)} B"
    text = f"{scaled:.1f}".removesuffix(".0")
    return f"{text} {unit}"


def human_duration(seconds: float) -> str:
    """go-units HumanDuration: "Less than a second", "About a minute", "3 hours", "2 weeks"."""
    secs = int(seconds)
    if secs < 1:
        return "Less than a second"
    if secs == 1:
        return "1 second"
    if secs < 60:
        return f"{secs} seconds"
    minutes = secs // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


def from_human_size(size: str) -> int:
    """go-units FromHumanSize: decimal multiples ("32kB" == 32000)."""
    return _parse_size(size, _DECIMAL)


def ram_in_bytes(size: str) -> int:
    """go-units RAMInBytes: binary multiples ("127GB" == 127 * 2**30, "1.5GiB", "32kb")."""
    return _parse_size(size, _BINARY)


def _parse_size(text: str, multiples: dict[str, int]) -> int:
    invalid = InvalidArgument(f"invalid size: '{text}'")
    sep = max((i for i, c in enumerate(text) if c in _SEPARATORS), default=-1)
    if sep == -1:
        raise invalid
    if text[sep] != " ":
        num, sfx = text[: sep + 1], text[sep + 1 :]
    else:
        num, sfx = text[:sep], text[sep + 1 :]
    if not _NUMBER.match(num):
        raise invalid
    value = float(num)
    if value < 0:
        raise invalid
    if sfx:
        # go-units measures and indexes the suffix in bytes.
        if len(sfx.encode("utf-8", "surrogateescape")) > 3:
            raise InvalidArgument(f"invalid suffix: '{sfx}'")
        low = sfx.lower()
        raw = low.encode("utf-8", "surrogateescape")
        bad = InvalidArgument(f"invalid suffix: '{low}'")
        if raw[:1] == b"b":
            if len(raw) > 1:
                raise bad
        else:
            mul = multiples.get(low[0])
            if mul is None or not low[0].isascii():
                raise bad
            value *= float(mul)
            if (len(raw) == 2 and raw[1:] != b"b") or (len(raw) == 3 and raw[1:] != b"ib"):
                raise bad
    if value > _INT64_MAX:
        raise invalid
    return int(value)
