"""The Driver protocol (moby's graphdriver.Driver in snake_case) and the options it takes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

from .archive.changes import Change, ChangeKind

if TYPE_CHECKING:
    from types import TracebackType

    from .archive.options import ApplyResult
    from .layers import LayerRecord

__all__ = ["Change", "ChangeKind", "CreateOpts", "DiffGetter", "Driver"]


@dataclass(frozen=True)
class CreateOpts:
    """Options for create/create_rw: moby's CreateOpts (MountLabel, StorageOpt)."""

    mount_label: str = ""
    storage_opt: dict[str, str] = field(default_factory=dict)
    #: who makes the layer: "user", "image" or "snapshotter" (kept in its record)
    made_by: str = "user"
    #: a holder the layer is made with (as ``hold`` adds it, in the same record write)
    holder: str | None = None


class DiffGetter(Protocol):
    """Opens the files of a layer by their path inside the layer (for exact tar re-assembly)."""

    def open(self, path: str) -> BinaryIO: ...

    def close(self) -> None: ...


@runtime_checkable
class Driver(Protocol):
    """What every storage driver offers.  Layer ids are caller-chosen (see layers.validate_id)."""

    name: str
    home: Path

    def status(self) -> list[tuple[str, str]]: ...

    def exists(self, layer_id: str) -> bool: ...

    def create(
        self, layer_id: str, parent: str | None = None, opts: CreateOpts | None = None
    ) -> None: ...

    def create_rw(
        self, layer_id: str, parent: str | None = None, opts: CreateOpts | None = None
    ) -> None: ...

    def remove(self, layer_id: str, *, releasing: str | None = None) -> None: ...

    def get(self, layer_id: str, mount_label: str = "") -> Path: ...

    def put(self, layer_id: str) -> None: ...

    def diff(self, layer_id: str, parent: str | None = None) -> BinaryIO: ...

    def changes(self, layer_id: str, parent: str | None = None) -> list[Change]: ...

    def apply_diff(
        self,
        layer_id: str,
        parent: str | None,
        stream: BinaryIO | int,
        progress: Callable[[int], None] | None = None,
    ) -> int: ...

    def diff_size(self, layer_id: str, parent: str | None = None) -> int: ...

    def metadata(self, layer_id: str) -> dict[str, str]: ...

    def cleanup(self) -> None: ...

    def diff_getter(self, layer_id: str) -> DiffGetter: ...

    def layers(self) -> list[str]: ...

    def parent(self, layer_id: str) -> str | None: ...

    def children(self, layer_id: str) -> list[str]: ...

    def broken_layers(self) -> dict[str, str]: ...

    def record(self, layer_id: str) -> LayerRecord: ...

    def resolve_parent(self, layer_id: str, parent: str | None) -> str | None: ...

    def mounted(self, layer_id: str, mount_label: str = "") -> contextlib.AbstractContextManager[
        Path]: ...

    def mount_count(self, layer_id: str) -> int: ...

    def apply_diff_result(
        self,
        layer_id: str,
        parent: str | None,
        stream: BinaryIO | int,
        progress: Callable[[int], None] | None = None,
    ) -> ApplyResult: ...

    def write_diff(self, out_fd: int, layer_id: str, parent: str | None = None,
                   progress: Callable[[int], None] | None = None) -> None: ...

    def hold(self, layer_id: str, holder: str) -> None: ...

    def release(self, layer_id: str, holder: str) -> None: ...

    def commit_new_layer(
        self,
        parent: str | None,
        stream: BinaryIO | int,
        *,
        layer_id_for: Callable[[str], str],
        made_by: str,
        expected_diff_id: str | None = None,
        holder: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[str, ApplyResult]: ...

    def freeze(self, layer_id: str) -> None: ...

    def capabilities(self) -> dict[str, bool]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Driver: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


@contextlib.contextmanager
def mounted(driver: Driver, layer_id: str, mount_label: str = "") -> Iterator[Path]:
    """``with mounted(d, id) as root:`` — get on entry, put on exit, even on error."""
    path = driver.get(layer_id, mount_label)
    try:
        yield path
    finally:
        driver.put(layer_id)
