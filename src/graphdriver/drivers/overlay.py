"""overlay: kernel overlayfs with moby overlay2's on-disk layout.

Layout of the driver home (as ``/var/lib/docker/overlay2``)::

    <id>/diff        the layer's own files (overlay's upper dir while it is writable)
    <id>/link        its 26-character short id
    <id>/lower       ``l/A:l/B`` — its ancestors' short links, nearest first (not in base layers)
    <id>/work        overlay's work dir          (not in base layers)
    <id>/merged      where the assembled tree is mounted (not in base layers)
    <id>/committed   written when the layer gets its first child: it then mounts read-only
    l/<short>        -> ../<id>/diff
    meta/ locks/     the shared layer records and locks (store.py)

``get`` of a layer without a parent returns its ``diff`` directly.  Any other layer is an overlay
mounted at ``merged``: lowers are the ancestors' diffs (through the short links), the upper is its
own ``diff`` — unless the layer is committed, when its ``diff`` becomes the top lower and the
mount is read-only.  Mounts use the new mount API with one ``lowerdir+`` per layer (mount.py),
so chains never hit mount(2)'s one-page limit; still, more than 128 lowers are refused as moby
does, which is also what makes the relative ``l/A:l/B`` fallback fit one page.

Whiteouts are stored in overlay form (0/0 character devices, ``trusted.overlay.opaque=y``; in a
store made rootless, whose marker records the ``user`` namespace, ``user.overlay.opaque=y`` and
every mount has ``userxattr``).
Against the recorded parent, ``changes`` reads only the layer's ``diff`` plus lookups in the
lowers (archive.changes.overlay_changes), ``diff`` is a tar of ``diff`` with whiteouts converted
back to ``.wh.`` entries (moby overlay2's native Diff) and ``diff_size`` is the size of ``diff``
(moby's directory.Size); against any other parent the base class's naive comparison is used.

Quotas (quota.py): on btrfs the ``<id>`` directory of a sized writable layer is a subvolume with a
qgroup limit.  Elsewhere ``<id>/quota.img`` is an ext4 image loop-mounted at ``<id>/quota``; it
holds ``diff`` and ``work``, and ``<id>/diff`` / ``<id>/work`` are symlinks ``quota/diff`` /
``quota/work``, so every path above (and ``l/<short>``) stays valid while the image is mounted.
The image is mounted again lazily whenever the layer (or a child of it) is used.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

from .. import TYPE_CHECKING, quota
from ..archive.whiteout import OVERLAY, OVERLAY_USERXATTR
from ..errors import (
    GraphDriverError,
    InvalidArgument,
    NotSupported,
    from_oserror,
)
from ..fsutil import copy_dir_attributes, fs_name, remove_tree, supports_d_type
from ..idmap import real_root
from ..layers import REMOVING_SUFFIX, RESERVED_IDS, LayerRecord, is_valid_id
from ..locking import FileLock
from ..logs import get_logger
from ..mount import OverlayOptions, is_mounted, mount_overlay, unmount, unmount_all_under
from ..store import LayerStore

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..archive.changes import Change
    from ..archive.options import ApplyOptions, ApplyResult
    from ..archive.recorded import RecordedLayer

log = get_logger("graphdriver")

MAX_DEPTH = 128
LINK_DIR = "l"
SHORT_ID_LEN = 26


def _short_id() -> str:
    import base64

    # os.urandom is what secrets.token_bytes returns; secrets would load hmac and OpenSSL
    return base64.b32encode(os.urandom(16)).decode()[:SHORT_ID_LEN]


def _read_text(path: Path | str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return ""
    try:
        return os.read(fd, 1 << 16).decode().strip()  # a lower list of 128 links is ~3.8 kB
    finally:
        os.close(fd)


def _write_text(path: str, text: str) -> None:
    """A small file of a layer being made (the record, written after, is the commit point)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


