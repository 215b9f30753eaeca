"""``docker save``'s format: ``manifest.json`` (Config, RepoTags, Layers), ``repositories``,
the configs and the layer tars.  Read (``image load``) whatever docker (legacy and v25+ layouts)
and skopeo write; write the legacy layout docker and skopeo read (``<diffID hex>/layer.tar``,
``<config hex>.json``).

Owns that JSON; imports this package's formats and ``bundle``; never a driver or the network.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidArchive, InvalidArgument
from . import reference
from .bundle import ArchiveWriter, Bundle, LayerFile, LoadItem
from .manifest import hex_of, sha256_digest

MANIFEST = "manifest.json"


def _layer_file(path: str) -> LayerFile:
    """Layers stored as ``blobs/sha256/<hex>`` (docker v25+) carry their digest in the name."""
    parts = path.split("/")
    if len(parts) == 3 and parts[0] == "blobs" and parts[1] == "sha256" and len(parts[2]) == 64:
        return LayerFile(path, f"sha256:{parts[2]}")
    return LayerFile(path)


def read(bundle: Bundle) -> list[LoadItem]:
    try:
        entries = json.loads(bundle.read(MANIFEST))
    except ValueError as exc:
        raise InvalidArchive(f"{MANIFEST} is not JSON: {exc}") from exc
    if not isinstance(entries, list) or not entries:
        raise InvalidArchive(f"{MANIFEST} lists no image")
    items = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) or \
                not isinstance(entry.get("Layers"), list):
            raise InvalidArchive(f"{MANIFEST}: an entry without Config and Layers")
        config = bundle.read(entry["Config"])
        names = []
        for tag in entry.get("RepoTags") or []:
            try:
                ref = reference.parse(str(tag))
            except InvalidArgument as exc:
                raise InvalidArchive(f"{MANIFEST}: {exc}") from exc
            names.append(str(ref))
        items.append(LoadItem(config, [_layer_file(str(p)) for p in entry["Layers"]], names))
    return items


def write_index(writer: ArchiveWriter, images: list[tuple[bytes, list[str], list[str]]]) -> None:
    """``manifest.json``, ``repositories`` and the configs; the layer tars are already written
    (*images*: config bytes, layer paths, names)."""
    manifest: list[dict[str, Any]] = []
    repositories: dict[str, dict[str, str]] = {}
    for config, layer_paths, names in images:
        config_name = f"{hex_of(sha256_digest(config))}.json"
        if not writer.has(config_name):
            writer.add_bytes(config_name, config)
        tags = [reference.parse(n).familiar() for n in names]
        manifest.append({"Config": config_name, "RepoTags": tags or None,
                         "Layers": layer_paths})
        for name in names:
            ref = reference.parse(name)
            if layer_paths:
                repositories.setdefault(ref.familiar_name(), {})[ref.tag or "latest"] = \
                    layer_paths[-1].split("/")[0]
    writer.add_bytes(MANIFEST, json.dumps(manifest).encode())
    if repositories:
        writer.add_bytes("repositories", json.dumps(repositories).encode())
