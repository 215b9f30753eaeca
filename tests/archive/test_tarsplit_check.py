"""The after-apply check of the files a tar-split record names (TarSplitPacker.verify): a layer
whose files do not match the record is found out, whichever way it was broken -- after the apply
or by a later entry of the tar -- natively (the records cut into runs, one thread each) and the
Python way, in one chunk of records or several (spilled)."""
from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from graphdriver import exactdiff as ed
from graphdriver.archive import tarsplit as ts
from graphdriver.archive.apply import ApplyOptions, apply_reader
from graphdriver.archive.recframes import BufferedRecorder
from graphdriver.archive.tarstream import TarReader
from graphdriver.archive.whiteout import FORMATS

#: files in the layer: enough records (~80 KB) for the native check to use two runs
COUNT = 1600
NAMES = [f"dir{i // 100:02d}/file-{i:05d}-with-a-longer-name" for i in range(COUNT)]


def _size(i: int) -> int:
    return 1 + i % 7


def _tar(tmp_path: Path, extra: list[tarfile.TarInfo] | None = None) -> Path:
    out = tmp_path / "layer.tar"
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as t:
        for i, name in enumerate(NAMES):
            ti = tarfile.TarInfo(name)
            ti.size = _size(i)
            t.addfile(ti, io.BytesIO(b"x" * ti.size))
        for ti in extra or []:
            t.addfile(ti, io.BytesIO(b"x" * ti.size) if ti.isreg() else None)
    return out


@pytest.fixture(params=["native", "python"])
def check_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "native":
        if ts._fastapply is None:
            pytest.skip("native extension not compiled")
    else:
        monkeypatch.setattr(ts, "_fastapply", None)
    return str(request.param)


@pytest.fixture(params=["one chunk", "spilled"])
def applied(request: pytest.FixtureRequest, tmp_path: Path, check_path: str,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, int, ts.TarSplitPacker]]:
    """The layer applied with the recording as the confined child makes it; the packer closed."""
    if request.param == "spilled":
        monkeypatch.setattr(ts, "_SPILL", 16 << 10)
    root = tmp_path / "root"
    root.mkdir()
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        out = io.BytesIO()
        packer = ts.TarSplitPacker(out, compress=True, spill_dir_fd=root_fd)  # type: ignore[arg-type]
        rec = BufferedRecorder(packer, batch=4096, threaded=True)
        with open(_tar(tmp_path), "rb") as f:
            reader = TarReader(f, rec)  # type: ignore[arg-type]
            apply_reader(reader, root_fd, ApplyOptions(whiteout_format=FORMATS["overlay"],
                                                       recorder=rec))
        rec.close()
        packer.close()
        assert packer.problem is None and not packer.missing
        if request.param == "spilled":
            assert len(packer._records._sizes) > 2
        assert packer.summary(root_fd)["unverified"] is None
        yield root, root_fd, packer
        packer.release()
    finally:
        os.close(root_fd)


def _write(path: Path, size: int) -> None:
    path.write_bytes(b"x" * size)


def _removed(root: Path, i: int) -> Callable[[], None]:
    p = root / NAMES[i]
    p.unlink()
    return lambda: _write(p, _size(i))


def _truncated(root: Path, i: int) -> Callable[[], None]:
    p = root / NAMES[i]
    os.truncate(p, _size(i) + 1)
    return lambda: os.truncate(p, _size(i))


def _a_directory(root: Path, i: int) -> Callable[[], None]:
    p = root / NAMES[i]
    p.unlink()
    p.mkdir()

    def undo() -> None:
        p.rmdir()
        _write(p, _size(i))
    return undo


def _a_symlink(root: Path, i: int) -> Callable[[], None]:
    p = root / NAMES[i]
    p.rename(p.with_name("aside"))
    p.symlink_to("aside")  # to a regular file of that size

    def undo() -> None:
        p.unlink()
        p.with_name("aside").rename(p)
    return undo


