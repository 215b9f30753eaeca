"""``ImageStore``: images as records over a Driver's layers (DESIGN.md rule 6).

Owns resolving local references (tag, name@digest, ID or 12+ hex prefix), committing an image
(its layers held as ``image:<id>``, then one metadata transaction: the commit point), the layer
mechanics every producer shares (reuse a layer only when its record says the image store made it
with that diffID; otherwise ``commit_new_layer`` under the chain ID), tag, rm, prune, mount.
Imports the Driver only as an object it is handed; never ``cli`` and never a driver module.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import AlreadyExists, GraphDriverError, InUse, InvalidArgument, NotFound
from ..locking import FileLock
from ..store import signals_redelivered
from . import reference
from .manifest import ImageConfig, chain_id, hex_of, parse_config
from .metadata import BlobSource, ImageRecord, MetadataStore
from .platform import check_os

MADE_BY = "image"
MS_BIND = 0x1000
MS_REMOUNT = 0x20


def holder_for(image_id: str) -> str:
    return f"image:{image_id}"


@dataclass(frozen=True)
class Image:
    """A local image: its record and its parsed config."""

    record: ImageRecord
    config: ImageConfig

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def top_layer(self) -> str | None:
        return self.record.layers[-1] if self.record.layers else None


class ImageStore:
    """The image store of one driver: metadata in ``ROOT/image/<driver>/``."""

    def __init__(self, driver: Any, home: Path | None = None) -> None:
        self.driver = driver
        self.home = home or Path(driver.home).parent / "image" / driver.name
        self.meta = MetadataStore(self.home)
        self.tmp = self.home / "tmp"
        self.tmp.mkdir(exist_ok=True, mode=0o700)

    def close(self) -> None:
        self.meta.close()

    # ----- locks -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def producing(self) -> Iterator[None]:
        """Held (shared) while a pull, load or commit makes layers not yet held by an image, so
        that ``prune`` (exclusive) never takes them from under it.  A SIGINT/SIGTERM that comes
        while one of its layers commits stops the operation once that commit is done (the
        layer store would otherwise drop it and the operation would go on)."""
        with FileLock(self.home / "gc.lock", shared=True), signals_redelivered():
            yield

    def _images_lock(self) -> FileLock:
        """Serialises the two-step changes (hold + commit, delete + release) between
        processes."""
        return FileLock(self.home / "images.lock")

    # ----- resolving ---------------------------------------------------------------------------

    def resolve(self, text: str) -> Image:
        """An image by ID, 12+ hex prefix, tag or name@digest."""
        image_id = self._resolve_id(text)
        rec = self.meta.get(image_id)
        if rec is None:
            raise NotFound(f"no such image: {text}")
        return Image(rec, parse_config(rec.config))

    def _resolve_id(self, text: str) -> str:
        if reference.looks_like_id(text):
            hexpart = text.removeprefix("sha256:")
            if len(hexpart) == 64:
                if self.meta.get(f"sha256:{hexpart}") is not None:
                    return f"sha256:{hexpart}"
            else:
                found = self.meta.ids_with_prefix(hexpart)
                if len(found) > 1:
                    raise InvalidArgument(f"image ID prefix {text} is ambiguous")
                if found:
                    return found[0]
            if text.startswith("sha256:"):
                raise NotFound(f"no such image: {text}")
        ref = reference.parse(text)
        found_id = (self.meta.digest_target(str(ref.with_digest(ref.digest)))
                    if ref.digest else self.meta.tag_target(str(ref)))
        if found_id is None:
            raise NotFound(f"no such image: {text}")
        return found_id

    def images(self) -> list[Image]:
        return [Image(r, parse_config(r.config)) for r in self.meta.images()]

    # ----- layers ------------------------------------------------------------------------------

    def reusable_layer(self, parent_chain: str | None, diff_id: str) -> str | None:
        """The store id of a layer with this chain ID the image store made (None: absent).

        A layer of that name made by anyone else, or with another diffID, is refused: never
        reused because a directory of that name exists.
        """
        chain = chain_id(parent_chain, diff_id)
        layer_id = hex_of(chain)
        if not self.driver.exists(layer_id):
            return None
        rec = self.driver.record(layer_id)
        parent = hex_of(parent_chain) if parent_chain else None
        if rec.made_by != MADE_BY or rec.diff_id != diff_id or rec.parent != parent:
            raise AlreadyExists(f"layer {layer_id} exists but was not made by the image store "
                                f"from diffID {diff_id}")
        return layer_id

    def commit_layer(self, parent_chain: str | None, stream: BinaryIO | int,
                     expected_diff_id: str | None,
                     before_commit: Callable[[], None] | None = None,
                     progress: Callable[[int], None] | None = None) -> tuple[str, str, int]:
        """Apply *stream* as the layer on *parent_chain*; returns (chain ID, diffID, size).

        *before_commit* runs once the diff is hashed and before the commit point (a pull checks
        its blob's digest and size there): if it raises, nothing is committed.
        """
        def layer_id_for(diff_id: str) -> str:
            if before_commit is not None:
                before_commit()
            return hex_of(chain_id(parent_chain, diff_id))

        parent = hex_of(parent_chain) if parent_chain else None
        _, result = self.driver.commit_new_layer(
            parent, stream, layer_id_for=layer_id_for, made_by=MADE_BY,
            expected_diff_id=expected_diff_id, progress=progress)
        return chain_id(parent_chain, result.diff_id), result.diff_id, int(result.size)

    def layer_size(self, layer_id: str) -> int:
        rec = self.driver.record(layer_id)
        return int(rec.extra.get("applied_size", 0))

    # ----- images ------------------------------------------------------------------------------

    def add_image(self, config: ImageConfig, *, manifest: bytes | None = None,
                  manifest_type: str | None = None, tags: list[str] | None = None,
                  repo_digests: list[str] | None = None,
                  blobs: list[BlobSource] | None = None) -> str:
        """Hold the image's layers, then commit its record: returns the image ID."""
        check_os(config.os, self.driver.name)
        layers = [hex_of(c) for c in self._chain(config)]
        holder = holder_for(config.id)
        with self._images_lock():  # an rm of this image cannot fall between hold and commit
            taken: list[str] = []  # the holds this call added (an image pulled again has some)
            committed = False
            try:
                for layer_id in layers:
                    if holder not in self.driver.record(layer_id).holders:
                        taken.append(layer_id)
                    self.driver.hold(layer_id, holder)
                size = sum(self.layer_size(layer_id) for layer_id in layers)
                rec = ImageRecord(config.id, config.raw, manifest, manifest_type, layers, size,
                                  time.time())
                self.meta.add_image(rec, tags or [], repo_digests or [], blobs or [])
                committed = True
            except BaseException:  # a SIGINT or a failed write: no image, so none of its holds
                for layer_id in [] if committed else taken:
                    with contextlib.suppress(GraphDriverError, OSError):
                        self.driver.release(layer_id, holder)
                raise
        return config.id

    @staticmethod
    def _chain(config: ImageConfig) -> list[str]:
        from .manifest import chain_ids

        return chain_ids(config.diff_ids)

    def tag(self, source: str, target: str) -> None:
        image = self.resolve(source)
        ref = reference.parse(target)
        if ref.digest:
            raise InvalidArgument(f"cannot tag with a digest: {target}")
        self.meta.tag(image.id, str(ref))

    def remove(self, text: str, *, force: bool = False) -> list[str]:
        """``image rm``: untag a tag, and drop the image with its last tag; returns what went
        (``Untagged: ...`` / ``Deleted: ...`` lines as docker prints them)."""
        with self._images_lock():
            image_id = self._resolve_id(text)
            is_tag = not reference.looks_like_id(text)
            if is_tag:
                ref = reference.parse(text)
                if not ref.digest:
                    tags = self.meta.tags_of(image_id)
                    if len(tags) > 1 or str(ref) not in tags:
                        self.meta.untag(str(ref))
                        return [f"Untagged: {ref.familiar()}"]
            image = self.resolve(image_id)
            self._refuse_if_used(image)
            out = [f"Untagged: {reference.parse(t).familiar()}"
                   for t in self.meta.tags_of(image_id)]
            self.meta.remove_image(image_id, force=force or is_tag)
            for layer_id in image.record.layers:
                self.driver.release(layer_id, holder_for(image_id))
        out.append(f"Deleted: {image_id}")
        return out

    def _refuse_if_used(self, image: Image) -> None:
        top = image.top_layer
        if top is None:
            return
        users = [c for c in self.driver.children(top) if self.driver.record(c).writable]
        if users:
            raise InUse(f"image {image.id[7:19]} is used by container layer {users[0]}")

    def prune(self) -> list[str]:
        """Remove the layers the image store made that nothing holds and that have no children;
        returns their ids.  Holders naming images that do not exist (a crash between hold and
        commit) are released first."""
        removed: list[str] = []
        with FileLock(self.home / "gc.lock"), self._images_lock():
            known = {r.id for r in self.meta.images()}
            for layer_id in self.driver.layers():
                rec = self.driver.record(layer_id)
                for holder in rec.holders:
                    if holder.startswith("image:") and holder[6:] not in known:
                        self.driver.release(layer_id, holder)
            progress = True
            while progress:
                progress = False
                for layer_id in self.driver.layers():
                    rec = self.driver.record(layer_id)
                    if rec.made_by != MADE_BY or rec.holders or self.driver.children(layer_id):
                        continue
                    if self.driver.mount_count(layer_id) > 0:
                        continue
                    self.driver.remove(layer_id)
                    removed.append(layer_id)
                    progress = True
        return removed

    # ----- mounts ------------------------------------------------------------------------------

    def mount(self, text: str) -> Path:
        """The image's root filesystem, read-only, reference counted (the driver's count).

        The first mount makes the view read-only: a per-mount read-only flag on the driver's
        own mount (overlay), or a read-only bind mount of the layer's directory where the
        driver does not mount (vfs), which the last unmount removes.
        """
        from ..mount import MS_RDONLY, is_mounted, mount

        image = self.resolve(text)
        top = image.top_layer
        if top is None:
            raise InvalidArgument(f"image {image.id[7:19]} has no layers to mount")
        path = Path(self.driver.get(top))
        if self.driver.mount_count(top) == 1:
            try:
                if not is_mounted(path):
                    mount(str(path), path, "", MS_BIND)
                mount("", path, "", MS_BIND | MS_REMOUNT | MS_RDONLY)
            except BaseException:
                self._unmount_bind(top)
                self.driver.put(top)
                raise
        return path

    def unmount(self, text: str) -> None:
        top = self.resolve(text).top_layer
        if top is None:
            return
        if self.driver.mount_count(top) == 1:
            self._unmount_bind(top)
        self.driver.put(top)

    def _unmount_bind(self, layer_id: str) -> None:
        """Remove the bind mount ``mount`` made where the driver itself does not mount."""
        from ..mount import is_mounted, unmount

        if getattr(self.driver, "mounts", True):
            return
        path = Path(self.driver.get(layer_id))  # where it is: the layer's own directory
        try:
            if is_mounted(path):
                unmount(path)
        finally:
            self.driver.put(layer_id)

    def create_container_layer(self, layer_id: str, text: str, opts: Any = None) -> None:
        """A writable layer on top of an image (``create ID --rw --image REF``)."""
        image = self.resolve(text)
        self.driver.create_rw(layer_id, image.top_layer, opts)
