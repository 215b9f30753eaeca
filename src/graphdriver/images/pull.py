"""``image pull``: a manifest (an index resolved to the driver's platform), its config, then its
layers — several blobs downloading at once while the layers are applied in order.

The first layer the store lacks is streamed from the network straight into the apply (no copy);
the next few (``parallel``) are prefetched by worker threads into unlinked spool files that the
apply reads while they grow, each closed (and so deleted) once its layer is applied: a window of
downloads ahead of the apply, never a copy of the whole image.  Every blob's digest and size
are checked after its diff is hashed and before its layer's commit point; a download cut
mid-blob resumes with a Range request (client.py).  A failed pull leaves no image and no tag;
layers it committed completely stay, held by nothing, as a cache for the retry (``image
prune`` removes them).

Owns the pull's plan and its concurrency; imports the client, the metadata and ImageStore of this
package; never a driver module, never ``cli``.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from ..errors import GraphDriverError, Interrupted, InvalidArchive
from . import auth, platform, reference
from .bundle import spool_file
from .client import BlobReader, RegistryClient
from .display import LayerDisplay
from .manifest import (
    Descriptor,
    ImageManifest,
    Index,
    chain_id,
    check_layers_match,
    parse,
    parse_config,
)
from .metadata import BlobSource
from .store import ImageStore

CHUNK = 1 << 20
PARALLEL = 3


@dataclass(frozen=True)
class PullOptions:
    platform: platform.Platform | None = None
    creds: auth.Credentials | None = None
    insecure: bool = False
    quiet: bool = False
    parallel: int = PARALLEL


class Spool:
    """One prefetched blob: a worker writes it into an unlinked file, the apply reads it as it
    grows; the reader's EOF comes only once the blob's digest and size were verified."""

    def __init__(self, tmp: Path, blob: BlobReader) -> None:
        self.blob = blob
        self.fd = spool_file(tmp)
        self.cond = threading.Condition()
        self.written = 0
        self.done = False
        self.cancelled = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.cancelled:
                chunk = self.blob.read(CHUNK)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self.fd, view):]
                with self.cond:
                    self.written += len(chunk)
                    self.cond.notify_all()
            if self.cancelled:
                raise Interrupted("the pull stopped")
        except BaseException as exc:
            self.error = exc
        finally:
            self.blob.close()
            with self.cond:
                self.done = True
                self.cond.notify_all()

    def wait_verified(self) -> None:
        with self.cond:
            while not self.done:
                self.cond.wait()
        if self.error is not None:
            raise self.error

    def reader(self) -> SpoolReader:
        return SpoolReader(self)

    def close(self) -> None:
        self.cancelled = True
        with self.cond:
            while not self.done:
                self.cond.wait()
        os.close(self.fd)


class SpoolReader(io.RawIOBase):
    def __init__(self, spool: Spool) -> None:
        super().__init__()
        self.spool = spool
        self.offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        s = self.spool
        with s.cond:
            while self.offset >= s.written and not s.done:
                s.cond.wait()
            if self.offset >= s.written:
                if s.error is not None:
                    raise s.error
                return 0
            n = min(len(view), s.written - self.offset)
        got = os.preadv(s.fd, [view[:n]], self.offset)
        self.offset += got
        return got


class _Step:
    """One layer of the plan."""

    def __init__(self, desc: Descriptor, diff_id: str, parent_chain: str | None) -> None:
        self.desc = desc
        self.diff_id = diff_id
        self.parent_chain = parent_chain
        self.chain = chain_id(parent_chain, diff_id)
        self.key = desc.digest.partition(":")[2][:12]


class Puller:
    def __init__(self, store: ImageStore, client: RegistryClient, repo: str,
                 opts: PullOptions) -> None:
        self.store = store
        self.client = client
        self.repo = repo
        self.opts = opts
        self.display = LayerDisplay(opts.quiet)

    def _blob(self, step: _Step) -> BlobReader:
        blob = self.client.open_blob(self.repo, step.desc)
        total = step.desc.size
        blob.on_bytes = lambda done: self.display.bytes(step.key, "Downloading", done, total)
        return blob

    def layers(self, descs: tuple[Descriptor, ...], diff_ids: list[str]) -> None:
        steps: list[_Step] = []
        parent: str | None = None
        for desc, diff_id in zip(descs, diff_ids, strict=True):
            steps.append(_Step(desc, diff_id, parent))
            parent = steps[-1].chain
        missing = [s for s in steps if self.store.reusable_layer(s.parent_chain, s.diff_id)
                   is None]
        for s in steps:
            self.display.set(s.key, "Waiting" if s in missing else "Already exists")
        # The first missing layer streams straight into its apply; the next `parallel` ones
        # download meanwhile into spool files, each deleted once applied (a window, not a copy
        # of the whole image).
        spools: dict[int, Spool] = {}
        with ThreadPoolExecutor(max(1, self.opts.parallel),
                                thread_name_prefix="graphdriver-pull") as pool:
            try:
                for j, s in enumerate(missing):
                    for ahead in missing[j + 1:j + 1 + max(1, self.opts.parallel)]:
                        if id(ahead) not in spools:
                            spools[id(ahead)] = spool = Spool(self.store.tmp, self._blob(ahead))
                            pool.submit(spool.run)
                    current = spools.pop(id(s), None)
                    try:
                        self._apply(s, current)
                    finally:
                        if current is not None:
                            current.close()
            finally:
                for spool in spools.values():
                    spool.cancelled = True
                for spool in spools.values():
                    spool.close()
        self.display.finish()

    def _apply(self, step: _Step, spool: Spool | None) -> None:
        stream: io.RawIOBase
        verify: Callable[[], None]
        if spool is not None:
            stream, verify = spool.reader(), spool.wait_verified
        else:
            blob = self._blob(step)
            stream, verify = blob, blob.drain_and_verify
        self.display.set(step.key, "Extracting", force=True)
        try:
            chain, _, _ = self.store.commit_layer(step.parent_chain, cast(BinaryIO, stream),
                                                  step.diff_id,
                                                  before_commit=verify)
        except GraphDriverError as exc:
            raise type(exc)(f"layer {step.desc.digest}: {exc}") from exc
        finally:
            stream.close()
        if chain != step.chain:
            raise InvalidArchive(f"layer {step.desc.digest}: chain ID {chain}, expected "
                                 f"{step.chain}")
        self.display.set(step.key, "Pull complete", force=True)


def resolve_manifest(client: RegistryClient, repo: str, ref: str,
                     want: platform.Platform) -> tuple[bytes, ImageManifest, str]:
    """(bytes, manifest, the digest users name it by) for *ref*, an index resolved to *want*."""
    data, ctype, digest = client.get_manifest(repo, ref)
    parsed = parse(data, ctype)
    if isinstance(parsed, Index):
        entry = platform.select([d.to_json() for d in parsed.manifests], want)
        data, ctype, _ = client.get_manifest(repo, str(entry["digest"]))
        parsed = parse(data, ctype)
        if isinstance(parsed, Index):
            raise InvalidArchive(f"{repo}: an index inside an index is not supported")
    return data, parsed, digest


def pull(store: ImageStore, text: str, opts: PullOptions | None = None) -> str:
    """Pull *text* into *store*; returns the image ID."""
    opts = opts or PullOptions()
    ref = reference.parse(text)
    want = opts.platform or platform.driver_platform(store.driver.name)
    creds = auth.lookup(ref.domain, ref.path, opts.creds)
    with RegistryClient(ref.registry_host, creds=creds, insecure=opts.insecure) as client, \
            store.producing():
        data, image_manifest, digest = resolve_manifest(client, ref.path, ref.manifest_ref, want)
        config = parse_config(client.get_small_blob(ref.path, image_manifest.config))
        platform.check_os(config.os, store.driver.name)
        check_layers_match(image_manifest, config)
        Puller(store, client, ref.path, opts).layers(image_manifest.layers, config.diff_ids)
        blobs = [BlobSource(diff_id, d.digest, d.media_type, d.size, ref.name)
                 for d, diff_id in zip(image_manifest.layers, config.diff_ids, strict=True)
                 if not d.foreign]
        tags = [str(ref)] if ref.tag and not ref.digest else []
        return store.add_image(config, manifest=data, manifest_type=image_manifest.media_type,
                               tags=tags, repo_digests=[str(ref.with_digest(digest))],
                               blobs=blobs)

