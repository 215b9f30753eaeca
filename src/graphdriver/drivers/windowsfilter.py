"""windowsfilter: Windows container image layers, stored, assembled and diffed on Linux.

moby's ``windowsfilter`` driver (``daemon/graphdriver/windows/windows.go``) asks HCS to do the
work; this driver keeps the same on-disk layer format and the same semantics, with Linux doing
what HCS does.  It lets image scanners and CI on Linux store, inspect and re-export Windows layers.

Layout (hcsshim's, plus the shared ``meta/`` and ``locks/`` of every home)::

    <home>/<id>/Files/            the layer's files (the container's C:\\)
    <home>/<id>/Hives/            registry hives (base layers)
    <home>/<id>/UtilityVM/Files/  the utility VM image (base layers)
    <home>/<id>/tombstones.txt    deletions, hcsshim's format ("Version 1.0", one \\path a line)
    <home>/<id>/layerchain.json   parent layer paths with a Files directory, nearest first
    <home>/<id>/layerID           optional: the id whose directory really holds the layer
    <home>/<id>/bcd*.bak          the UtilityVM BCD files as imported (see below)
    <home>/<id>/linkmeta.json     Windows metadata of symlinks (Linux has no user xattrs on them)
    <home>/<id>/crosslinks.json   names that are hard links into a parent layer, and their target
    <home>/<id>/winmeta/          Windows metadata values too large for xattrs, by sha256
    <home>/<id>/merged/           while a read-only layer is mounted: its assembled view
    <home>/<id>/sandbox/          a writable layer's tree (``quota/diff`` when it has a size)

Windows metadata (``MSWINDOWS.*`` PAX records, creation times, sub-second times) is kept in
``user.mswindows.*`` xattrs of each file and alternate data streams are files named
``file:stream`` beside their file (archive/windows/ has the details).  The home must hold
``user.*`` xattrs: opening a store on a filesystem that cannot is refused (moby refuses ReFS).

Semantics, and where they differ from moby:

- ``create`` makes a read-only layer with an empty ``Files``; ``create_rw`` makes a sandbox: as
  root a copy-on-write overlay of its parent's layers' views (nothing of the image copied), else
  a writable tree that starts as a copy (reflinks where the filesystem has them) of its
  parent's view.  The chain in ``layerchain.json`` lists only parents with a ``Files``
  directory, so a sandbox parent (Docker's ``-init`` layer) is skipped, as in moby.
- ``size``: storage option keys are case-insensitive; the built-in default sandbox size is
  "127GB" (RAMInBytes: 127 GiB), recorded in the layer record and reported by ``status`` but
  not enforced (nothing to pay for on ext4).  A default the store is opened with
  (``--storage-opt size=``) and an explicit ``--size`` on ``create_rw`` are enforced with
  quota.py's loop-mounted ext4 image (the Linux counterpart of ``sandbox.vhdx``).
- the home is made absolute when the store opens: ``layerchain.json`` holds absolute paths (as
  hcsshim needs) and a quota image's mount point is found in mountinfo with a relative
  ``--root`` too.
- ``get`` of a read-only layer gives the merged view of its ``Files`` and its chain's: a tree
  built under ``<id>/merged`` of hard links to the layers' files, tombstones applied, names
  matched case-insensitively (nearest layer's spelling wins), alternate streams left out.  moby
  returns the bare layer folder instead; a merged tree is what a scanner on Linux wants.  The
  merged tree shares inodes with the layers, so as root it is made a read-only bind mount of
  itself (writes fail with EROFS); without root it is read-only by convention only.  It is
  removed when the last reference is put.  ``get`` of a sandbox gives the sandbox.
- ``changes`` of a read-only layer: moby's driver cannot tell an add from a modify, so every path
  the layer holds is MODIFY and every tombstone DELETE, with paths as the layer stores them
  (``Files/…``, ``Hives/…``, ``UtilityVM/…``; alternate streams are not separate paths).  The
  parent argument is ignored, as in moby.
- ``diff`` of a read-only layer streams the Windows-format tar of the layer (archive/windows), every
  entry's PAX records as they were imported.  ``diff_size`` is the bytes of file data in the
  layer.  A copy-on-write sandbox's changes/diff/diff_size come from its upper directory, and
  its diff is a Windows layer (archive/windows/sandbox.py: lower files' records kept, new
  files BuildKit's defaults; never ``Hives/``, which only a running Windows registry changes);
  a copied sandbox compares its tree with its parent's view (the shared NaiveDiff; a plain
  Linux layer tar).
- ``apply_diff`` imports a Windows layer tar into a read-only layer in a confined child (moby
  re-execs ``docker-windows-write-layer``): the import is a job of the runner every layer write
  goes through (archive/confine.py; the job is archive/winimport.py), handed the input, the
  staging directory and the parent layers as file descriptors; as root it chroots into the
  staging directory before reading the tar (or refuses to run), signals stop it and roll it
  back, and its progress reaches the caller.  This module keeps no child-process code.  The tar
  is imported into ``<id>/.staging`` (a hard-link clone of what the layer held), which replaces
  the layer's directories only on success, so a failed import leaves the layer as it was.  It
  returns hcsshim's size (bytes of file data, streams not counted).  The child's tar reader
  also records the tar-split description (``meta/<id>/tar-split.json.gz``, written here from
  the frames the runner replays), so an exact diff re-assembles the applied tar byte for byte
  from the layer's files.  The BCD files are also copied to ``bcd.bak``/``bcd.log.bak``/
  ``bcd.log1.bak``/``bcd.log2.bak`` and ``diff_getter`` serves those paths from the backups,
  as moby does.
- ``layerID``: ``resolve_id`` reads ``<id>/layerID`` (or moby's ``layerId`` spelling) to find
  the directory that holds a layer; ``set_id`` writes ``layerID``.  Mounts are counted per
  resolved id, as moby's ``Get``/``Put`` do: an alias shares its target's view and count.
- the diff getter matches a path as NTFS does: exactly, or else regardless of case where each
  directory on the way holds one match (a tar naming ``Files/dir/a`` after ``Files/Dir``); the
  tar-split check after an import matches recorded names the same way, so such a layer keeps
  its exact diff (the recorded names are not changed).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .. import quota
from ..archive.changes import Change, ChangeKind
from ..archive.options import ApplyOptions, ApplyResult
from ..archive.pathres import open_beneath
from ..archive.windows.export import write_layer_tar
from ..archive.windows.layout import stored_path, walk_layer
from ..archive.windows.metadata import read_tombstones
from ..archive.windows.names import (
    CROSSLINKS,
    LINKMETA,
    MUTATED_FILES,
    SIDE_DIR,
    TOMBSTONES,
    TOP_DIRS,
    XATTR_PREFIX,
    fold,
)
from ..archive.windows.sandbox import sandbox_size, walk_sandbox, write_sandbox_tar
from ..archive.windows.view import Source, ViewConflict, build_view
from ..archive.winimport import import_windows_confined
from ..errors import GraphDriverError, NotSupported, from_oserror
from ..fsutil import atomic_write, copy_file_data, copy_tree, fs_name, remove_tree
from ..idmap import real_root
from ..layers import REMOVING_SUFFIX, LayerRecord, validate_id
from ..logs import get_logger
from ..mount import (
    MS_RDONLY,
    OverlayOptions,
    is_mounted,
    mount,
    mount_overlay,
    unmount,
    unmount_all_under,
)
from ..store import LayerStore, parse_size

if TYPE_CHECKING:
    from ..archive.tarsplit import Resolver

log = get_logger("graphdriver")

DEFAULT_SANDBOX_SIZE = "127GB"
LAYER_ID_FILE = "layerID"
LAYER_ID_FILES = ("layerID", "layerId")  # moby writes "layerId" and reads "layerID"
LAYERCHAIN = "layerchain.json"
MERGED = "merged"
SANDBOX = "sandbox"
UPPER = "upper"  # a copy-on-write sandbox's upper directory
WORK = "work"
EMPTY = "empty"  # the lower directory of a copy-on-write sandbox without a parent
COW_MARK = "cow"  # present in a copy-on-write sandbox's directory
STAGING = ".staging"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LAYER_CONTENT = (*TOP_DIRS, TOMBSTONES, LINKMETA, CROSSLINKS, SIDE_DIR,
                  *MUTATED_FILES.values())

_HOME_NAMES = frozenset({"meta", "locks"})


class WindowsFilterDriver(LayerStore):
    name = "windowsfilter"
    supports_quota = True  # an explicit sandbox size, by quota.py's loop-mounted image
    mounts = True  # get() builds <id>/merged: counts are checked against it when a store opens
    apply_journal = False  # the import is swapped in whole (a clone of the layer, then a swap)
    apply_child_ahead = False  # its hook runs the Windows import job, not the Linux apply

    # ----- setup ---------------------------------------------------------------------------

    def _init_driver(self) -> None:
        # hcsshim needs absolute layer paths (layerchain.json), and mountinfo holds absolute
        # mount points (a sandbox's quota image): the home is made absolute once, here.
        self.home = Path(os.path.abspath(self.home))
        # moby: the default sandbox size is "127GB" unless the options say otherwise.  The
        # built-in 127GB is nominal (recorded, reported); a size the store was configured with
        # (--storage-opt size=) stays the base class's default, enforced like an explicit one.
        self.sandbox_size = (self.default_size if self.default_size is not None
                             else parse_size(DEFAULT_SANDBOX_SIZE, self.name))
        probe = self.home / f".xattr-probe-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.setxattr(fd, XATTR_PREFIX + "probe", b"1")
            finally:
                os.close(fd)
        except OSError as exc:
            raise NotSupported(
                f"windowsfilter: {self.home} ({fs_name(self.home)}) cannot hold user.* extended "
                f"attributes, which keep Windows file metadata: {exc.strerror}"
            ) from exc
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()

    def _dir(self, layer_id: str) -> Path:
        return self.home / self.resolve_id(layer_id)

    def resolve_id(self, layer_id: str) -> str:
        """The id whose directory holds the layer (moby's ``layerID`` indirection)."""
        for name in LAYER_ID_FILES:
            try:
                alt = (self.home / layer_id / name).read_text().strip()
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise from_oserror(exc, f"windowsfilter: reading {name} of {layer_id}") from exc
            return validate_id(alt, f"{name} of layer {layer_id}")
        return layer_id

    def set_id(self, layer_id: str, alt_id: str) -> None:
        """Make ``layer_id``'s directory name ``alt_id`` as the directory that holds the layer."""
        validate_id(alt_id)
        atomic_write(self.home / validate_id(layer_id) / LAYER_ID_FILE, alt_id.encode(),
                     mode=0o600)

    def get(self, layer_id: str, mount_label: str = "") -> Path:
        """Mounts are counted per resolved id (moby's ``Get`` counts ``resolveID(id)``): an
        alias made by ``layerID`` shares its target's view and count."""
        return super().get(self._counted_id(layer_id), mount_label)

    def put(self, layer_id: str) -> None:
        super().put(self._counted_id(layer_id))

    def mount_count(self, layer_id: str) -> int:
        return super().mount_count(self._counted_id(layer_id))

    def _counted_id(self, layer_id: str) -> str:
        """The id whose count a mount of ``layer_id`` takes: its ``layerID`` target when that
        is a layer of this store, else itself."""
        rid = self.resolve_id(validate_id(layer_id))
        if rid != layer_id and self.meta.read(rid) is not None:
            return rid
        return layer_id

    def _layer_paths(self, layer_id: str) -> list[Path]:
        return [self.home / layer_id]

    def _disk_ids(self) -> set[str]:
        out = set()
        for n in os.listdir(self.home):
            if (n in _HOME_NAMES or n.startswith(".") or n.endswith(REMOVING_SUFFIX)
                    or not (self.home / n).is_dir()):
                continue
            out.add(n)
        return out

    def _removing_leftovers(self) -> list[Path]:
        return [self.home / n for n in os.listdir(self.home) if n.endswith(REMOVING_SUFFIX)]

    def _destroy(self, path: Path) -> None:
        try:
            self._detach(path)
            remove_tree(path)
        except OSError as exc:
            raise from_oserror(exc, f"windowsfilter: removing {path}") from exc

    def _detach(self, path: Path) -> None:
        unmount_all_under(os.path.realpath(path))
        if os.path.isdir(path) and not os.path.islink(path) and quota.has_image(path):
            quota.unmount_image(path)

    def _cleanup_driver(self) -> None:
        for path in self._removing_leftovers():
            self._destroy(path)
        for n in self._disk_ids():
            d = self.home / n
            if quota.has_image(d):
                quota.unmount_image(d)

    # ----- create --------------------------------------------------------------------------

    def layer_chain(self, layer_id: str) -> list[Path]:
        """Directories of the layer's parents that hold a ``Files`` directory, nearest first."""
        return self._parent_dirs(self.chain(layer_id)[0])

    def _parent_dirs(self, rec: LayerRecord) -> list[Path]:
        """``layer_chain`` of *rec* (which may be incomplete: an apply is running)."""
        if rec.parent is None:
            return []
        return [d for r in self.chain(rec.parent)
                if (d := self._dir(r.id)).joinpath("Files").is_dir()]

    def _make_layer(self, rec: LayerRecord, parent: LayerRecord | None) -> None:
        d = self.home / rec.id
        os.mkdir(d, 0o700)
        chain: list[Path] = []
        if parent is not None:
            pdir = self._dir(parent.id)
            chain = ([pdir] if (pdir / "Files").is_dir() else []) + self.layer_chain(parent.id)
        if not rec.writable:
            os.mkdir(d / "Files", 0o755)
        else:
            explicit = rec.size_limit is not None
            if not explicit:
                rec.size_limit = self.sandbox_size  # nominal, recorded (moby's default)
            size = rec.size_limit if explicit else None
            why_copy = self._why_not_cow(parent)
            if why_copy is None:
                self._make_cow_sandbox(d, size)
            else:
                log.debug("windowsfilter: sandbox %s is a copy: %s", rec.id, why_copy)
                sandbox = self._make_sandbox(d, size)
                if parent is not None:
                    if parent.writable:
                        copy_tree(self._sandbox(parent), sandbox)
                    else:
                        self._materialize([self._dir(parent.id), *self.layer_chain(parent.id)],
                                          sandbox, link=False)
        atomic_write(d / LAYERCHAIN, json.dumps([str(p) for p in chain]).encode(), mode=0o600)

    # ----- copy-on-write sandboxes (overlayfs over the layers' views) ------------------------

    def _why_not_cow(self, parent: LayerRecord | None) -> str | None:
        """Why a sandbox on ``parent`` must be a copy (None: it is an overlay).  Builds the
        views of the chain's layers that have none yet (once per layer)."""
        if os.geteuid() != 0:
            return "overlay mounts and whiteouts need root"
        if parent is not None and parent.writable and not self._is_cow(parent):
            return f"its parent {parent.id} is a copy"
        chain = [r for r in (self.chain(parent.id) if parent is not None else [])
                 if not r.writable]
        dirs = [self._dir(r.id) for r in chain]
        try:
            for i, layer in enumerate(dirs):
                if (layer / "Files").is_dir():
                    build_view(layer, [p for p in dirs[i + 1:] if (p / "Files").is_dir()])
        except ViewConflict as exc:
            return str(exc)
        return None

    def _make_cow_sandbox(self, d: Path, size: int | None) -> None:
        if size is None:
            os.mkdir(d / UPPER, 0o755)
            os.mkdir(d / WORK, 0o700)
        else:
            self._make_sandbox(d, size)  # the image's diff/ and work/
        os.mkdir(d / MERGED, 0o755)
        atomic_write(d / COW_MARK, b"", mode=0o600)

    def _is_cow(self, rec: LayerRecord) -> bool:
        return rec.writable and (self._dir(rec.id) / COW_MARK).exists()

    def _upper(self, rec: LayerRecord) -> Path:
        """A copy-on-write sandbox's upper directory (the quota image's diff/ when sized)."""
        d = self._dir(rec.id)
        return self._sandbox(rec) if quota.has_image(d) else d / UPPER

    def _sources(self, rec: LayerRecord) -> list[Source]:
        """The lower layers of a copy-on-write sandbox, nearest first."""
        out: list[Source] = []
        for r in self.chain(rec.id)[1:]:
            d = self._dir(r.id)
            if r.writable:
                if not self._is_cow(r):
                    out.append(Source(self._sandbox(r), None, None))  # a whole tree
                    break
                out.append(Source(self._upper(r), None, None))
            elif (d / "Files").is_dir():
                lowers = [p for p in self.layer_chain(r.id)]
                out.append(Source(d / "Files", build_view(d, lowers), d))
        return out

    def _mount_cow(self, rec: LayerRecord, mount_label: str) -> Path:
        d = self._dir(rec.id)
        merged = d / MERGED
        if is_mounted(merged):
            return merged
        lowers: list[str] = []
        for src in self._sources(rec):
            if src.whiteouts is not None:
                lowers.append(str(src.whiteouts))
            lowers.append(str(src.files))
        upper = self._upper(rec)
        if not lowers:  # no parent: the lower is the empty view of nothing
            empty = d / EMPTY
            empty.mkdir(exist_ok=True)
            lowers.append(str(empty))
        home = str(self.home)
        opts = OverlayOptions(
            lowers=lowers, upper=str(upper), work=str(upper.parent / WORK),
            relative_lowers=[os.path.relpath(p, home) for p in lowers], relative_to=home,
            extra=["index=off", "redirect_dir=off", "metacopy=off"],
            label=mount_label if mount_label and os.path.isdir("/sys/fs/selinux") else "")
        try:
            mount_overlay(merged, opts)
        except OSError as exc:
            raise from_oserror(exc, f"windowsfilter: mounting sandbox {rec.id}") from exc
        return merged

    def _make_sandbox(self, d: Path, size: int | None) -> Path:
        if size is None:
            os.mkdir(d / SANDBOX, 0o755)
            return d / SANDBOX
        problem = quota.image_supported()
        if problem is not None:
            raise NotSupported(f"windowsfilter: cannot enforce a sandbox size here: {problem}")
        quota.check_size(size, self.name)
        return quota.create_image(d, size) / "diff"

    def _sandbox(self, rec: LayerRecord) -> Path:
        d = self._dir(rec.id)
        if quota.has_image(d):
            mp = quota.image_mount_point(d)
            if not is_mounted(mp):
                try:
                    quota.mount_image(d)
                except OSError as exc:
                    raise from_oserror(exc, f"windowsfilter: mounting the sandbox of {rec.id}") \
                        from exc
            return mp / "diff"
        return d / SANDBOX

    # ----- the merged view -----------------------------------------------------------------

    def _materialize(self, layers: list[Path], dst: Path, link: bool) -> None:
        """Build the union of the layers' ``Files`` (nearest first) into the directory ``dst``."""
        roots: list[int] = []
        tombs: list[set[str]] = []
        try:
            for layer in layers:
                lfd = os.open(layer, _DIR_FLAGS)
                try:
                    tombs.append({fold(t) for t in read_tombstones(lfd)})
                    roots.append(os.open("Files", _DIR_FLAGS, dir_fd=lfd))
                finally:
                    os.close(lfd)
            dfd = os.open(dst, _DIR_FLAGS)
            try:
                _merge_dir(dfd, "", [(i, fd) for i, fd in enumerate(roots)], tombs, link)
            finally:
                os.close(dfd)
        finally:
            for fd in roots:
                os.close(fd)

    def _mount(self, rec: LayerRecord, mount_label: str) -> Path:
        if self._is_cow(rec):
            return self._mount_cow(rec, mount_label)
        if rec.writable:
            return self._sandbox(rec)
        d = self._dir(rec.id)
        target = d / MERGED
        tmp = d / (MERGED + ".tmp")
        unmount_all_under(os.path.realpath(target))
        for stale in (target, tmp):
            if os.path.lexists(stale):
                remove_tree(stale)
        os.mkdir(tmp, 0o755)
        try:
            self._materialize([d, *self.layer_chain(rec.id)], tmp, link=True)
            os.rename(tmp, target)
        except BaseException:
            remove_tree(tmp)
            raise
        _protect(target)
        return target

    def _unmount(self, rec: LayerRecord) -> None:
        if self._is_cow(rec):
            merged = self._dir(rec.id) / MERGED
            while is_mounted(merged):
                unmount(merged, detach=True)
        elif not rec.writable:
            target = self._dir(rec.id) / MERGED
            unmount_all_under(os.path.realpath(target))
            remove_tree(target)

    def _mount_path(self, rec: LayerRecord) -> Path:
        if rec.writable and not self._is_cow(rec):
            return self._sandbox(rec)
        return self._dir(rec.id) / MERGED

    def _is_mounted(self, layer_id: str) -> bool:
        rec = self.meta.read(layer_id)
        if rec is not None and self._is_cow(rec):
            return is_mounted(self._dir(layer_id) / MERGED)
        if rec is None or rec.writable:
            return True
        return (self._dir(layer_id) / MERGED).is_dir()

    # ----- facts ---------------------------------------------------------------------------

    def _status(self) -> list[tuple[str, str]]:
        return [("Windows", ""), ("Backing Filesystem", fs_name(self.home)),
                ("Default Sandbox Size", str(self.sandbox_size))]

    def _metadata(self, rec: LayerRecord) -> dict[str, str]:
        return {"dir": str(self._dir(rec.id))}

    @contextlib.contextmanager
    def _layer_fd(self, rec: LayerRecord) -> Iterator[int]:
        fd = os.open(self._dir(rec.id), _DIR_FLAGS)
        try:
            yield fd
        finally:
            os.close(fd)

    # ----- changes, diff, size -------------------------------------------------------------

    def changes(self, layer_id: str, parent: str | None = None) -> list[Change]:
        rec = self.record(layer_id)
        self.resolve_parent(layer_id, parent)
        if self._is_cow(rec):
            kinds = {"A": ChangeKind.ADD, "C": ChangeKind.MODIFY}
            return sorted(Change(item.path, ChangeKind.DELETE if item.kind == "whiteout"
                                 else kinds[item.change])
                          for item in walk_sandbox(self._upper(rec), self._sources(rec),
                                                   layer_id))
        if rec.writable:
            return super().changes(layer_id, parent)
        out = []
        with self._layer_fd(rec) as fd:
            for item in walk_layer(fd):
                kind = ChangeKind.DELETE if item.kind == "whiteout" else ChangeKind.MODIFY
                out.append(Change(item.path, kind))
        return sorted(out)

    def diff_size(self, layer_id: str, parent: str | None = None) -> int:
        rec = self.record(layer_id)
        self.resolve_parent(layer_id, parent)
        if self._is_cow(rec):
            return sandbox_size(self._upper(rec), self._sources(rec), layer_id)
        if rec.writable:
            return super().diff_size(layer_id, parent)
        total = 0
        with self._layer_fd(rec) as fd:
            for item in walk_layer(fd):
                if item.st is not None and item.link_to is None and stat.S_ISREG(item.st.st_mode):
                    total += item.st.st_size
        return total

    def write_diff(self, out_fd: int, layer_id: str, parent: str | None = None,
                   progress: Callable[[int], None] | None = None) -> None:
        rec = self.record(layer_id)
        if rec.writable and not self._is_cow(rec):
            super().write_diff(out_fd, layer_id, parent, progress)
            return
        try:
            if rec.writable:
                write_sandbox_tar(out_fd, self._upper(rec), self._sources(rec), layer_id,
                                  progress)
                return
            with self._layer_fd(rec) as fd:
                write_layer_tar(out_fd, fd, progress)
        except GraphDriverError:
            raise
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise
            raise from_oserror(exc, f"windowsfilter: diff of {layer_id}") from exc

    def diff_getter(self, layer_id: str) -> Any:
        rec = self.record(layer_id)
        if self._is_cow(rec):
            return SandboxFiles(self._upper(rec))
        if rec.writable:
            return super().diff_getter(layer_id)
        return LayerFiles(self._dir(rec.id))

    # ----- apply ---------------------------------------------------------------------------

    def _apply_target(self, rec: LayerRecord) -> Path:
        return self._dir(rec.id)  # the tar's Files/, Hives/, ... are the layer directory's

    def _apply_stream(self, rec: LayerRecord, fd: int, opts: ApplyOptions) -> ApplyResult:
        """Import the Windows layer tar on *fd* into a clone of the layer, swapped in on success
        (a failed import leaves the layer as it was)."""
        if rec.writable:
            raise NotSupported(
                f"windowsfilter: {rec.id} is a sandbox; Windows layer tars are imported "
                "into read-only layers (create without --rw)")
        d = self._dir(rec.id)
        parents = self._parent_dirs(rec)
        staging = d / STAGING
        try:
            if os.path.lexists(staging):
                remove_tree(staging)
            os.mkdir(staging, 0o700)
            _clone_layer(d, staging)
            result = import_windows_confined(fd, staging, opts, parents=parents)
        except BaseException:
            with contextlib.suppress(OSError):
                remove_tree(staging)
            raise
        # The swap: a crash from here on leaves the layer incomplete.
        _swap_in(d, staging)
        atomic_write(d / LAYERCHAIN, json.dumps([str(p) for p in parents]).encode(), mode=0o600)
        return result

    def _tarsplit_resolver(self) -> Resolver:
        """Names matched as NTFS matches them: a tar naming ``Files/dir/a`` after ``Files/Dir``
        stored ``Files/Dir/a``, and its exact diff reads that file (the diff getter resolves the
        name the same way)."""
        return stored_path

    def _quota_available(self) -> bool:
        return quota.image_supported() is None

    def _looks_like_layer(self, path: Path) -> bool:
        return os.path.isfile(path / LAYERCHAIN)

    def _freeze(self, rec: LayerRecord) -> None:
        raise NotSupported(f"windowsfilter: {rec.id} is a sandbox; a sandbox cannot become a "
                           "read-only layer in place")


_MS_REMOUNT = 0x20
_MS_BIND = 0x1000


def _protect(target: Path) -> None:
    """Make the merged tree read-only (a read-only bind mount of itself) where we may mount.

    Its files are hard links to the layers' files: the mount keeps a write through the view from
    changing a layer.  Without the privilege to mount (not root) the tree stays a plain
    directory, to be read only by convention.
    """
    if not real_root():
        return
    real = Path(os.path.realpath(target))
    try:
        mount(str(real), real, "", _MS_BIND)
    except OSError as exc:
        log.debug("windowsfilter: no read-only bind mount of %s: %s", real, exc)
        return
    try:
        mount("", real, "", _MS_REMOUNT | _MS_BIND | MS_RDONLY)
    except OSError:
        unmount_all_under(real)
        raise


class SandboxFiles:
    """DiffGetter of a copy-on-write sandbox: ``Files/…`` paths read from its upper directory
    (the files its diff carries)."""

    def __init__(self, upper: Path) -> None:
        self._fd = os.open(upper, _DIR_FLAGS)

    def open(self, path: str) -> BinaryIO:
        rel = path.lstrip("/")
        if rel.startswith("Files/"):
            rel = rel[len("Files/"):]
        return os.fdopen(open_beneath(self._fd, rel, os.O_RDONLY), "rb")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LayerFiles:
    """DiffGetter of a read-only layer: paths as in its tar (``Files/…``), BCD from backups."""

    def __init__(self, layer_dir: Path) -> None:
        self._fd = os.open(layer_dir, _DIR_FLAGS)

    def open(self, path: str) -> BinaryIO:
        rel = path.lstrip("/")
        bak = MUTATED_FILES.get(rel)
        if bak is not None:
            with contextlib.suppress(FileNotFoundError):
                return os.fdopen(os.open(bak, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                         dir_fd=self._fd), "rb")
        try:
            return os.fdopen(open_beneath(self._fd, rel, os.O_RDONLY), "rb")
        except FileNotFoundError:
            folded = stored_path(self._fd, rel)
            if folded is None:
                raise
            return os.fdopen(open_beneath(self._fd, folded, os.O_RDONLY), "rb")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# ----- helpers: merge, clone, swap ---------------------------------------------------------


def _merge_dir(dst: int, rel: str, sources: list[tuple[int, int]], tombs: list[set[str]],
               link: bool) -> None:
    """Union of the ``sources`` directories (layer index, fd; nearest first) into ``dst``."""
    winners: dict[str, tuple[str, int, int, os.stat_result]] = {}  # key -> name, layer, fd, st
    below: dict[str, list[tuple[int, int]]] = {}  # key -> lower dirs merged into a winner dir
    cut: set[str] = set()
    for layer, fd in sources:
        for name in sorted(os.listdir(fd), key=os.fsencode):
            if ":" in name:
                continue  # alternate data streams are not part of the view
            key = fold(name)
            path_key = f"{fold(rel)}/{key}" if rel else key
            if any(path_key in tombs[j] for j in range(layer)):
                continue  # deleted by a nearer layer
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if key not in winners:
                winners[key] = (name, layer, fd, st)
                below[key] = []
            elif key not in cut:
                if stat.S_ISDIR(winners[key][3].st_mode) and stat.S_ISDIR(st.st_mode):
                    sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    below[key].append((layer, sub))
                else:
                    cut.add(key)  # a nearer non-directory hides what is below it
    try:
        for key in sorted(winners):
            name, layer, fd, st = winners[key]
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                os.mkdir(name, 0o755, dir_fd=dst)
                top = os.open(name, _DIR_FLAGS, dir_fd=fd)
                sub_dst = os.open(name, _DIR_FLAGS, dir_fd=dst)
                try:
                    _copy_win_xattrs(top, sub_dst)
                    _merge_dir(sub_dst, f"{rel}/{name}" if rel else name,
                               [(layer, top), *below[key]], tombs, link)
                    os.utime(sub_dst, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(top)
                    os.close(sub_dst)
            elif stat.S_ISREG(mode):
                if link:
                    os.link(name, name, src_dir_fd=fd, dst_dir_fd=dst, follow_symlinks=False)
                else:
                    _copy_file(fd, dst, name, st)
            elif stat.S_ISLNK(mode):
                os.symlink(os.readlink(name, dir_fd=fd), name, dir_fd=dst)
                os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst,
                         follow_symlinks=False)
    finally:
        for subs in below.values():
            for _, sub in subs:
                os.close(sub)


def _copy_win_xattrs(src: int, dst: int) -> None:
    for n in os.listxattr(src):
        if n.startswith(XATTR_PREFIX):
            os.setxattr(dst, n, os.getxattr(src, n))


def _copy_file(sdir: int, ddir: int, name: str, st: os.stat_result) -> None:
    sfd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sdir)
    try:
        dfd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o644, dir_fd=ddir)
        try:
            copy_file_data(sfd, dfd, st.st_size)
            _copy_win_xattrs(sfd, dfd)
            os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _clone_layer(src: Path, dst: Path) -> None:
    """Hard-link clone of a layer's content (an import replaces files, never edits them)."""
    for name in _LAYER_CONTENT:
        s = src / name
        if not os.path.lexists(s):
            continue
        if s.is_dir() and not s.is_symlink():
            if name == "Files" and not any(os.scandir(s)) and not _has_win_xattrs(s):
                continue  # a fresh layer: nothing to clone
            _link_tree(s, dst / name)
        else:
            os.link(s, dst / name, follow_symlinks=False)


def _has_win_xattrs(path: Path) -> bool:
    return any(n.startswith(XATTR_PREFIX) for n in os.listxattr(path))


def _link_tree(src: Path, dst: Path) -> None:
    st = os.lstat(src)
    os.mkdir(dst, 0o755)
    for n in os.listxattr(src):
        if n.startswith(XATTR_PREFIX):
            os.setxattr(dst, n, os.getxattr(src, n))
    for entry in os.scandir(src):
        s, d = Path(entry.path), dst / entry.name
        if entry.is_dir(follow_symlinks=False):
            _link_tree(s, d)
        else:
            os.link(s, d, follow_symlinks=False)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _swap_in(d: Path, staging: Path) -> None:
    old = d / ".old"
    if os.path.lexists(old):
        remove_tree(old)
    os.mkdir(old, 0o700)
    for name in _LAYER_CONTENT:
        if os.path.lexists(d / name):
            os.rename(d / name, old / name)
    for name in _LAYER_CONTENT:
        if os.path.lexists(staging / name):
            os.rename(staging / name, d / name)
    if not (d / "Files").is_dir():
        os.mkdir(d / "Files", 0o755)
    remove_tree(old)
    remove_tree(staging)


DRIVER = WindowsFilterDriver
