"""Jobs for the runner's tests (archive/confine.py), run in its confined child by name."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from graphdriver import errors
from graphdriver.archive.confine import ChildContext

if TYPE_CHECKING:
    from graphdriver.archive.confine import JobBody

#: what the lower probe tries through each lower fd
_ATTEMPTS: dict[str, Callable[[int], Any]] = {
    "create": lambda fd: os.close(os.open("new", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)),
    "open_for_write": lambda fd: os.close(os.open("f", os.O_WRONLY | os.O_APPEND, dir_fd=fd)),
    "mkdir": lambda fd: os.mkdir("newdir", dir_fd=fd),
    "unlink": lambda fd: os.unlink("f", dir_fd=fd),
    "rename": lambda fd: os.rename("f", "g", src_dir_fd=fd, dst_dir_fd=fd),
    "chmod": lambda fd: os.chmod("f", 0o600, dir_fd=fd),
    "setxattr": lambda fd: os.setxattr(fd, "user.probe", b"1"),
}


def lower_probe(ctx: ChildContext) -> JobBody:
    """Read every lower (names, the content of ``f``), then try to change it every way."""

    def body() -> dict[str, Any]:
        lowers = []
        for fd in ctx.lower_fds:
            sfd = os.open("f", os.O_RDONLY, dir_fd=fd)
            try:
                content = os.read(sfd, 100).decode()
            finally:
                os.close(sfd)
            refused = {}
            for what, attempt in _ATTEMPTS.items():
                try:
                    attempt(fd)
                    refused[what] = "done"
                except OSError as exc:
                    refused[what] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            lowers.append({"names": sorted(os.listdir(fd)), "f": content, "refused": refused})
        return {"chrooted": ctx.chrooted, "root": sorted(os.listdir("/")), "lowers": lowers}

    return body


def fail(ctx: ChildContext) -> JobBody:
    """Raise the error class named in the parameters, with their message, once confined."""
    cls = getattr(errors, ctx.params["class"])

    def body() -> dict[str, Any]:
        raise cls(ctx.params["message"])

    return body


def whoami(ctx: ChildContext) -> JobBody:
    """The child's pid, whether it is confined, and what its input fd reads."""

    def body() -> dict[str, Any]:
        data = os.read(ctx.input_fd, 100).decode() if ctx.input_fd is not None else None
        return {"pid": os.getpid(), "chrooted": ctx.chrooted, "root": sorted(os.listdir("/")),
                "input": data}

    return body


def open_fds(ctx: ChildContext) -> JobBody:
    """What each fd the child holds names, read before it confines itself (/proc is gone
    after the chroot), and which of them it was handed."""
    names = {}
    for entry in os.listdir("/proc/self/fd"):
        try:
            names[entry] = os.readlink(f"/proc/self/fd/{entry}")
        except OSError:  # the listing's own fd, closed meanwhile
            continue
    handed = [ctx.target_fd, *ctx.lower_fds]
    if ctx.input_fd is not None:
        handed.append(ctx.input_fd)

    def body() -> dict[str, Any]:
        return {"names": names, "handed": handed}

    return body


def fd_table(ctx: ChildContext) -> JobBody:
    """The size of the child's descriptor table, read before it confines itself (/proc is
    gone after the chroot)."""
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) for line in f if line.startswith("FDSize:"))

    def body() -> dict[str, Any]:
        return {"fd_size": size}

    return body
