"""uid/gid mappings for user-namespaced stores (moby's idtools.IdentityMapping).

A mapping says that ids ``container_id .. container_id+size-1`` inside the layer are stored as
``host_id ..`` on disk.  Apply maps archive ids to host ids; export and changes map them back.
An id with no mapping is an error, as in moby (a tar may not name an unmapped owner).

Also the facts of the user namespace this process runs in (DESIGN.md rule 7): whether it is the
real root (euid 0 in the initial namespace) or rootless — read from ``/proc/self/uid_map``, never
from the euid alone, which is 0 inside ``unshare -Ur`` too.  Imports only ``errors``.
"""

from __future__ import annotations

import os

from .errors import InvalidArgument

#: the uid_map of the initial user namespace: every id, as itself
_INITIAL_MAP = [(0, 0, 4294967295)]


def namespace_uid_map(pid: str = "self") -> list[tuple[int, int, int]]:
    """``(inside, outside, count)`` lines of a process's ``/proc/PID/uid_map``."""
    try:
        with open(f"/proc/{pid}/uid_map", "rb") as f:  # bytes: no codec to load (start-up time)
            text = f.read()
    except FileNotFoundError:  # no /proc, or no user namespaces: the initial namespace
        return list(_INITIAL_MAP)
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3:
            out.append((int(fields[0]), int(fields[1]), int(fields[2])))
    return out


def in_user_namespace() -> bool:
    """Whether this process runs in a user namespace other than the initial one."""
    return namespace_uid_map() != _INITIAL_MAP


def real_root() -> bool:
    """euid 0 in the initial user namespace: the one who may use loop devices and
    ``trusted.*`` xattrs.  Anything else is rootless."""
    return os.geteuid() == 0 and not in_user_namespace()


def host_uid() -> int:
    """The euid as the initial namespace sees it (one level of mapping: the namespaces
    graphdriver makes are children of the initial one)."""
    euid = os.geteuid()
    for inside, outside, count in namespace_uid_map():
        if inside <= euid < inside + count:
            return outside + (euid - inside)
    return euid

# IDRange and IDMap behave as frozen dataclasses (init, repr, eq, hash, no assignment), written
# out so that opening a store does not import dataclasses (and inspect) -- start-up time.


def _no_setattr(self: object, name: str, value: object) -> None:
    from dataclasses import FrozenInstanceError

    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _no_delattr(self: object, name: str) -> None:
    from dataclasses import FrozenInstanceError

    raise FrozenInstanceError(f"cannot delete field {name!r}")


class IDRange:
    __match_args__ = ("container_id", "host_id", "size")
    container_id: int
    host_id: int
    size: int

    def __init__(self, container_id: int, host_id: int, size: int) -> None:
        object.__setattr__(self, "container_id", container_id)
        object.__setattr__(self, "host_id", host_id)
        object.__setattr__(self, "size", size)
        if self.container_id < 0 or self.host_id < 0 or self.size <= 0:
            raise InvalidArgument(
                f"invalid id range {self.container_id}:{self.host_id}:{self.size}"
            )

    def _key(self) -> tuple[int, int, int]:
        return (self.container_id, self.host_id, self.size)

    def __repr__(self) -> str:
        return (f"IDRange(container_id={self.container_id!r}, host_id={self.host_id!r}, "
                f"size={self.size!r})")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._key())

    __setattr__ = _no_setattr
    __delattr__ = _no_delattr


def _parse_ranges(text: str) -> tuple[IDRange, ...]:
    ranges = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        fields = part.split(":")
        if len(fields) != 3 or not all(f.isascii() and f.isdigit() for f in fields):
            raise InvalidArgument(f"invalid id mapping {part!r}: want CONTAINER:HOST:SIZE")
        ranges.append(IDRange(int(fields[0]), int(fields[1]), int(fields[2])))
    return tuple(ranges)


def _map(ranges: tuple[IDRange, ...], value: int, to_host: bool, kind: str) -> int:
    for r in ranges:
        src, dst = (r.container_id, r.host_id) if to_host else (r.host_id, r.container_id)
        if src <= value < src + r.size:
            return dst + (value - src)
    side = "container" if to_host else "host"
    raise InvalidArgument(f"{kind} {value} is not mapped from the {side} side")


class IDMap:
    """uid and gid ranges; empty ranges mean the identity (the usual, non-namespaced store)."""

    __match_args__ = ("uids", "gids")
    uids: tuple[IDRange, ...]
    gids: tuple[IDRange, ...]

    def __init__(self, uids: tuple[IDRange, ...] = (), gids: tuple[IDRange, ...] = ()) -> None:
        object.__setattr__(self, "uids", uids)
        object.__setattr__(self, "gids", gids)

    def __repr__(self) -> str:
        return f"IDMap(uids={self.uids!r}, gids={self.gids!r})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.uids, self.gids) == (other.uids, other.gids)  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.uids, self.gids))

    __setattr__ = _no_setattr
    __delattr__ = _no_delattr

    @classmethod
    def parse(cls, uidmap: str = "", gidmap: str = "") -> IDMap:
        """``IDMap.parse("0:100000:65536", "0:100000:65536")``; gidmap defaults to uidmap."""
        uids = _parse_ranges(uidmap)
        gids = _parse_ranges(gidmap) if gidmap else uids
        return cls(uids, gids)

    @property
    def is_identity(self) -> bool:
        return not self.uids and not self.gids

    def to_host(self, uid: int, gid: int) -> tuple[int, int]:
        if self.is_identity:
            return uid, gid
        return (
            _map(self.uids, uid, True, "uid") if self.uids else uid,
            _map(self.gids, gid, True, "gid") if self.gids else gid,
        )

    def to_container(self, uid: int, gid: int) -> tuple[int, int]:
        if self.is_identity:
            return uid, gid
        return (
            _map(self.uids, uid, False, "uid") if self.uids else uid,
            _map(self.gids, gid, False, "gid") if self.gids else gid,
        )

    def root_pair(self) -> tuple[int, int]:
        """The host ids that container root maps to (owner of new directories)."""
        return self.to_host(0, 0)

    def to_json(self) -> dict[str, list[list[int]]]:
        return {
            "uids": [[r.container_id, r.host_id, r.size] for r in self.uids],
            "gids": [[r.container_id, r.host_id, r.size] for r in self.gids],
        }

    @classmethod
    def from_json(cls, data: dict[str, list[list[int]]]) -> IDMap:
        return cls(
            tuple(IDRange(*r) for r in data.get("uids", [])),
            tuple(IDRange(*r) for r in data.get("gids", [])),
        )


IDENTITY = IDMap()
