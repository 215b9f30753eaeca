import mmap
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
def files(
    buf: bytearray | mmap.mmap,
    pos: int,
    end: int,
    dirs: dict[str, tuple[int, str, bool]],
    dir_times: dict[str, tuple[int, int, int | None]],
    links: set[str],
    euid: int,
    egid: int,
    umask: int,
    cache_limit: int,
    seg: bytearray | bytes | None,
    crc: Any,
    frames: bytearray | None = None,
    at: int = 0,
    /,
) -> tuple[int, int, int, bytearray | int | None, int, tuple[int, str, str] | None, int]: ...
def set_dir_times(root_fd: int, items: list[tuple[str, int, int]], /) -> list[int]: ...
def verify_files(root_fd: int, records: bytes | bytearray, linked: set[int], /) -> int: ...
def path_hash(key: bytes, /) -> int: ...
def first_duplicate(hashes: bytearray, /) -> int | None: ...
def first_duplicate_runs(fd: int, sizes: list[int], hashes: bytearray, /) -> int | None: ...
def pack_frames(
    buf: bytearray | bytes, start: int, end: int, position: int, seen: bytearray,
    records: bytearray, /,
) -> tuple[int, memoryview, int, int, int]: ...
def openat2(dir_fd: int, path: str, flags: int, mode: int, resolve: int, /) -> int: ...
def set_parent_death_signal(signum: int, /) -> None: ...
