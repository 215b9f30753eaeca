from typing import Any

def header(
    buf: bytearray | bytes | memoryview, pos: int, end: int, /
) -> tuple[Any, ...] | None: ...
def create_file(
    dir_fd: int,
    name: str,
    perm: int,
    data: memoryview | bytes,
    chown: bool,
    uid: int,
    gid: int,
    chmod_mode: int,
    atime_ns: int,
    mtime_ns: int,
    /,
) -> tuple[int, str] | None: ...
