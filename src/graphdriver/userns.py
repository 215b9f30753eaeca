"""The store's persistent user and mount namespace for rootless use (DESIGN.md rule 7).

Owns what Podman's rootless mode does: a small pause process that keeps a user namespace and a
mount namespace alive (its pid in ``<runroot>/userns/pause.pid``), made by the first command
that needs it and joined with ``setns`` by every later one, so a mount made by one command is
still there for the next.  The namespace maps the user to root and, when the user has
subordinate ids (``/etc/subuid``, ``/etc/subgid``) and ``newuidmap``/``newgidmap`` are
installed, those ids to 1..N, so files owned by other uids land through them; without them only
the user's own id is mapped (a warning says so, and other owners become the user's).

Imports ``idmap`` (the namespace facts), ``errors`` and ``locking``; never the store, a driver,
``archive/`` or the command.  ``subprocess`` and ``ctypes`` load only when a namespace is made
or joined.
"""

from __future__ import annotations

import os
import sys

from . import TYPE_CHECKING
from .errors import NotSupported, PermissionDenied
from .idmap import in_user_namespace, real_root
from .logs import get_logger

if TYPE_CHECKING:  # (pathlib is start-up time of every command, which asks needs_namespace)
    from pathlib import Path

log = get_logger("graphdriver")

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
#: argv[1] of the pause process: how a recorded pid is recognized as ours
PAUSE_NAME = "graphdriver-pause"
_PAUSE_CODE = "import signal\nwhile True:\n    signal.pause()\n"


def needs_namespace() -> bool:
    """An ordinary user outside any user namespace: a store command must enter the store's."""
    return not real_root() and not in_user_namespace()


def pid_file(runroot: Path) -> Path:
    return runroot / "userns" / "pause.pid"


def subordinate_ids(path: str, name: str, uid: int) -> tuple[int, int] | None:
    """The first ``start, count`` range of ``/etc/subuid``-style *path* for the user."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in (name, str(uid)) \
                and fields[1].isdigit() and fields[2].isdigit() and int(fields[2]) > 0:
            return int(fields[1]), int(fields[2])
    return None


def _libc_call(name: str, *args: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _live_pause(runroot: Path) -> int | None:
    """The recorded pause process, when it is alive, ours and a graphdriver pause."""
    try:
        pid = int(pid_file(runroot).read_text(encoding="ascii").strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        owner = os.stat(f"/proc/{pid}").st_uid
    except (OSError, ValueError):
        return None
    if owner != os.geteuid() or PAUSE_NAME.encode() not in argv[:6]:
        return None
    return pid


def enter(runroot: Path) -> None:
    """Join the store's namespace (making it on first use).  Call from a single-threaded
    process only; the working directory is kept."""
    from .locking import FileLock

    runroot.mkdir(parents=True, exist_ok=True, mode=0o700)
    with FileLock(runroot / "userns" / "lock"):
        pid = _live_pause(runroot)
        if pid is None:
            pid = _start_pause(runroot)
        user_fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        mnt_fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    cwd = os.getcwd()
    try:
        _libc_call("setns", user_fd, _CLONE_NEWUSER)
        _libc_call("setns", mnt_fd, _CLONE_NEWNS)
    except OSError as exc:
        raise PermissionDenied(f"cannot join the store's user namespace (pause process {pid}): "
                               f"{exc.strerror}") from exc
    finally:
        os.close(user_fd)
        os.close(mnt_fd)
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/")
        log.warning("the working directory %s is not reachable in the store's namespace", cwd)


def _start_pause(runroot: Path) -> int:
    """Fork the pause process into new user and mount namespaces, map its ids, record it."""
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    first = os.fork()
    if first == 0:  # the middle process: the pause process is orphaned at once (no zombie)
        try:
            os.setsid()
            if os.fork() == 0:
                _pause_child(to_parent_w, to_child_r)
            os._exit(0)
        except BaseException:
            os._exit(1)
    os.close(to_parent_w)
    os.close(to_child_r)
    os.waitpid(first, 0)
    try:
        with os.fdopen(to_parent_r, "rb") as from_child, os.fdopen(to_child_w, "wb") as to_child:
            line = from_child.readline()
            if not line.startswith(b"pid "):
                raise NotSupported("cannot make a user namespace: "
                                   f"{line.decode(errors='replace').strip() or 'the child died'}"
                                   " (are unprivileged user namespaces enabled?)")
            pid = int(line.split()[1])
            mapped = _map_subordinate_ids(pid)
            to_child.write(b"mapped\n" if mapped else b"self\n")
            to_child.flush()
            answer = from_child.readline()
            if answer != b"ready\n":
                raise NotSupported("cannot map ids in the new user namespace: "
                                   f"{answer.decode(errors='replace').strip() or 'it died'}")
    except BrokenPipeError as exc:
        raise NotSupported("cannot make a user namespace: the child died") from exc
    from .fsutil import atomic_write

    atomic_write(pid_file(runroot), f"{pid}\n".encode(), fsync=False)
    log.debug("started pause process %d for %s", pid, runroot)
    return pid


def _pause_child(to_parent_w: int, to_child_r: int) -> None:
    """In the pause process: unshare, let the parent map (or map itself), then pause."""
    out = os.fdopen(to_parent_w, "wb", buffering=0)
    uid, gid = os.geteuid(), os.getegid()  # as the parent namespace sees them
    try:
        _libc_call("unshare", _CLONE_NEWUSER | _CLONE_NEWNS)
        out.write(f"pid {os.getpid()}\n".encode())
        with os.fdopen(to_child_r, "rb") as from_parent:
            how = from_parent.readline()
        if how == b"self\n":
            with open("/proc/self/setgroups", "w", encoding="ascii") as f:
                f.write("deny")
            with open("/proc/self/uid_map", "w", encoding="ascii") as f:
                f.write(f"0 {uid} 1")
            with open("/proc/self/gid_map", "w", encoding="ascii") as f:
                f.write(f"0 {gid} 1")
        elif how != b"mapped\n":
            os._exit(1)
        out.write(b"ready\n")
        out.close()
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 65536)
        os.execv(sys.executable, [sys.executable, "-S", "-c", _PAUSE_CODE, PAUSE_NAME])
    except BaseException as exc:
        try:
            out.write(f"{exc}\n".encode())
        finally:
            os._exit(1)


def _map_subordinate_ids(pid: int) -> bool:
    """Map the user to 0 and its subordinate ids to 1..N with newuidmap/newgidmap; False (and
    a warning) when the user has none or the tools are missing."""
    import pwd
    import shutil
    import subprocess

    uid, gid = os.geteuid(), os.getegid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    subuid = subordinate_ids("/etc/subuid", name, uid)
    subgid = subordinate_ids("/etc/subgid", name, uid)
    tools = shutil.which("newuidmap"), shutil.which("newgidmap")
    why = ("newuidmap/newgidmap are not installed (Debian: uidmap)" if None in tools
           else f"{name} has no subordinate ids in /etc/subuid and /etc/subgid"
           if subuid is None or subgid is None else None)
    if why is None:
        assert subuid is not None and subgid is not None
        for tool, own, (start, count) in ((tools[0], uid, subuid), (tools[1], gid, subgid)):
            proc = subprocess.run([str(tool), str(pid), "0", str(own), "1", "1", str(start),
                                   str(count)], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                why = f"{os.path.basename(str(tool))} failed: {proc.stderr.strip()}"
                break
        else:
            return True
    log.warning("%s: only your own id is mapped in the store's user namespace; files owned by "
                "other users are stored as yours", why)
    return False