def _a_fifo(root: Path, i: int) -> Callable[[], None]:
    p = root / NAMES[i]
    p.unlink()
    os.mkfifo(p)

    def undo() -> None:
        p.unlink()
        _write(p, _size(i))
    return undo


def _parent_a_symlink(root: Path, i: int) -> Callable[[], None]:
    d = (root / NAMES[i]).parent
    d.rename(d.with_name("aside"))
    d.symlink_to("aside")  # the same files, reached through a symlink

    def undo() -> None:
        d.unlink()
        d.with_name("aside").rename(d)
    return undo


def _hard_link(root: Path, i: int) -> Callable[[], None]:
    # the recorded file of the same size 7 entries away becomes the same inode as this one
    j = i - 7 if i >= 7 else i + 7
    p = root / NAMES[j]
    p.rename(p.with_name("aside"))
    os.link(root / NAMES[i], p)

    def undo() -> None:
        p.unlink()
        p.with_name("aside").rename(p)
    return undo


BREAKS: dict[str, tuple[Callable[[Path, int], Callable[[], None]], str]] = {
    "removed": (_removed, "is not in the layer after the apply"),
    "another size": (_truncated, "bytes after the apply, the archive gave"),
    "a directory": (_a_directory, "is not a regular file after the apply"),
    "a symlink": (_a_symlink, "is not a regular file after the apply"),
    "a fifo": (_a_fifo, "is not a regular file after the apply"),
    "its directory a symlink": (_parent_a_symlink, "is not in the layer after the apply"),
    "a hard link of another": (_hard_link, "is the same file as another entry"),
}


@pytest.mark.parametrize("how", sorted(BREAKS))
def test_a_layer_broken_after_the_apply_is_found_out(
        applied: tuple[Path, int, ts.TarSplitPacker], how: str) -> None:
    root, root_fd, packer = applied
    brk, words = BREAKS[how]
    for i in (0, 1, COUNT // 2 - 1, COUNT // 2, COUNT // 2 + 1, COUNT - 1):
        undo = brk(root, i)
        why = packer.verify(root_fd)
        assert why is not None and words in why, (i, why)
        undo()
        assert packer.verify(root_fd) is None, i


def _entry(name: str, kind: bytes, size: int = 0, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.size = size
    ti.linkname = link
    return ti


#: later entries of the tar that change a recorded file (True) or leave it as it was (False)
LATER: dict[str, tuple[list[tarfile.TarInfo], bool]] = {
    "its directory replaced by a symlink": (
        [_entry("dir15", tarfile.SYMTYPE, link="dir00")], True),
    "its directory replaced by a file": ([_entry("dir15", tarfile.REGTYPE, 3)], True),
    "its directory replaced by a hard link": (
        [_entry("dir15", tarfile.LNKTYPE, link=NAMES[0])], True),
    "a hard link to it": ([_entry("more", tarfile.LNKTYPE, link=NAMES[-1])], False),
    "a whiteout of it": ([_entry(NAMES[-1].replace("/file", "/.wh.file"), tarfile.REGTYPE)],
                         False),
    "an opaque marker beside it": ([_entry("dir15/.wh..wh..opq", tarfile.REGTYPE)], False),
    "its directory's own entry": ([_entry("dir15", tarfile.DIRTYPE)], False),
}


@pytest.mark.parametrize("case", sorted(LATER))
def test_a_later_entry_that_changes_a_recorded_file_is_found_out(
        store: object, tmp_path: Path, case: str) -> None:
    """Through the driver (the confined child checks what its packer recorded)."""
    extra, breaks = LATER[case]
    tar = _tar(tmp_path, extra)
    store.create("layer")  # type: ignore[attr-defined]
    with open(tar, "rb") as f:
        store.apply_diff("layer", None, f)  # type: ignore[attr-defined]
    ok, why = ed.exact_available(store, "layer")
    if breaks:
        assert not ok and "is not in the layer after the apply" in str(why), why
    else:
        assert ok, why
