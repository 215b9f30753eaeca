"""``image push``: a local image's blobs, config and manifest to a registry.

For each layer, in this order: a foreign layer (``urls``) is never pushed, its descriptor is
copied; a compressed blob recorded as having produced the layer (a pull) whose compression is
the one asked for is reused by reference — skipped when the destination has it (HEAD), mounted
from its source repository when both are on this registry; otherwise the layer's tar is
re-assembled exactly from the store (tar-split), its diffID checked, compressed (gzip by
default, zstd with an OCI manifest) and uploaded in chunks while its digest is computed.
Compressed bytes are not kept by the store, and gzip is not reproduced bit for bit: a layer
whose original blob the registry cannot give back gets a new blob digest (same diffID).

Owns the push's plan; imports the client, ImageStore and the tar-split re-assembly of
``archive``; never a driver module, never ``cli``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from ..errors import InvalidArgument
from . import auth, reference
from . import mediatypes as mt
from .client import RegistryClient
from .display import LayerDisplay
from .layertar import LayerTarReader
from .manifest import Descriptor, ImageManifest, build_manifest, parse, sha256_digest
from .metadata import BlobSource
from .store import Image, ImageStore

COMPRESSIONS = ("gzip", "zstd")


@dataclass(frozen=True)
class PushOptions:
    creds: auth.Credentials | None = None
    insecure: bool = False
    compression: str = "gzip"
    quiet: bool = False


def compression_of(media_type: str) -> str:
    if media_type.endswith("zstd"):
        return "zstd"
    if media_type.endswith(("gzip", ".tar.gzip")):
        return "gzip"
    return "none"


class Pusher:
    def __init__(self, store: ImageStore, client: RegistryClient, dest: reference.Reference,
                 opts: PushOptions) -> None:
        self.store = store
        self.client = client
        self.dest = dest
        self.opts = opts
        self.display = LayerDisplay(opts.quiet)
        self.oci = opts.compression == "zstd"

    def layer_type(self, compression: str, foreign: bool = False) -> str:
        if foreign:
            return mt.OCI_FOREIGN_LAYER_GZIP if self.oci else mt.DOCKER_FOREIGN_LAYER
        oci, docker = mt.LAYER_TYPE_FOR[compression]
        return oci if self.oci or docker is None else docker

    def reuse(self, diff_id: str) -> Descriptor | None:
        """A recorded blob of this layer that the destination has or can mount."""
        repo = self.dest.path
        for src in self.store.meta.blob_sources(diff_id):
            if compression_of(src.media_type) != self.opts.compression:
                continue
            desc = Descriptor(self.layer_type(self.opts.compression), src.digest, src.size)
            if self.client.blob_exists(repo, src.digest):
                return desc
            src_domain, _, src_repo = src.source.partition("/")
            if src_domain == self.dest.domain and src_repo and src_repo != repo and \
                    self.client.mount_blob(repo, src.digest, src_repo):
                return desc
        return None

    def push_layer(self, layer_id: str, diff_id: str) -> Descriptor:
        key = diff_id[7:19]
        found = self.reuse(diff_id)
        if found is not None:
            self.display.set(key, "Layer already exists", force=True)
            return found
        self.display.set(key, "Pushing", force=True)
        reader = LayerTarReader(self.store, layer_id, diff_id, self.opts.compression)
        try:
            digest, size = self.client.upload_blob(self.dest.path, reader)  # type: ignore[arg-type]
        finally:
            reader.close()
        media_type = self.layer_type(self.opts.compression)
        self.store.meta.add_blob_sources([BlobSource(diff_id, digest, media_type, size,
                                                     self.dest.name)])
        self.display.set(key, "Pushed", force=True)
        return Descriptor(media_type, digest, size)

    def push(self, image: Image) -> str:
        foreign = self._foreign_layers(image)
        layers: list[Descriptor] = []
        for layer_id, diff_id in zip(image.record.layers, image.config.diff_ids, strict=True):
            if diff_id in foreign:
                d = foreign[diff_id]
                layers.append(Descriptor(self.layer_type(compression_of(d.media_type), True),
                                         d.digest, d.size, d.urls))
                continue
            layers.append(self.push_layer(layer_id, diff_id))
        raw = image.config.raw
        cfg_digest = sha256_digest(raw)
        if not self.client.blob_exists(self.dest.path, cfg_digest):
            self.client.upload_blob(self.dest.path, io.BytesIO(raw), cfg_digest, len(raw))
        media_type = mt.OCI_MANIFEST if self.oci else mt.DOCKER_MANIFEST
        cfg_type = mt.OCI_CONFIG if self.oci else mt.DOCKER_CONFIG
        data = build_manifest(media_type, Descriptor(cfg_type, cfg_digest, len(raw)), layers)
        digest = self.client.put_manifest(self.dest.path, self.dest.tag or "latest", data,
                                          media_type)
        self.display.finish()
        self.store.meta.add_image(image.record, [], [str(self.dest.with_digest(digest))], [])
        return digest

    def _foreign_layers(self, image: Image) -> dict[str, Descriptor]:
        """diffID -> descriptor of the image's foreign layers (from the manifest it came with)."""
        if image.record.manifest is None:
            return {}
        parsed = parse(image.record.manifest, image.record.manifest_type)
        if not isinstance(parsed, ImageManifest):
            return {}
        return {diff_id: d for d, diff_id in zip(parsed.layers, image.config.diff_ids,
                                                 strict=True) if d.foreign}


def push(store: ImageStore, source: str, dest: str | None = None,
         opts: PushOptions | None = None) -> str:
    """Push local image *source* as *dest* (default: *source*); returns the manifest digest."""
    opts = opts or PushOptions()
    if opts.compression not in COMPRESSIONS:
        raise InvalidArgument(f"--compression {opts.compression}: use gzip or zstd")
    image = store.resolve(source)
    ref = reference.parse(dest or source)
    if ref.digest:
        raise InvalidArgument(f"cannot push to a digest reference: {dest or source}")
    creds = auth.lookup(ref.domain, ref.path, opts.creds)
    with RegistryClient(ref.registry_host, creds=creds, insecure=opts.insecure) as client:
        return Pusher(store, client, ref, opts).push(image)
