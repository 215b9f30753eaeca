"""What ``image inspect``, ``image ls`` and ``image history`` print: docker's keys and columns,
and the one ``--format`` template language (a Go-template subset: ``{{.Id}}``, ``{{.Config.Env}}``,
``{{json .Config}}``, ``{{index .RepoTags 0}}``).

Owns presentation; imports the ImageStore's records and ``reference``; never the network.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from typing import Any

from ..errors import InvalidArgument
from ..units import human_size
from . import reference
from .store import Image, ImageStore

_ACTION_RE = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}")


def docker_inspect(store: ImageStore, image: Image) -> dict[str, Any]:
    cfg = image.config.obj
    tags = [reference.parse(t).familiar() for t in store.meta.tags_of(image.id)]
    digests = [reference.parse(d).familiar() for d in store.meta.repo_digests_of(image.id)]
    return {
        "Id": image.id,
        "RepoTags": tags,
        "RepoDigests": digests,
        "Parent": "",
        "Comment": _last_comment(cfg),
        "Created": cfg.get("created", ""),
        "Author": cfg.get("author", ""),
        "Config": cfg.get("config") or {},
        "Architecture": cfg.get("architecture", ""),
        "Variant": cfg.get("variant", ""),
        "Os": cfg.get("os", ""),
        "OsVersion": cfg.get("os.version", ""),
        "Size": image.record.size,
        "GraphDriver": {"Name": store.driver.name,
                        "Data": {"Layers": list(image.record.layers)}},
        "RootFS": {"Type": "layers", "Layers": image.config.diff_ids},
        "Metadata": {"LastTagTime": ""},
    }


def _last_comment(cfg: dict[str, Any]) -> str:
    history = cfg.get("history") or []
    return str(history[-1].get("comment", "")) if history else ""


def _created_seconds(value: str) -> float | None:
    if not value:
        return None
    text = value.rstrip("Z")
    if "." in text:
        head, frac = text.split(".", 1)
        text = f"{head}.{frac[:6]}"
    try:
        return datetime.fromisoformat(text + "+00:00").timestamp()
    except ValueError:
        return None


def ago(value: str) -> str:
    """docker's "N units ago" for an RFC 3339 time."""
    when = _created_seconds(value)
    if when is None:
        return "N/A"
    delta = max(0.0, time.time() - when)
    for size, unit in ((365 * 86400, "year"), (30 * 86400, "month"), (7 * 86400, "week"),
                       (86400, "day"), (3600, "hour"), (60, "minute")):
        if delta >= size:
            n = int(delta // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "Less than a second ago" if delta < 1 else f"{int(delta)} seconds ago"


def ls_rows(store: ImageStore) -> list[dict[str, Any]]:
    """One row per tag, and one ``<none>`` row per untagged image (as ``docker images``)."""
    rows = []
    for image in store.images():
        created = str(image.config.obj.get("created", ""))
        base = {"ID": image.id[7:19], "Id": image.id, "CreatedAt": created,
                "CreatedSince": ago(created), "Size": human_size(image.record.size),
                "VirtualSize": image.record.size}
        tags: list[str | None] = [*store.meta.tags_of(image.id)]
        for t in tags or [None]:
            if t is None:
                rows.append({"Repository": "<none>", "Tag": "<none>", **base})
                continue
            ref = reference.parse(t)
            rows.append({"Repository": ref.familiar_name(), "Tag": ref.tag, **base})
    return rows


def history_rows(image: Image) -> list[dict[str, Any]]:
    """Newest first, as ``docker history``: layers of non-empty entries are named by diffID."""
    cfg = image.config.obj
    layers = list(image.config.diff_ids)
    rows = []
    for entry in cfg.get("history") or []:
        empty = bool(entry.get("empty_layer"))
        layer = "" if empty or not layers else layers.pop(0)
        rows.append({"CreatedAt": entry.get("created", ""),
                     "CreatedSince": ago(str(entry.get("created", ""))),
                     "CreatedBy": entry.get("created_by", ""),
                     "Comment": entry.get("comment", ""), "Layer": layer,
                     "EmptyLayer": empty})
    return rows[::-1]


def render(template: str, obj: Any) -> str:
    """A Go-template subset: fields, ``json``, ``index``, ``join``, ``lower``, ``upper``."""
    def action(m: re.Match[str]) -> str:
        return _fmt(_eval(m.group(1), obj))

    return _ACTION_RE.sub(action, template.encode().decode("unicode_escape"))


def _fmt(value: Any) -> str:
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + " ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{_fmt(v)}" for k, v in sorted(value.items())) + "]"
    return str(value)


def _field(path: str, obj: Any) -> Any:
    if path == ".":
        return obj
    if not path.startswith("."):
        return json.loads(path) if path[:1] in ('"', "-") or path.isdigit() else path
    value = obj
    for part in path[1:].split("."):
        if not isinstance(value, dict):
            raise InvalidArgument(f"template: can't evaluate field {part} in {path}")
        value = value.get(part)
    return value


def _eval(expr: str, obj: Any) -> Any:
    words = expr.split()
    if not words:
        raise InvalidArgument("template: empty action")
    fn, args = words[0], [_field(w, obj) for w in words[1:]]
    if fn == "json" and len(args) == 1:
        return _Raw(json.dumps(args[0]))
    if fn == "index" and len(args) == 2:
        try:
            return args[0][args[1]]
        except (KeyError, IndexError, TypeError) as exc:
            raise InvalidArgument(f"template: index {args[1]!r} out of range") from exc
    if fn == "join" and len(args) == 2:
        return str(args[1]).join(str(a) for a in args[0] or [])
    if fn in ("lower", "upper") and len(args) == 1:
        return getattr(str(args[0]), fn)()
    if len(words) == 1:
        return _field(fn, obj)
    raise InvalidArgument(f"template: unsupported action {{{{{expr}}}}}")


class _Raw(str):
    """Already formatted (json): printed as is."""
