"""Layer tars for the conformance cases, written in the format each driver imports.

A case describes the files it wants once (``Layer``: directories, files with content and mode,
links, deletions); ``layer_format(driver)`` says how that driver takes and reports them: a Linux
layer tar (``tests.treeutil.TarBuilder``) for vfs and overlay, a Windows layer tar as go-winio
writes it (``tests.drivers.wintar_build.WinTarBuilder``: entries under ``Files/``, the
``MSWINDOWS.*`` and ``LIBARCHIVE.creationtime`` PAX records) for windowsfilter.  Test data only:
never imported by the product.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from graphdriver import ChangeKind
from tests.drivers.wintar_build import WinTarBuilder
from tests.treeutil import TarBuilder

WINDOWS_ROOT = "Files"

Op = tuple[str, str, dict[str, Any]]


class Layer:
    """What a layer holds, in order: ``Layer().dir("etc").file("etc/hostname", b"x")``."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def _op(self, kind: str, path: str, **kw: Any) -> Layer:
        self.ops.append((kind, path, kw))
        return self

    def dir(self, path: str, mode: int = 0o755) -> Layer:
        return self._op("dir", path, mode=mode)

    def file(self, path: str, data: bytes = b"", mode: int = 0o644, uid: int = 0,
             gid: int = 0) -> Layer:
        return self._op("file", path, data=data, mode=mode, uid=uid, gid=gid)

    def symlink(self, path: str, target: str) -> Layer:
        return self._op("symlink", path, target=target)

    def hardlink(self, path: str, target: str) -> Layer:
        return self._op("hardlink", path, target=target)

    def whiteout(self, path: str) -> Layer:
        return self._op("whiteout", path)

    def opaque(self, path: str) -> Layer:
        """Hide what the parents hold under the directory ``path`` (added with ``dir``)."""
        return self._op("opaque", path)

    def linux_tar(self) -> bytes:
        tb = TarBuilder()
        for kind, path, kw in self.ops:
            if kind == "dir":
                tb.dir(path, mode=kw["mode"])
            elif kind == "file":
                tb.file(path, kw["data"], mode=kw["mode"], uid=kw["uid"], gid=kw["gid"])
            elif kind in ("symlink", "hardlink"):
                getattr(tb, kind)(path, kw["target"])
            else:
                getattr(tb, kind)(path)
        return tb.bytes()

    def windows_tar(self) -> bytes:
        """The same files as go-winio exports them: under ``Files/``, every parent directory
        written before its contents, no modes or owners.  A Windows layer has no opaque marker:
        the directory is deleted and made again (a whiteout before its entry)."""
        wb = WinTarBuilder().dir(WINDOWS_ROOT)
        written = {WINDOWS_ROOT}
        opaque = {p for kind, p, _ in self.ops if kind == "opaque"}

        def parents(path: str) -> None:
            head = posixpath.dirname(path)
            if head not in written:
                parents(head)
                wb.dir(head)
                written.add(head)

        for kind, path, kw in self.ops:
            name = f"{WINDOWS_ROOT}/{path}"
            parents(name)
            if kind == "dir":
                if path in opaque:
                    wb.whiteout(name)
                wb.dir(name)
                written.add(name)
            elif kind == "file":
                wb.file(name, kw["data"])
            elif kind == "symlink":
                wb.symlink(name, kw["target"])
            elif kind == "hardlink":
                wb.link(name, f"{WINDOWS_ROOT}/{kw['target']}")
            elif kind == "whiteout":
                wb.whiteout(name)
        return wb.bytes()


@dataclass(frozen=True)
class LayerFormat:
    """How a driver takes a layer and reports on it."""

    tar: Callable[[Layer], bytes]
    #: modes, owners, set-id bits and sticky bits survive an apply
    unix_metadata: bool
    #: the name a path of the tree has in the layer's tar and in ``changes`` of a read-only layer
    stored: Callable[[str], str]
    #: what ``changes`` reports for a path a read-only layer adds
    added: ChangeKind
    #: the mount of a read-only layer takes writes (windowsfilter's only a sandbox's does)
    writable_layers: bool
    #: symlinks count their target's length in diff_size (moby's ChangesSize; hcsshim counts
    #: file data only)
    symlinks_sized: bool
    #: a writable layer made on a read-only one shares its hard-link groups (both drivers'
    #: copy-on-write sandboxes do; a full copy of a view would not)
    sandbox_keeps_hardlinks: bool


LINUX = LayerFormat(tar=Layer.linux_tar, unix_metadata=True, stored=lambda p: p,
                    added=ChangeKind.ADD, writable_layers=True, symlinks_sized=True,
                    sandbox_keeps_hardlinks=True)
WINDOWS = LayerFormat(tar=Layer.windows_tar, unix_metadata=False,
                      stored=lambda p: f"{WINDOWS_ROOT}/{p}" if p else WINDOWS_ROOT,
                      added=ChangeKind.MODIFY, writable_layers=False, symlinks_sized=False,
                      sandbox_keeps_hardlinks=True)


def layer_format(driver: Any) -> LayerFormat:
    return WINDOWS if driver.name == "windowsfilter" else LINUX