class OverlayDriver(LayerStore):
    name = "overlay"
    home_names = frozenset({LINK_DIR, ".overlay-options"})
    whiteout_format = OVERLAY
    mounts = True
    supports_quota = True

    # ----- setup ---------------------------------------------------------------------------

    def _init_driver(self) -> None:
        self.links = self.home / LINK_DIR
        with open("/proc/filesystems", encoding="ascii") as f:
            if not any(line.split()[-1:] == ["overlay"] for line in f if line.strip()):
                raise NotSupported("overlay: the kernel has no overlayfs (/proc/filesystems)")
        self.backing_fs = fs_name(self.home)
        if self.backing_fs == "overlayfs":
            raise NotSupported(f"overlay: {self.home} is itself on overlayfs")
        if not supports_d_type(self.home):
            raise NotSupported(
                f"overlay: the backing filesystem ({self.backing_fs}) of {self.home} "
                "does not support d_type"
            )
        self.links.mkdir(exist_ok=True, mode=0o700)
        #: ``<home>/``: the hot paths (create, remove, mount_spec) join strings, not Paths
        self._prefix = f"{self.home}/"
        #: short links (``l/<short>``) of layers known to have no quota image
        self._imageless_links: set[str] = set()
        self.mount_extra: list[str] = []
        if self._xattr_namespace() == "user":  # made rootless (DESIGN.md rule 7)
            self.whiteout_format = OVERLAY_USERXATTR
            self.mount_extra.append("userxattr")
        elif not real_root():
            raise NotSupported(f"overlay: {self.home} was made by root (trusted.overlay "
                               "xattrs, which only root can read); use it as root, or use "
                               "another --root")
        self._probe_mount()
        self.quota_kind = "btrfs" if self.backing_fs == "btrfs" else "image"
        if self.default_size:
            quota.check_size(self.default_size, self.name)
            if self.quota_problem:
                raise NotSupported(f"overlay: the size option: {self.quota_problem}")

    @functools.cached_property
    def quota_problem(self) -> str | None:
        """None when size quotas work here, else why not: looked up when first needed (a
        size, the status), not at every open (its PATH walk and shutil's import are ~2 ms of
        every command)."""
        return quota.btrfs_supported() if self.quota_kind == "btrfs" else quota.image_supported()

    def _probe_mount(self) -> None:
        """Real test mounts in the home (cached there per kernel, like moby's probes).

        The plain mount must work; then each of ``index=off`` (no inode index: layers are
        moved between stores), ``redirect_dir=off`` and ``metacopy=off`` (an upper directory
        then holds every changed path under its own name, which the native diff relies on —
        a distribution may turn either on by default) is kept when this kernel knows it.
        """
        release = os.uname().release
        cache = self.home / ".overlay-options"
        cached = _read_text(cache)
        if cached.startswith(release + " "):
            self.mount_extra += [o for o in cached.split()[1:] if o != "-"]
            return
        probe = self.home / f".probe-{os.getpid()}"
        remove_tree(probe)
        extra: list[str] = []
        try:
            for sub in ("l1", "l2", "u", "w", "m"):
                (probe / sub).mkdir(parents=True)
            try:
                self._probe_once(probe, extra)
            except OSError as exc:
                raise NotSupported(f"overlay: a test mount in {self.home} failed: "
                                   f"{exc.strerror or exc}") from exc
            for opt in ("index=off", "redirect_dir=off", "metacopy=off"):
                try:
                    self._probe_once(probe, [*extra, opt])
                except OSError:
                    continue
                extra.append(opt)
        finally:
            with contextlib.suppress(OSError):
                unmount_all_under(probe)
            remove_tree(probe)
        self.mount_extra += extra
        tmp = cache.with_name(cache.name + f".{os.getpid()}")
        tmp.write_text(f"{release} {' '.join(extra) or '-'}\n", encoding="utf-8")
        os.replace(tmp, cache)

    def _probe_once(self, probe: Path, extra: list[str]) -> None:
        opts = OverlayOptions(
            lowers=[str(probe / "l1"), str(probe / "l2")], upper=str(probe / "u"),
            work=str(probe / "w"), extra=[*self.mount_extra, *extra],
        )
        mount_overlay(probe / "m", opts)
        unmount(probe / "m")

    # ----- paths ---------------------------------------------------------------------------

    def _dir(self, layer_id: str) -> Path:
        return self.home / layer_id

    def _short(self, layer_id: str) -> str:
        return _read_text(f"{self._prefix}{layer_id}/link")

    def _lowers(self, layer_id: str) -> list[str]:
        """Short links of the ancestors (``l/A``), nearest first."""
        text = _read_text(f"{self._prefix}{layer_id}/lower")
        return [p for p in text.split(":") if p] if text else []

    def _has_image(self, layer_id: str) -> bool:
        return os.path.lexists(f"{self._prefix}{layer_id}/{quota.IMAGE_NAME}")

    def _layer_paths(self, layer_id: str) -> list[Path]:
        paths = [Path(f"{self._prefix}{layer_id}")]
        short = self._short(layer_id)
        if short and "/" not in short and short not in (".", ".."):
            paths.insert(0, Path(f"{self._prefix}{LINK_DIR}/{short}"))
        return paths

    def _disk_ids(self) -> set[str]:
        # the directory's own entry types (no stat per layer: every open repairs)
        with os.scandir(self.home) as it:
            return {e.name for e in it
                    if not (e.name in RESERVED_IDS or e.name.startswith(".")
                            or e.name.endswith(REMOVING_SUFFIX))
                    and e.is_dir(follow_symlinks=False)}

    def _removing_owner(self, leftover: Path) -> str | None:
        if leftover.parent != self.links:
            return super()._removing_owner(leftover)
        try:  # a link is named by its short id: its target names the layer (``../ID/diff``)
            parts = os.readlink(leftover).split("/")
        except OSError:
            return None
        return parts[1] if len(parts) == 3 and parts[0] == ".." and is_valid_id(parts[1]) else None

    def _removing_leftovers(self) -> list[Path]:
        names = set(os.listdir(self.home))
        out = [self.home / n for n in sorted(names) if n.endswith(REMOVING_SUFFIX)]
        with os.scandir(self.links) as it:
            links = sorted(it, key=lambda e: e.name)
        for entry in links:
            path = self.links / entry.name
            if entry.name.endswith(REMOVING_SUFFIX):
                out.append(path)
                continue
            # A link whose layer directory is gone (a crash between its steps).
            target = os.readlink(path) if entry.is_symlink() else ""
            parts = target.split("/")
            if len(parts) == 3 and parts[0] == ".." and parts[1] not in names \
                    and not os.path.lexists(self.home / parts[1]):
                out.append(path)
        return out

    def _destroy(self, path: Path) -> None:
        self._destroy_paths([path])

    def _destroy_paths(self, paths: list[Path]) -> None:
        """Unmount anything beneath (never follow a mount into another layer), then delete; one
        read of the mount table for all the paths."""
        where = paths[0] if paths else self.home
        try:
            self._detach_paths(paths)
            for where in paths:
                if quota.is_subvolume(where):
                    for sub in os.listdir(where):
                        remove_tree(where / sub)
                    quota.btrfs_delete_subvolume(where)
                else:
                    remove_tree(where)
        except OSError as exc:
            raise from_oserror(exc, f"overlay: removing {where}") from exc

    def _detach(self, path: Path) -> None:
        self._detach_paths([path])

    def _detach_paths(self, paths: list[Path]) -> None:
        # a short link: nothing is mounted at or beneath a symlink's own path
        dirs = [p for p in paths if not os.path.islink(p)]
        unmount_all_under(*dirs)  # the quota images' mounts too
        for path in dirs:
            if os.path.lexists(f"{path}/{quota.IMAGE_NAME}"):
                quota.unmount_image(path)  # and its loop device

    # ----- create --------------------------------------------------------------------------

    def _make_layer(self, rec: LayerRecord, parent: LayerRecord | None) -> None:
        d = f"{self._prefix}{rec.id}"
        lower = ""
        if parent is not None:
            pshort = self._short(parent.id)
            if not pshort:
                raise GraphDriverError(f"overlay: parent {parent.id} has no short link")
            plowers = self._lowers(parent.id)
            if len(plowers) + 1 > MAX_DEPTH:
                raise InvalidArgument(
                    f"overlay: layer {rec.id} would have {len(plowers) + 1} lower layers "
                    f"(max {MAX_DEPTH})"
                )
            lower = ":".join([f"{LINK_DIR}/{pshort}", *plowers])
        size = rec.size_limit if rec.writable else None
        uid, gid = self.idmap.root_pair()
        if size:
            if self.quota_problem:
                raise NotSupported(f"overlay: size quotas: {self.quota_problem}")
            quota.check_size(size, self.name)
        try:
            if size and self.quota_kind == "btrfs":
                quota.btrfs_enable_quota(self.home)
                quota.btrfs_create_subvolume(Path(d))
                os.chmod(d, 0o700)
                quota.btrfs_limit(Path(d), size)
            else:
                os.mkdir(d, 0o700)
            if size and self.quota_kind == "image":
                quota.create_image(Path(d), size, uid, gid)
                os.symlink(f"{quota.MOUNT_NAME}/diff", f"{d}/diff")
                os.symlink(f"{quota.MOUNT_NAME}/work", f"{d}/work")
            else:
                os.mkdir(f"{d}/diff", 0o755)
                if (uid, gid) != (os.geteuid(), os.getegid()):
                    os.chown(f"{d}/diff", uid, gid)
            if parent is not None:
                # the root is every layer's implicit parent: it shows the parent's root (mode,
                # owner, times, xattrs), as overlayfs' copy-up would (issue 15 rules 5 and 7)
                copy_dir_attributes(self._diff_dir(parent.id),  # (quota images: their diff)
                                    Path(os.path.realpath(f"{d}/diff")),
                                    skip_xattrs=self.whiteout_format.xattr_prefix)
            short = _short_id()
            _write_text(f"{d}/link", short)
            if lower:
                _write_text(f"{d}/lower", lower)
                if not os.path.lexists(f"{d}/work"):
                    os.mkdir(f"{d}/work", 0o700)
                os.mkdir(f"{d}/merged", 0o700)
            os.symlink(f"../{rec.id}/diff", f"{self._prefix}{LINK_DIR}/{short}")
        except OSError as exc:
            raise from_oserror(exc, f"overlay: creating layer {rec.id}") from exc

    def _on_first_child(self, parent: LayerRecord) -> None:
        _write_text(f"{self._prefix}{parent.id}/committed", "")

    def _rename_layer(self, old_id: str, new_id: str) -> None:
        """Rename the layer directory, then point its short link at the new name."""
        short = self._short(old_id)
        os.rename(self._dir(old_id), self._dir(new_id))
        if short:
            tmp = self.links / f".{short}.{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.symlink(f"../{new_id}/diff", tmp)
            os.replace(tmp, self.links / short)

    def _quota_available(self) -> bool:
        return self.quota_problem is None

    def _looks_like_layer(self, path: Path) -> bool:
        return is_valid_id(path.name) and os.path.lexists(path / "diff")

    # ----- quota images --------------------------------------------------------------------

    def _ensure_image(self, layer_id: str) -> bool:
        """Mount the layer's quota image if it has one and it is not mounted (lazy restore);
        whether it has one."""
        if not self._has_image(layer_id):
            return False
        d = self._dir(layer_id)
        if is_mounted(quota.image_mount_point(d)):
            return True
        with FileLock(d / "quota.lock"):
            try:
                if quota.mount_image(d):
                    log.info("overlay: mounted the quota image of %s", layer_id)
            except OSError as exc:
                raise from_oserror(exc, f"overlay: mounting the quota image of {layer_id}") \
                    from exc
        return True

    def _ensure_chain_images(self, layer_id: str, lowers: list[str] | None = None) -> bool:
        """Mount the quota images of the layer and its lowers (*lowers*: its ``_lowers``, when
        read already); whether the layer itself has one."""
        own = self._ensure_image(layer_id)
        for link in self._lowers(layer_id) if lowers is None else lowers:
            if link in self._imageless_links:
                continue
            lower = os.readlink(self._prefix + link).split("/")[1]  # ../<id>/diff
            if self._has_image(lower):
                self._ensure_image(lower)
            else:
                # A layer's image is made before its short link, and a link (random) is never
                # reused: a link seen without an image stays without one.
                self._imageless_links.add(link)
        return own

    def _diff_dir(self, layer_id: str, has_image: bool | None = None) -> Path:
        """The real directory of the layer's files (the image's ``diff`` for a quota layer);
        *has_image*: what ``_ensure_image`` said just before (else it is asked here)."""
        if has_image is None:
            has_image = self._ensure_image(layer_id)
        if has_image:
            return quota.image_mount_point(self._dir(layer_id)) / "diff"
        return Path(f"{self._prefix}{layer_id}/diff")

    # ----- mounts --------------------------------------------------------------------------

    def _mount(self, rec: LayerRecord, mount_label: str) -> Path:
        d = self._dir(rec.id)
        self._ensure_chain_images(rec.id)
        lowers = self._lowers(rec.id)
        if not lowers:
            return self._diff_dir(rec.id)
        merged = d / "merged"
        if is_mounted(merged):
            return merged  # mounted by a process whose count was lost: reuse it
        opts = self._overlay_options(rec.id, readonly=os.path.exists(d / "committed"))
        opts.label = mount_label if mount_label and os.path.isdir("/sys/fs/selinux") else ""
        try:
            mount_overlay(merged, opts)
        except OSError as exc:
            raise from_oserror(exc, f"overlay: mounting layer {rec.id}") from exc
        return merged

    def _overlay_options(self, layer_id: str, readonly: bool, lowers: list[str] | None = None,
                         has_image: bool | None = None) -> OverlayOptions:
        """The overlay that assembles a layer with lowers: its ancestors' short links (absolute,
        nearest first) under its own ``diff`` as the upper — or, read-only, as the top lower.
        *lowers* and *has_image*: the layer's ``_lowers`` and image, when known already."""
        rel = self._lowers(layer_id) if lowers is None else list(lowers)
        upper = work = None
        if readonly:
            rel.insert(0, f"{LINK_DIR}/{self._short(layer_id)}")
        else:
            upper = str(self._diff_dir(layer_id, has_image))
            work = upper.removesuffix("diff") + "work"
        return OverlayOptions(
            lowers=[self._prefix + p for p in rel], upper=upper, work=work,
            relative_lowers=rel, relative_to=str(self.home),
            readonly=readonly, extra=list(self.mount_extra),
        )

    def mount_spec(self, layer_id: str, readonly: bool = False) -> tuple[str, str, list[str]]:
        """How another process mounts the layer's tree: (type, source, options) as containerd's
        overlayfs snapshotter returns them — a ``bind`` of ``diff`` for a layer without lowers
        (``ro`` when *readonly*), else an ``overlay`` with ``lowerdir`` (absolute short links,
        so 128 fit one page) and, unless *readonly*, ``upperdir``/``workdir``."""
        self.record(layer_id)
        lowers = self._lowers(layer_id)
        has_image = self._ensure_chain_images(layer_id, lowers)
        if not lowers:
            return ("bind", str(self._diff_dir(layer_id, has_image)),
                    ["ro" if readonly else "rw", "rbind"])
        opts = self._overlay_options(layer_id, readonly, lowers, has_image)
        options = list(opts.extra)
        if opts.upper is not None:
            options += [f"workdir={opts.work}", f"upperdir={opts.upper}"]
        options.append("lowerdir=" + ":".join(opts.lowers))
        return "overlay", "overlay", options

    def _unmount(self, rec: LayerRecord) -> None:
        merged = self._dir(rec.id) / "merged"
        while is_mounted(merged):
            unmount(merged, detach=True)

    def _mount_path(self, rec: LayerRecord) -> Path:
        if not self._lowers(rec.id):
            return self._diff_dir(rec.id)
        return self._dir(rec.id) / "merged"

    def _is_mounted(self, layer_id: str) -> bool:
        d = self._dir(layer_id)
        if not self._lowers(layer_id):
            return not quota.has_image(d) or is_mounted(quota.image_mount_point(d))
        return is_mounted(d / "merged")

    def _apply_target(self, rec: LayerRecord) -> Path:
        self._ensure_chain_images(rec.id)
        return self._diff_dir(rec.id)

    def _apply_stream(self, rec: LayerRecord, fd: int, opts: ApplyOptions) -> ApplyResult:
        """The tar engine's apply, with the parent chain's diffs read-only beside it: whiteouts
        with nothing to hide, implicit parents and an opaque root depend on them."""
        from ..archive.isolate import apply_confined

        return apply_confined(fd, self._apply_target(rec), opts, lowers=self._lower_diffs(rec.id))

    def _cleanup_driver(self) -> None:
        for name in sorted(self._disk_ids()):
            d = self._dir(name)
            with contextlib.suppress(OSError):
                self._unmount_layer_dir(d)
        with contextlib.suppress(OSError):
            unmount_all_under(self.home, include_self=False)

    def _unmount_layer_dir(self, d: Path) -> None:
        merged = d / "merged"
        while is_mounted(merged):
            unmount(merged, detach=True)
        if quota.has_image(d):
            quota.unmount_image(d)

    # ----- native diffs --------------------------------------------------------------------

    def _native(self, layer_id: str, parent: str | None) -> bool:
        return parent == self.record(layer_id).parent

    def _lower_diffs(self, layer_id: str) -> list[Path]:
        self._ensure_chain_images(layer_id)
        return [Path(os.path.realpath(self.home / p)) for p in self._lowers(layer_id)]

    def _parent_roots(self, rec: LayerRecord) -> list[Path] | None:
        return self._lower_diffs(rec.id)

    def _walk_changes(self, layer_id: str, parent: str | None) -> list[Change]:
        from ..archive.changes import overlay_changes

        if not self._native(layer_id, parent):
            return super()._walk_changes(layer_id, parent)
        return overlay_changes(self._diff_dir(layer_id), self._lower_diffs(layer_id),
                               self.whiteout_format)

    def _recorded_size(self, layer: RecordedLayer) -> int:
        return layer.tree_size()  # what the walk of ``diff`` counts: all the layer holds

    def _walk_size(self, layer_id: str, parent: str | None) -> int:
        if not self._native(layer_id, parent):
            return super()._walk_size(layer_id, parent)
        from ..archive.changes import tree_size

        try:
            return tree_size(self._diff_dir(layer_id))
        except OSError as exc:
            raise from_oserror(exc, f"overlay: size of layer {layer_id}") from exc

    def write_diff(self, out_fd: int, layer_id: str, parent: str | None = None,
                   progress: Callable[[int], None] | None = None) -> None:
        from ..archive.export import write_tree

        if not self._native(layer_id, parent):
            super().write_diff(out_fd, layer_id, parent, progress)
            return
        write_tree(out_fd, self._diff_dir(layer_id), whiteout_format=self.whiteout_format,
                   idmap=self.idmap, progress=progress)

    # ----- facts ---------------------------------------------------------------------------

    def _status(self) -> list[tuple[str, str]]:
        if self.quota_problem:
            quota_text = f"no ({self.quota_problem})"
        elif self.quota_kind == "btrfs":
            quota_text = "btrfs qgroups"
        else:
            quota_text = "loop-mounted ext4 images"
        return [
            ("Backing Filesystem", self.backing_fs),
            ("Supports d_type", "true"),
            ("Native Overlay Diff", "true"),
            ("Size Quotas", quota_text),
        ]

    def _metadata(self, rec: LayerRecord) -> dict[str, str]:
        d = self._dir(rec.id)
        meta = {"UpperDir": str(d / "diff")}
        lowers = self._lowers(rec.id)
        if lowers:
            meta["LowerDir"] = ":".join(
                str(self.home / os.readlink(self.home / p).removeprefix("../")) for p in lowers
            )
            meta["WorkDir"] = str(d / "work")
            meta["MergedDir"] = str(d / "merged")
        return meta


DRIVER = OverlayDriver
