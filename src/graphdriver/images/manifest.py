"""Parsing and validating manifests: Docker schema 2, OCI image manifest, Docker manifest list,
OCI index; schema 1 refused.  Also the image config's few fields the store relies on, digests and
chain IDs.

Owns the JSON shapes of the distribution formats; imports only ``errors``, ``mediatypes`` and
``reference``.  Never touches a driver, a file or the network.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArchive, NotSupported
from . import mediatypes as mt
from .reference import DIGEST_RE


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] = field(default_factory=dict)

    @property
    def foreign(self) -> bool:
        return self.media_type in mt.FOREIGN_LAYERS

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        return out


@dataclass(frozen=True)
class ImageManifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(data: bytes, digest: str, what: str) -> None:
    if digest.startswith("sha512:"):
        got = "sha512:" + hashlib.sha512(data).hexdigest()
    else:
        got = sha256_digest(data)
    if got != digest:
        raise InvalidArchive(f"{what}: digest mismatch (expected {digest}, got {got})")


class DigestCheck:
    """A blob's digest and size, checked as its bytes stream by (``update``) and at its end."""

    def __init__(self, digest: str, size: int | None, what: str) -> None:
        self.digest = digest
        self.size = size
        self.what = what
        self.hash = hashlib.new(digest.partition(":")[0])
        self.count = 0

    def update(self, chunk: bytes | memoryview) -> None:
        self.count += len(chunk)
        if self.size is not None and self.count > self.size:
            raise InvalidArchive(f"{self.what}: more than the {self.size} bytes its descriptor "
                                 "says")
        self.hash.update(chunk)

    def finish(self) -> None:
        if self.size is not None and self.count != self.size:
            raise InvalidArchive(f"{self.what}: truncated ({self.count} of {self.size} bytes)")
        got = f"{self.hash.name}:{self.hash.hexdigest()}"
        if got != self.digest:
            raise InvalidArchive(f"{self.what}: digest mismatch (got {got})")


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The OCI chain IDs: ChainID(L0) = DiffID(L0),
    ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else sha256_digest(f"{out[-1]} {diff_id}".encode()))
    return out


def chain_id(parent_chain: str | None, diff_id: str) -> str:
    return diff_id if parent_chain is None else sha256_digest(f"{parent_chain} {diff_id}".encode())


def hex_of(digest: str) -> str:
    return digest.partition(":")[2]


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArchive(f"{what} is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidArchive(f"{what} is not a JSON object")
    return obj


def _descriptor(obj: Any, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise InvalidArchive(f"{what}: a descriptor is not an object")
    digest, size, media_type = obj.get("digest"), obj.get("size"), obj.get("mediaType", "")
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise InvalidArchive(f"{what}: invalid digest {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArchive(f"{what}: invalid size {size!r} for {digest}")
    if not isinstance(media_type, str):
        raise InvalidArchive(f"{what}: invalid media type for {digest}")
    urls = obj.get("urls") or []
    annotations = obj.get("annotations") or {}
    plat = obj.get("platform") or {}
    if not isinstance(urls, list) or not isinstance(annotations, dict) or not isinstance(plat,
                                                                                         dict):
        raise InvalidArchive(f"{what}: malformed descriptor for {digest}")
    return Descriptor(media_type, digest, size, tuple(str(u) for u in urls),
                      {str(k): str(v) for k, v in annotations.items()}, plat)


def media_type_of(data: bytes, header: str | None) -> str:
    """The manifest's media type: its ``mediaType`` field, else the Content-Type, else a guess."""
    obj = _json(data, "manifest")
    declared = obj.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if obj.get("schemaVersion") == 1:
        return mt.DOCKER_SCHEMA1
    if header:
        base = header.split(";")[0].strip()
        if base and base not in ("application/json", "text/plain"):
            return base
    if "manifests" in obj:
        return mt.OCI_INDEX
    return mt.OCI_MANIFEST


def parse(data: bytes, header: str | None = None) -> ImageManifest | Index:
    """An image manifest or an index from its bytes; anything else is one clear error."""
    media_type = media_type_of(data, header)
    obj = _json(data, "manifest")
    if media_type in mt.SCHEMA1:
        raise NotSupported("Docker image manifest schema 1 is not supported (deprecated since "
                           "2017): push the image again with a current client")
    if media_type in mt.INDEXES:
        items = obj.get("manifests")
        if not isinstance(items, list):
            raise InvalidArchive("manifest list has no 'manifests' array")
        return Index(media_type, tuple(_descriptor(m, "index") for m in items))
    if media_type not in mt.IMAGE_MANIFESTS:
        raise NotSupported(f"unknown manifest media type {media_type!r}")
    if obj.get("schemaVersion") != 2:
        raise InvalidArchive(f"manifest schemaVersion {obj.get('schemaVersion')!r} is not 2")
    config = _descriptor(obj.get("config"), "manifest config")
    layers = obj.get("layers")
    if not isinstance(layers, list):
        raise InvalidArchive("manifest has no 'layers' array")
    descs = tuple(_descriptor(layer, "manifest layer") for layer in layers)
    for d in descs:
        if d.media_type not in mt.LAYERS:
            raise NotSupported(f"unknown layer media type {d.media_type!r} ({d.digest})")
    return ImageManifest(media_type, config, descs)


def build_manifest(media_type: str, config: Descriptor, layers: list[Descriptor]) -> bytes:
    """The canonical bytes of an image manifest we write (push, save)."""
    obj: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type,
                           "config": config.to_json(),
                           "layers": [d.to_json() for d in layers]}
    return json.dumps(obj, indent=2).encode()


@dataclass(frozen=True)
class ImageConfig:
    """An image config: its bytes (the image ID is their digest) and the fields we use."""

    raw: bytes
    obj: dict[str, Any]

    @property
    def id(self) -> str:
        return sha256_digest(self.raw)

    @property
    def diff_ids(self) -> list[str]:
        return list(self.obj["rootfs"]["diff_ids"])

    @property
    def os(self) -> str:
        return str(self.obj.get("os") or "linux")


def parse_config(data: bytes) -> ImageConfig:
    obj = _json(data, "image config")
    rootfs = obj.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise InvalidArchive("image config has no rootfs.diff_ids")
    for d in rootfs["diff_ids"]:
        if not isinstance(d, str) or not DIGEST_RE.match(d):
            raise InvalidArchive(f"image config: invalid diff_id {d!r}")
    return ImageConfig(data, obj)


def check_layers_match(manifest: ImageManifest, config: ImageConfig) -> None:
    if len(manifest.layers) != len(config.diff_ids):
        raise InvalidArchive(f"manifest has {len(manifest.layers)} layers but the config has "
                             f"{len(config.diff_ids)} diff_ids")
