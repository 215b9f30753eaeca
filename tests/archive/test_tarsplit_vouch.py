"""The apply vouches for the files it wrote (ApplyResult.vouched), and the check after it is then
skipped: only when it provably would pass.  Real confined applies with the store's recording
(the child packs and checks), with and without the native helpers: every kind of archive that
overwrites, replaces, removes or hides its own earlier files, or that lands on a target that
was not empty, still has its files checked, and its exact diff is the archive byte for byte when
it can be, or the layer is marked when not; a plain archive is not checked, and its exact diff
is still the archive byte for byte."""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import pytest
from tarbuild import build, header, member, pad  # type: ignore[import-not-found]

from graphdriver import exactdiff as ed
from graphdriver.archive import confine, tarsplit
from graphdriver.archive.apply import ApplyOptions, apply_reader
from graphdriver.archive.isolate import apply_confined
from graphdriver.archive.tarstream import TarReader
from graphdriver.archive.whiteout import FORMATS

BASE = (member("d/", type=b"5", mode=0o755), member("d/f", b"hello"), member("g", b"world!"),
        member("d/e/h", b"deeper" * 100))


def _volume(name: str, data: bytes) -> bytes:
    return header(name, type=b"V", size=len(data)) + pad(data)


#: archives whose apply changes (or may change) what it wrote: (extra members, what comes of
#: the recording: "exact" when the check passes, else words of the reason the layer is marked)
OVERWRITES: dict[str, tuple[tuple[bytes, ...], str]] = {
    "a directory replaced by a file": ((member("d/e", b"x"),), "is not in the layer after"),
    "a directory replaced by a symlink": ((member("d/e", type=b"2", linkname="d"),),
                                          "is not in the layer after"),
    "a directory replaced by a hard link": ((member("d/e", type=b"1", linkname="g"),),
                                            "is not in the layer after"),
    "a file whited out, then written again": (
        (member("x", b"one"), member(".wh.x"), member("y/z", b"two"), member("y/.wh.z"),
         member("y/z2", b"three")), "exact"),
    "a whiteout of its own file": ((member("d/.wh.f"),), "exact"),
    "an opaque marker beside its files": ((member("d/.wh..wh..opq"),), "exact"),
    "a name twice": ((member("g", b"again"),), "appears twice"),
    "a directory over a file of the same name": ((member("g/", type=b"5"),), "appears twice"),
    "an AUFS hard-link file": ((member(".wh..wh.plnk/1.2", b"aufs"),
                                member("l", type=b"1", linkname=".wh..wh.plnk/1.2")),
                               "is not in the layer after"),
    "a name that cleaning changes": ((member("nowhere/../n", b"nn"),),
                                     "is not in the layer after"),
    "a name through a directory of its own": ((member("d/e/../k", b"kk"),), "exact"),
    "a volume label with data": ((_volume("label", b"vv"),), "is not in the layer after"),
}

#: archives whose apply only creates: the apply vouches, nothing is checked
PLAIN: dict[str, tuple[bytes, ...]] = {
    "files and directories": (),
    "a hard link to its own file": (member("d/link", type=b"1", linkname="d/f"),),
    "a symlink and a fifo": (member("s", type=b"2", linkname="d/f"), member("p", type=b"6")),
    "a directory's entry after its files": (member("d/e/", type=b"5", mode=0o700),),
    "a big file": (member("big", os.urandom(3 << 20)),),
}


