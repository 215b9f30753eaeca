"""Platforms (os/arch/variant, os.version) and choosing one manifest from an index.

Owns the default platform (the driver's) and index selection, as containerd's ``platforms``
package does; imports only ``errors``.
"""

from __future__ import annotations

import platform as _platform
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgument, NotFound, NotSupported

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm",
                 "armel": "arm", "i386": "386", "i686": "386"}
_DEFAULT_VARIANT = {"arm64": "v8"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, other: dict[str, Any]) -> bool:
        """Whether an index entry's (or a config's) platform fields are this platform."""
        arch = normalize_arch(str(other.get("architecture", "")))
        if str(other.get("os", "")) != self.os or arch != self.architecture:
            return False
        variant = str(other.get("variant", "")) or _DEFAULT_VARIANT.get(arch, "")
        want = self.variant or _DEFAULT_VARIANT.get(self.architecture, "")
        return not want or not variant or variant == want


def normalize_arch(arch: str) -> str:
    return _ARCH_ALIASES.get(arch.lower(), arch.lower())


def parse(text: str) -> Platform:
    """``OS/ARCH[/VARIANT]``."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidArgument(f"invalid platform {text!r}: use OS/ARCH[/VARIANT]")
    return Platform(parts[0].lower(), normalize_arch(parts[1]),
                    parts[2] if len(parts) == 3 else "")


def host_platform() -> Platform:
    return Platform("linux", normalize_arch(_platform.machine()))


def driver_os(driver_name: str) -> str:
    """The OS whose layers a driver stores: windowsfilter stores Windows layers."""
    return "windows" if driver_name == "windowsfilter" else "linux"


def driver_platform(driver_name: str) -> Platform:
    if driver_os(driver_name) == "windows":
        return Platform("windows", "amd64")
    return host_platform()


def check_os(image_os: str, driver_name: str) -> None:
    """Refuse a Windows image in a Linux driver, and the reverse."""
    want = driver_os(driver_name)
    if (image_os or "linux") != want:
        raise NotSupported(f"a {image_os} image cannot be stored by the {driver_name} driver "
                           f"(it stores {want} layers)")


def select(manifests: list[dict[str, Any]], want: Platform) -> dict[str, Any]:
    """The index entry for *want*: exact variant first; for Windows, the newest os.version."""
    candidates = [m for m in manifests if want.matches(m.get("platform") or {})]
    if not candidates:
        have = ", ".join(sorted({_describe(m.get("platform") or {}) for m in manifests}))
        raise NotFound(f"no image for platform {want} in the index (it has: {have or 'none'})")
    if want.os_version:
        exact = [m for m in candidates if m.get("platform", {}).get("os.version")
                 == want.os_version]
        candidates = exact or candidates

    def rank(m: dict[str, Any]) -> tuple[int, tuple[int, ...]]:
        plat = m.get("platform") or {}
        same_variant = int(str(plat.get("variant", "")) == want.variant)
        version = tuple(int(x) for x in str(plat.get("os.version", "0")).split(".")
                        if x.isdigit())
        return same_variant, version

    return max(candidates, key=rank)


def _describe(plat: dict[str, Any]) -> str:
    parts = [str(plat.get("os", "?")), str(plat.get("architecture", "?"))]
    if plat.get("variant"):
        parts.append(str(plat["variant"]))
    return "/".join(parts)
