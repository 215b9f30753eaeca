"""vfs: every layer is a full copy of its parent's tree (moby's vfs driver).

Works on any filesystem.  A child starts as a copy of its parent made with reflinks where the
filesystem offers them (btrfs, xfs), else with copy_file_range; hard links, xattrs, owners, modes
and times are kept.  Diff, changes and diff size come from the shared NaiveDiff; against its own
parent, a layer's regular files as copied (inode and ctime, ``meta/<id>/copied-files``) tell
which files alike by size and mtime may still have been rewritten (compared by content then).
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path

from ..errors import NotSupported
from ..fsutil import atomic_write, copy_tree, fs_name
from ..layers import REMOVING_SUFFIX, LayerRecord
from ..store import LayerStore

COPIED_FILES = "copied-files"


class VFSDriver(LayerStore):
    name = "vfs"
    home_names = frozenset({"dir"})

    def _init_driver(self) -> None:
        self.dir = self.home / "dir"
        self.dir.mkdir(exist_ok=True, mode=0o700)
        if self.default_size:
            raise NotSupported("vfs: the size option needs filesystem quotas, which vfs lacks here")

    def _layer_paths(self, layer_id: str) -> list[Path]:
        return [self.dir / layer_id]

    def _disk_ids(self) -> set[str]:
        return {n for n in os.listdir(self.dir) if not n.endswith(REMOVING_SUFFIX)
                and not n.startswith(".")}

    def _removing_leftovers(self) -> list[Path]:
        return [self.dir / n for n in os.listdir(self.dir) if n.endswith(REMOVING_SUFFIX)]

    def _make_layer(self, rec: LayerRecord, parent: LayerRecord | None) -> None:
        path = self.dir / rec.id
        os.mkdir(path, 0o755)
        uid, gid = self.idmap.root_pair()
        if (uid, gid) != (os.geteuid(), os.getegid()):
            os.chown(path, uid, gid)
        if parent is not None:
            copied: array[int] = array("q")
            copy_tree(self.dir / parent.id, path, copied)
            atomic_write(self.meta.dir(rec.id) / COPIED_FILES, copied.tobytes(), fsync=False)

    def _unchanged_copies(self, layer_id: str, parent: str) -> frozenset[tuple[int, int]] | None:
        if parent != self.record(layer_id).parent:
            return None
        copied: array[int] = array("q")
        try:
            with open(self.meta.dir(layer_id) / COPIED_FILES, "rb") as f:
                copied.frombytes(f.read())
        except (FileNotFoundError, ValueError):
            return None  # made before the record was kept: the plain comparison
        return frozenset(zip(copied[::2], copied[1::2], strict=True))

    def _parent_roots(self, rec: LayerRecord) -> list[Path] | None:
        return [self.dir / rec.parent] if rec.parent else []

    def _copied_from_parent(self, layer_id: str) -> bool:
        return (self.meta.dir(layer_id) / COPIED_FILES).exists()

    def _mount(self, rec: LayerRecord, mount_label: str) -> Path:
        return self.dir / rec.id

    def _mount_path(self, rec: LayerRecord) -> Path:
        return self.dir / rec.id

    def _apply_target(self, rec: LayerRecord) -> Path:
        return self.dir / rec.id

    def mount_spec(self, layer_id: str, readonly: bool = False) -> tuple[str, str, list[str]]:
        """How another process mounts the layer's tree: (type, source, options), a bind of it."""
        self.record(layer_id)
        return "bind", str(self.dir / layer_id), ["ro" if readonly else "rw", "rbind"]

    def _status(self) -> list[tuple[str, str]]:
        return [("Backing Filesystem", fs_name(self.home))]

    def _metadata(self, rec: LayerRecord) -> dict[str, str]:
        return {"Dir": str(self.dir / rec.id)}


DRIVER = VFSDriver
