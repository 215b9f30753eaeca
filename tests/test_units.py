"""go-units v0.5.0 size_test.go, every vector, plus the inputs issue 2 names."""

from __future__ import annotations

import pytest

from graphdriver.errors import InvalidArgument
from graphdriver.units import (
    GB,
    KB,
    MB,
    PB,
    TB,
    GiB,
    KiB,
    MiB,
    PiB,
    TiB,
    bytes_size,
    from_human_size,
    human_size,
    ram_in_bytes,
)


@pytest.mark.parametrize(
    ("size", "want"),
    [
        (1024, "1KiB"),
        (1024 * 1024, "1MiB"),
        (1048576, "1MiB"),
        (2 * MiB, "2MiB"),
        (3.42 * GiB, "3.42GiB"),
        (5.372 * TiB, "5.372TiB"),
        (2.22 * PiB, "2.22PiB"),
        (KiB * KiB * KiB * KiB * KiB * PiB, "1.049e+06YiB"),
    ],
)
def test_bytes_size(size: float, want: str) -> None:
    assert bytes_size(size) == want


@pytest.mark.parametrize(
    ("size", "want"),
    [
        (1000, "1kB"),
        (1024, "1.024kB"),
        (1000000, "1MB"),
        (1048576, "1.049MB"),
        (2 * MB, "2MB"),
        (3.42 * GB, "3.42GB"),
        (5.372 * TB, "5.372TB"),
        (2.22 * PB, "2.22PB"),
        (10000000000000 * PB, "1e+04YB"),
    ],
)
def test_human_size(size: float, want: str) -> None:
    assert human_size(size) == want


FROM_HUMAN_OK = [
    ("0", 0), ("0b", 0), ("0B", 0), ("0 B", 0),
    ("32", 32), ("32b", 32), ("32B", 32),
    ("32k", 32 * KB), ("32K", 32 * KB), ("32kb", 32 * KB), ("32Kb", 32 * KB),
    ("32Mb", 32 * MB), ("32Gb", 32 * GB), ("32Tb", 32 * TB), ("32Pb", 32 * PB),
    ("32.5kB", int(32.5 * KB)), ("32.5 kB", int(32.5 * KB)), ("32.5 B", 32),
    ("0.3 K", 300), (".3kB", 300),
    ("0.", 0), ("0. ", 0), ("0.b", 0), ("0.B", 0),
    ("-0", 0), ("-0b", 0), ("-0B", 0), ("-0 b", 0), ("-0 B", 0),
    ("32.", 32), ("32.b", 32), ("32.B", 32), ("32. b", 32), ("32. B", 32),
    ("0 ", 0),
]

FROM_HUMAN_BAD = [
    " 0", " 0b", " 0B", " 0 B", "0b ", "0B ", "0 B ",
    "", "hello", ".", ". ", " ", "  ", " .", " . ",
    "-32", "-32b", "-32B", "-32 b", "-32 B",
    "32b.", "32B.", "32 b.", "32 B.", "32 bb", "32 BB", "32 b b", "32 B B",
    "32  b", "32  B", " 32 ", "32m b", "32bm",
]

RAM_OK = [
    ("32", 32), ("32b", 32), ("32B", 32),
    ("32k", 32 * KiB), ("32K", 32 * KiB), ("32kb", 32 * KiB), ("32Kb", 32 * KiB),
    ("32Kib", 32 * KiB), ("32KIB", 32 * KiB),
    ("32Mb", 32 * MiB), ("32Gb", 32 * GiB), ("32Tb", 32 * TiB), ("32Pb", 32 * PiB),
    ("32PB", 32 * PiB), ("32P", 32 * PiB),
    ("32.3", 32), ("32.3 mb", int(32.3 * MiB)), ("0.3MB", int(0.3 * MiB)),
    # issue 2's examples
    ("127GB", 127 * 2**30), ("10M", 10 * MiB), ("1.5GiB", int(1.5 * GiB)), ("32kb", 32 * KiB),
]

RAM_BAD = ["", "hello", "-32", " 32 ", "32m b", "32bm"]

# Rejected by graphdriver on purpose (issue 2): not plain ASCII decimals, or no digits.
STRICT_BAD = [
    "1_0", "inf", "inf ", "nan ", "+5", "-1", "0x10", "0x1p4", "1e3", "1E3", "١٠", "1١",
    "10Mx", "10 M ", "10MiBB", "10kiB ", "10x", "1e400", "-", "--1", "1-", "99999999999P",
]


@pytest.mark.parametrize(("text", "want"), FROM_HUMAN_OK)
def test_from_human_size(text: str, want: int) -> None:
    assert from_human_size(text) == want


@pytest.mark.parametrize("text", FROM_HUMAN_BAD + STRICT_BAD)
def test_from_human_size_errors(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^invalid (size|suffix): '"):
        from_human_size(text)


@pytest.mark.parametrize(("text", "want"), RAM_OK)
def test_ram_in_bytes(text: str, want: int) -> None:
    assert ram_in_bytes(text) == want


@pytest.mark.parametrize("text", RAM_BAD + STRICT_BAD)
def test_ram_in_bytes_errors(text: str) -> None:
    with pytest.raises(InvalidArgument):
        ram_in_bytes(text)


def test_error_message_quotes_input() -> None:
    with pytest.raises(InvalidArgument) as info:
        ram_in_bytes("1_0")
    assert str(info.value) == "invalid size: '1_0'"
    with pytest.raises(InvalidArgument) as info:
        ram_in_bytes("32bm")
    assert str(info.value) == "invalid suffix: 'bm'"


def test_round_trip_bytes_size() -> None:
    # go-units issue #26: RAMInBytes reads what BytesSize writes.
    for n in (1, 1023, KiB, 5 * MiB, 3 * GiB, 7 * TiB):
        assert ram_in_bytes(bytes_size(n)) == n
