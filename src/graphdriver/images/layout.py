"""The OCI image layout (``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``): read what
skopeo, umoci, containerd and ``docker save`` (v25+) write, and write it (``image save
--format oci-archive|oci-dir``).

Names: ``io.containerd.image.name`` (a full reference), else ``org.opencontainers.image.ref.name``
when that is a full reference, else untagged; on save both are written (the second as the tag,
as containerd and docker do).  Owns the layout's JSON; imports this package's formats and
``bundle``; never a driver or the network.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidArchive, InvalidArgument
from . import mediatypes as mt
from . import platform, reference
from .bundle import ArchiveWriter, Bundle, LayerFile, LoadItem
from .manifest import (
    Descriptor,
    ImageManifest,
    Index,
    build_manifest,
    check_digest,
    parse,
    sha256_digest,
)

LAYOUT_FILE = "oci-layout"
LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'
NAME_ANNOTATION = "io.containerd.image.name"
REF_ANNOTATION = "org.opencontainers.image.ref.name"


def blob_path(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"blobs/{algo}/{hexpart}"


def _blob(bundle: Bundle, desc: Descriptor) -> bytes:
    data = bundle.read(blob_path(desc.digest))
    check_digest(data, desc.digest, f"blob {desc.digest}")
    return data


def name_of(annotations: dict[str, str]) -> str | None:
    """The full reference an index entry names, or None (untagged)."""
    for key in (NAME_ANNOTATION, REF_ANNOTATION):
        value = annotations.get(key)
        if not value or (key == REF_ANNOTATION and "/" not in value and ":" not in value):
            continue
        try:
            ref = reference.parse(value)
        except InvalidArgument:
            continue
        if ref.tag:
            return str(ref)
    return None


def read(bundle: Bundle, want: platform.Platform) -> list[LoadItem]:
    index = parse(bundle.read("index.json"), mt.OCI_INDEX)
    if not isinstance(index, Index):
        raise InvalidArchive("index.json is not an image index")
    items: dict[bytes, LoadItem] = {}
    for entry in index.manifests:
        data = _blob(bundle, entry)
        parsed = parse(data, entry.media_type)
        if isinstance(parsed, Index):
            chosen = platform.select([d.to_json() for d in parsed.manifests], want)
            desc = next(d for d in parsed.manifests if d.digest == chosen["digest"])
            data = _blob(bundle, desc)
            parsed = parse(data, desc.media_type)
        if not isinstance(parsed, ImageManifest):
            raise InvalidArchive(f"{entry.digest}: an index inside an index is not supported")
        config = _blob(bundle, parsed.config)
        layers = [LayerFile(blob_path(d.digest), d.digest, d.size) for d in parsed.layers
                  if not d.foreign or bundle.exists(blob_path(d.digest))]
        name = name_of(entry.annotations)
        old = items.get(config)
        names = [*(old.names if old else []), *([name] if name else [])]
        items[config] = LoadItem(config, layers, names, data, parsed.media_type)
    return list(items.values())


def write_index(writer: ArchiveWriter, images: list[tuple[bytes, list[Descriptor], list[str]]]
                ) -> None:
    """Configs, manifests, ``index.json`` (one entry per name, one for an unnamed image) and
    ``oci-layout``; the layer blobs are already written."""
    entries: list[dict[str, Any]] = []
    for config, layers, names in images:
        cdesc = Descriptor(mt.OCI_CONFIG, sha256_digest(config), len(config))
        if not writer.has(blob_path(cdesc.digest)):
            writer.add_bytes(blob_path(cdesc.digest), config)
        data = build_manifest(mt.OCI_MANIFEST, cdesc, layers)
        mdesc = Descriptor(mt.OCI_MANIFEST, sha256_digest(data), len(data))
        if not writer.has(blob_path(mdesc.digest)):
            writer.add_bytes(blob_path(mdesc.digest), data)
        named: list[str | None] = [*names]
        for name in named or [None]:
            entry = mdesc.to_json()
            if name is not None:
                ref = reference.parse(name)
                entry["annotations"] = {NAME_ANNOTATION: str(ref), REF_ANNOTATION: ref.tag or ""}
            entries.append(entry)
    index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": entries}
    writer.add_bytes("index.json", json.dumps(index, indent=2).encode())
    writer.add_bytes(LAYOUT_FILE, LAYOUT_VERSION)
