"""``image load`` and ``image save``: images between the store and archive files.

Load reads a docker-archive or an OCI layout (a directory or a tar, compressed or not, or
stdin), checks every config and layer count before the first layer, applies the layers in order
(reused when the image store made them with that diffID; a layer with a known digest is checked
before its commit point), then commits each image.  Save writes every layer once (its exact tar,
re-assembled from tar-split; gzip'd for OCI, which umoci 0.4 needs) and one index for all the
images given.  Owns the order of those steps; imports this package; never a driver module.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from ..errors import InvalidArchive, InvalidArgument
from . import dockerarchive, layout, platform, reference
from . import mediatypes as mt
from .bundle import (
    ArchiveWriter,
    Bundle,
    DirArchiveWriter,
    LoadItem,
    TarArchiveWriter,
    VerifyingReader,
    open_bundle,
    spool_file,
)
from .layertar import LayerTarReader
from .manifest import Descriptor, DigestCheck, chain_id, hex_of, parse_config
from .store import Image, ImageStore

FORMATS = ("docker-archive", "oci-archive", "oci-dir")


def load(store: ImageStore, source: str, want: platform.Platform | None = None) -> list[str]:
    """Load every image of *source*; returns docker load's lines."""
    want = want or platform.driver_platform(store.driver.name)
    bundle = open_bundle(source, store.tmp)
    try:
        if bundle.exists(dockerarchive.MANIFEST):
            items = dockerarchive.read(bundle)
        elif bundle.exists("index.json"):
            items = layout.read(bundle, want)
        else:
            raise InvalidArchive("not an image archive: no manifest.json (docker-archive) and "
                                 "no index.json (OCI layout)")
        configs = []
        for item in items:
            config = parse_config(item.config)
            platform.check_os(config.os, store.driver.name)
            if len(item.layers) != len(config.diff_ids):
                raise InvalidArchive(f"image {config.id[7:19]}: {len(item.layers)} layers but "
                                     f"{len(config.diff_ids)} diff_ids in its config")
            configs.append(config)
        lines = []
        with store.producing():
            for item, config in zip(items, configs, strict=True):
                _load_layers(store, bundle, item, config.diff_ids)
                store.add_image(config, manifest=item.manifest, manifest_type=item.manifest_type,
                                tags=item.names)
                lines += [f"Loaded image: {reference.parse(n).familiar()}" for n in item.names]
                if not item.names:
                    lines.append(f"Loaded image ID: {config.id}")
        return lines
    finally:
        bundle.close()


def _load_layers(store: ImageStore, bundle: Bundle, item: LoadItem, diff_ids: list[str]) -> None:
    parent: str | None = None
    for layer, diff_id in zip(item.layers, diff_ids, strict=True):
        if store.reusable_layer(parent, diff_id) is None:
            check = DigestCheck(layer.digest, layer.size, f"layer {layer.path}") \
                if layer.digest else None
            stream = VerifyingReader(bundle.open(layer.path), check)
            try:
                store.commit_layer(parent, cast(BinaryIO, stream), diff_id,
                                   before_commit=stream.drain_and_verify)
            finally:
                stream.close()
        parent = chain_id(parent, diff_id)


@dataclass(frozen=True)
class _Blob:
    path: str
    digest: str
    size: int
    media_type: str


def _write_layer(store: ImageStore, writer: ArchiveWriter, layer_id: str, diff_id: str,
                 oci: bool) -> _Blob:
    """One layer into the archive, through a spool file (a tar member needs its size first)."""
    fd = spool_file(store.tmp)
    try:
        reader = LayerTarReader(store, layer_id, diff_id, "gzip" if oci else "none")
        h = hashlib.sha256()
        size = 0
        try:
            while chunk := reader.read(1 << 20):
                h.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                size += len(chunk)
        finally:
            reader.close()
        digest = "sha256:" + h.hexdigest()
        path = layout.blob_path(digest) if oci else f"{hex_of(diff_id)}/layer.tar"
        if not writer.has(path):
            writer.add_fd(path, fd, size)
        return _Blob(path, digest, size, mt.OCI_LAYER_GZIP if oci else mt.OCI_LAYER)
    finally:
        os.close(fd)


def _names_for(text: str) -> list[str]:
    """The tag a name-given image is saved with; an ID saves it untagged, as docker does."""
    if reference.looks_like_id(text):
        return []
    ref = reference.parse(text)
    return [] if ref.digest else [str(ref)]


def save(store: ImageStore, refs: list[str], out: BinaryIO | Path, fmt: str) -> None:
    """Write *refs* into one archive: a tar stream (*out* binary) or a directory (oci-dir)."""
    if fmt not in FORMATS:
        raise InvalidArgument(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    oci = fmt != "docker-archive"
    images = [(store.resolve(r), r) for r in refs]
    writer: ArchiveWriter = DirArchiveWriter(out) if isinstance(out, Path) \
        else TarArchiveWriter(out)
    blobs: dict[str, _Blob] = {}
    merged: dict[str, tuple[Image, list[str]]] = {}
    for image, text in images:
        names = _names_for(text)
        old = merged.get(image.id)
        merged[image.id] = (image, [*(old[1] if old else []), *names])
    oci_images: list[tuple[bytes, list[Descriptor], list[str]]] = []
    docker_images: list[tuple[bytes, list[str], list[str]]] = []
    for image, names in merged.values():
        layer_blobs = []
        for layer_id, diff_id in zip(image.record.layers, image.config.diff_ids, strict=True):
            if diff_id not in blobs:
                blobs[diff_id] = _write_layer(store, writer, layer_id, diff_id, oci)
            layer_blobs.append(blobs[diff_id])
        oci_images.append((image.config.raw, [Descriptor(b.media_type, b.digest, b.size)
                                              for b in layer_blobs], names))
        docker_images.append((image.config.raw, [b.path for b in layer_blobs], names))
    if oci:
        layout.write_index(writer, oci_images)
    else:
        dockerarchive.write_index(writer, docker_images)
    writer.close()
