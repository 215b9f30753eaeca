"""Docker's image reference grammar and its normalisation (distribution/reference).

``busybox`` is ``docker.io/library/busybox:latest``; ``host:port/repo:tag``; ``repo@sha256:...``.
Owns parsing and printing references; imports nothing of graphdriver but ``errors``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidArgument

DEFAULT_DOMAIN = "docker.io"
LEGACY_DOMAIN = "index.docker.io"
DOCKER_HUB_HOST = "registry-1.docker.io"
OFFICIAL_PREFIX = "library/"
DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6 = r"\[[a-fA-F0-9:]+\]"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|{_IPV6})(?::[0-9]+)?"
_PATH_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*\Z")
_DOMAIN_RE = re.compile(rf"{_DOMAIN}\Z")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}\Z")
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}\Z|sha512:[a-f0-9]{128}\Z")
_ID_PREFIX_RE = re.compile(r"(?:sha256:)?[a-f0-9]{12,64}\Z")
NAME_TOTAL_LENGTH_MAX = 255


@dataclass(frozen=True)
class Reference:
    """A normalised reference: ``domain/path`` with a tag, a digest, or both."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``domain/path``, e.g. ``docker.io/library/busybox``."""
        return f"{self.domain}/{self.path}"

    @property
    def registry_host(self) -> str:
        """The host to talk to: Docker Hub's ``docker.io`` is served by registry-1.docker.io."""
        return DOCKER_HUB_HOST if self.domain == DEFAULT_DOMAIN else self.domain

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    def familiar_name(self) -> str:
        """The name as Docker prints it: ``busybox``, ``user/app``, ``host:5000/app``."""
        if self.domain != DEFAULT_DOMAIN:
            return self.name
        return self.path.removeprefix(OFFICIAL_PREFIX)

    def familiar(self) -> str:
        out = self.familiar_name()
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.domain, self.path, tag, None)

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.domain, self.path, None, digest)

    @property
    def manifest_ref(self) -> str:
        """What /v2/NAME/manifests/ is asked for: the digest if any, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if not sep or ("." not in first and ":" not in first and first != "localhost"
                   and first == first.lower()):
        return DEFAULT_DOMAIN, name
    return first, rest


def parse(text: str, *, default_tag: bool = True) -> Reference:
    """Parse and normalise a reference; ``default_tag`` adds ``:latest`` when neither is given."""
    if not text or text != text.strip():
        raise InvalidArgument(f"invalid reference format: {text!r}")
    rest, at, digest = text.partition("@")
    if at and not DIGEST_RE.match(digest):
        raise InvalidArgument(f"invalid reference format: {text!r}: bad digest {digest!r}")
    name, tag = rest, None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        name, tag = rest[:colon], rest[colon + 1:]
        if not _TAG_RE.match(tag):
            raise InvalidArgument(f"invalid reference format: {text!r}: bad tag {tag!r}")
    domain, path = _split_domain(name)
    if domain == LEGACY_DOMAIN:
        domain = DEFAULT_DOMAIN
    if not _DOMAIN_RE.match(domain):
        raise InvalidArgument(f"invalid reference format: {text!r}: bad registry {domain!r}")
    if path != path.lower():
        raise InvalidArgument(f"invalid reference format: repository name must be lowercase: "
                              f"{text!r}")
    if not _PATH_RE.match(path):
        raise InvalidArgument(f"invalid reference format: {text!r}")
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_PREFIX + path
    if len(domain) + 1 + len(path) > NAME_TOTAL_LENGTH_MAX:
        raise InvalidArgument(f"invalid reference format: {text!r}: name longer than "
                              f"{NAME_TOTAL_LENGTH_MAX}")
    if tag is None and not at and default_tag:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest or None)


def looks_like_id(text: str) -> bool:
    """An image ID (``sha256:<hex>``) or a prefix of 12+ hex digits."""
    return bool(_ID_PREFIX_RE.match(text)) and (text.startswith("sha256:") or len(text) >= 12)