@pytest.fixture(params=["native", "python"])
def helpers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The child with the native helpers (when built) or without them (GRAPHDRIVER_NO_NATIVE,
    read by the child that starts for the apply)."""
    confine.discard_prespawned()  # none started before this environment may take the job
    if request.param == "native":
        if tarsplit._fastapply is None:
            pytest.skip("native helpers not built (or GRAPHDRIVER_NO_NATIVE set)")
    else:
        monkeypatch.setenv("GRAPHDRIVER_NO_NATIVE", "1")
    return str(request.param)


def _apply_recorded(work: Path, tar: bytes, before: dict[str, bytes] | None = None,
                    ) -> tuple[dict[str, object], ed.Recording, Path, Path]:
    """The store's recording around a confined apply: the child packs into ``tar-split.raw``
    and checks (or not), then the layer's metadata is finished as the store finishes it."""
    target = work / "layer"
    meta = work / "meta"
    target.mkdir()
    meta.mkdir()
    for name, data in (before or {}).items():
        (target / name).write_bytes(data)
    src = work / "layer.tar"
    src.write_bytes(tar)
    raw_fd = os.open(meta / ed.RAW_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with open(src, "rb") as f:
            result = apply_confined(f.fileno(), target, ApplyOptions(
                whiteout_format=FORMATS["overlay"], packer_fd=raw_fd, journal=True))
        assert result.recording is not None
        rec = ed.finish_layer_recording(meta, raw_fd, target, "layer", result.recording)
    finally:
        os.close(raw_fd)
    return result.recording, rec, target, meta


def _exact(meta: Path, target: Path) -> bytes:
    out = io.BytesIO()
    ed.assemble_layer(meta, lambda name: open(target / name, "rb"), out)  # noqa: SIM115
    return out.getvalue()


@pytest.mark.parametrize("case", sorted(OVERWRITES))
def test_an_archive_that_changes_its_own_files_is_checked(
        work: Path, helpers: str, case: str) -> None:
    extra, outcome = OVERWRITES[case]
    tar = build(*BASE, *extra)
    summary, rec, target, meta = _apply_recorded(work, tar)
    if "appears twice" in outcome:
        assert summary["problem"] is not None  # the duplicate rule: the check has no say
    else:
        assert summary["checked"] is True, summary
    if outcome == "exact":
        assert rec == ed.Recording(True), rec
        assert _exact(meta, target) == tar
    else:
        assert not rec.reproducible and outcome in str(rec.reason), rec


@pytest.mark.parametrize("case", sorted(PLAIN))
def test_an_archive_that_only_creates_is_vouched_for(
        work: Path, helpers: str, case: str) -> None:
    tar = build(*BASE, *PLAIN[case])
    summary, rec, target, meta = _apply_recorded(work, tar)
    assert summary["checked"] is False and summary["unverified"] is None, summary
    assert rec == ed.Recording(True), rec
    assert _exact(meta, target) == tar


@pytest.mark.parametrize("before", [{"g": b"old"}, {"other": b"o"}])
def test_a_target_that_was_not_empty_is_checked(work: Path, helpers: str,
                                                before: dict[str, bytes]) -> None:
    tar = build(*BASE)
    summary, rec, target, meta = _apply_recorded(work, tar, before)
    assert summary["checked"] is True, summary
    assert rec == ed.Recording(True), rec
    assert _exact(meta, target) == tar


@pytest.mark.parametrize("native", [True, False])
def test_the_apply_says_when_it_vouches(work: Path, monkeypatch: pytest.MonkeyPatch,
                                        native: bool) -> None:
    """In process: ApplyResult.vouched for each archive above (the Python entries without the
    native create and loop)."""
    from graphdriver.archive import apply as apply_mod

    if not native:
        monkeypatch.setattr(apply_mod, "_native_create", None)
    elif apply_mod._native_create is None:
        pytest.skip("native helpers not built (or GRAPHDRIVER_NO_NATIVE set)")
    cases = [(f"o-{i}", extra, False) for i, (extra, _) in enumerate(OVERWRITES.values())]
    cases += [(f"p-{i}", extra, True) for i, extra in enumerate(PLAIN.values())]
    for name, extra, vouched in cases:
        target = work / name
        target.mkdir()
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        try:
            reader = TarReader(io.BytesIO(build(*BASE, *extra)))
            result = apply_reader(reader, fd, ApplyOptions(whiteout_format=FORMATS["overlay"]))
        finally:
            os.close(fd)
        assert result.vouched is vouched, name


def test_the_store_keeps_an_exact_diff_of_a_vouched_apply(
        store: object, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Through the driver: a plain layer is vouched for, one that replaces its files is checked;
    both say so, and the plain one's exact diff is its archive."""
    caplog.set_level(logging.DEBUG, logger="graphdriver")
    d: object = store
    plain = build(*BASE, *PLAIN["a hard link to its own file"])
    replaced = build(*BASE, *OVERWRITES["a directory replaced by a file"][0])
    for layer, tar, word in (("plain", plain, "vouched for"), ("replaced", replaced, "checked")):
        caplog.clear()
        d.create(layer)  # type: ignore[attr-defined]
        d.apply_diff(layer, None, io.BytesIO(tar))  # type: ignore[attr-defined]
        said = [r.getMessage() for r in caplog.records if "recorded files were" in r.getMessage()]
        assert said == [f"layer {layer}: the recorded files were {word}"
                        + (" by the apply" if word == "vouched for" else " after the apply")]
    out = io.BytesIO()
    ed.write_exact_diff(d, "plain", out)  # type: ignore[arg-type]
    assert out.getvalue() == plain
    assert not ed.exact_available(d, "replaced")[0]  # type: ignore[arg-type]
