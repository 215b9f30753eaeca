"""``image commit``: a container layer becomes a new image.

The new config is the base image's config with the layer's diffID appended to
``rootfs.diff_ids`` and a ``history`` entry (``--change`` CMD/ENTRYPOINT/ENV/LABEL/WORKDIR/USER/
EXPOSE/VOLUME as ``docker commit`` takes them; ``SOURCE_DATE_EPOCH`` fixes the times).  The layer
is the container layer's diff, stored read-only under its chain ID by the store's one mechanism
(``commit_new_layer``: hashed while applied, renamed at its commit point).

Owns the config arithmetic of a commit; imports ImageStore and this package's formats; never a
driver module, never ``cli``.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from typing import Any

from ..errors import InvalidArgument
from . import reference
from .manifest import parse_config
from .platform import driver_platform
from .store import Image, ImageStore


def now_rfc3339() -> str:
    """The commit's time: ``SOURCE_DATE_EPOCH`` when set (reproducible builds), else now."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            when = int(epoch)
        except ValueError as exc:
            raise InvalidArgument(f"SOURCE_DATE_EPOCH={epoch!r} is not an integer") from exc
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


def _json_or_shell(value: str) -> list[str]:
    try:
        parsed = json.loads(value)
    except ValueError:
        return ["/bin/sh", "-c", value]
    if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed):
        return parsed
    return ["/bin/sh", "-c", value]


def _pairs(value: str, what: str) -> list[tuple[str, str]]:
    words = shlex.split(value)
    if len(words) >= 2 and "=" not in words[0]:  # the legacy "ENV key value" form
        return [(words[0], value.split(None, 1)[1])]
    out = []
    for word in words:
        key, sep, val = word.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--change {what}: {word!r} is not KEY=VALUE")
        out.append((key, val))
    return out


def apply_change(config: dict[str, Any], change: str) -> None:
    """One ``--change`` instruction applied to the ``config`` section of an image config."""
    instruction, _, value = change.strip().partition(" ")
    op = instruction.upper()
    value = value.strip()
    if not value:
        raise InvalidArgument(f"--change {change!r}: {op} needs a value")
    if op in ("CMD", "ENTRYPOINT"):
        config["Cmd" if op == "CMD" else "Entrypoint"] = _json_or_shell(value)
    elif op == "ENV":
        env = [e for e in config.get("Env") or []]
        for key, val in _pairs(value, op):
            env = [e for e in env if e.partition("=")[0] != key] + [f"{key}={val}"]
        config["Env"] = env
    elif op == "LABEL":
        labels = dict(config.get("Labels") or {})
        labels.update(_pairs(value, op))
        config["Labels"] = labels
    elif op == "WORKDIR":
        config["WorkingDir"] = value
    elif op == "USER":
        config["User"] = value
    elif op == "EXPOSE":
        ports = dict(config.get("ExposedPorts") or {})
        for port in value.split():
            ports[port if "/" in port else f"{port}/tcp"] = {}
        config["ExposedPorts"] = ports
    elif op == "VOLUME":
        vols = dict(config.get("Volumes") or {})
        for vol in _json_or_shell(value) if value.startswith("[") else value.split():
            vols[vol] = {}
        config["Volumes"] = vols
    else:
        raise InvalidArgument(f"--change {op} is not supported (CMD, ENTRYPOINT, ENV, LABEL, "
                              "WORKDIR, USER, EXPOSE, VOLUME are)")


def base_image_of(store: ImageStore, parent: str | None) -> Image | None:
    if parent is None:
        return None
    for image in store.images():
        if image.top_layer == parent:
            return image
    raise InvalidArgument(f"the container layer's parent {parent} is not the top layer of an "
                          "image in this store")


def commit(store: ImageStore, layer_id: str, target: str | None, *, message: str = "",
           changes: list[str] | None = None, author: str = "") -> str:
    """Commit the writable layer *layer_id* as a new image (tagged *target*); returns its ID."""
    driver = store.driver
    rec = driver.record(layer_id)
    if not rec.writable:
        raise InvalidArgument(f"layer {layer_id} is not a container (--rw) layer")
    ref = reference.parse(target) if target else None
    if ref is not None and ref.digest:
        raise InvalidArgument(f"cannot commit to a digest reference: {target}")
    base = base_image_of(store, rec.parent)
    if base is not None:
        cfg: dict[str, Any] = json.loads(base.config.raw)
    else:
        plat = driver_platform(driver.name)
        cfg = {"architecture": plat.architecture, "os": plat.os, "config": {},
               "rootfs": {"type": "layers", "diff_ids": []}, "history": []}
    section = dict(cfg.get("config") or {})
    for change in changes or []:
        apply_change(section, change)
    parent_chain = f"sha256:{rec.parent}" if rec.parent else None
    created = now_rfc3339()
    with store.producing():
        _, diff_id, _ = store.commit_layer(parent_chain, driver.diff(layer_id), None)
        cfg["config"] = section
        cfg["created"] = created
        if author:
            cfg["author"] = author
        cfg["rootfs"] = {"type": "layers", "diff_ids": [*cfg["rootfs"]["diff_ids"], diff_id]}
        entry = {"created": created, "created_by": "graphdriver image commit"}
        if message:
            entry["comment"] = message
        if author:
            entry["author"] = author
        cfg["history"] = [*(cfg.get("history") or []), entry]
        config = parse_config(json.dumps(cfg, separators=(",", ":")).encode())
        return store.add_image(config, tags=[str(ref)] if ref else [])
