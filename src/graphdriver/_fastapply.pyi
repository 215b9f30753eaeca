from typing import Any

def header(
    buf: bytearray | bytes | memoryview, pos: int, end: int, /
) -> tuple[Any, ...] | None: ...
