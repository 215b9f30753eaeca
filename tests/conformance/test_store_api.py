"""The store API the image store and the snapshotter build on, run by every driver.

Records say who made a layer and who holds it; ``remove`` refuses while held; a layer can be
committed under an id known only once its diff is hashed (``commit_new_layer``); a writable layer
freezes in place; each driver reports its capabilities.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from graphdriver import (
    AlreadyExists,
    CreateOpts,
    Driver,
    InUse,
    InvalidArchive,
    InvalidArgument,
    NotFound,
    NotSupported,
)
from graphdriver.layers import STAGING_PREFIX
from tests.conftest import IS_ROOT
from tests.drivers.wintar_build import WinTarBuilder
from tests.treeutil import TarBuilder

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="the conformance suite runs as root "
                                "(or rootless inside `graphdriver unshare`)")


def layer_tar(d: Any, content: bytes = b"hello\n") -> bytes:
    """A one-file layer tar in the format the driver stores."""
    if d.name == "windowsfilter":
        return WinTarBuilder().dir("Files").file("Files/hello.txt", content).bytes()
    return TarBuilder().dir("etc").file("etc/hello", content).bytes()


def diff_id_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_id(parent: str | None) -> Any:
    def layer_id_for(diff_id: str) -> str:
        text = diff_id if parent is None else f"{parent} {diff_id}"
        return hashlib.sha256(text.encode()).hexdigest()
    return layer_id_for


def leftovers(d: Any) -> list[str]:
    """Names of anything staged or half-removed in the home or meta/."""
    out = []
    for root in (Path(d.home), Path(d.home) / "meta", *([Path(d.home) / "dir"]
                                                       if d.name == "vfs" else [])):
        out += [n for n in os.listdir(root) if n.startswith(STAGING_PREFIX)
                or n.endswith("-removing")]
    return out


def test_driver_satisfies_the_protocol(driver: Any) -> None:
    assert isinstance(driver, Driver)
    caps = driver.capabilities()
    assert isinstance(caps["reproduces_exact_diffs"], bool)
    assert isinstance(caps["quota"], bool)
    with driver as same:
        assert same is driver


def test_record_fields_and_made_by(driver: Any) -> None:
    driver.create("mine")
    driver.create("pulled", opts=CreateOpts(made_by="image"))
    assert driver.record("mine").made_by == "user"
    assert driver.record("pulled").made_by == "image"
    assert driver.record("mine").holders == []
    assert driver.record("mine").diff_id is None
    with pytest.raises(InvalidArgument):
        driver.create("bad", opts=CreateOpts(made_by="somebody"))
    assert not driver.exists("bad")


def test_old_records_read_fine(driver: Any) -> None:
    driver.create("old")
    path = Path(driver.home) / "meta" / "old" / "layer.json"
    obj = json.loads(path.read_bytes())
    for name in ("made_by", "holders", "diff_id"):
        del obj[name]
    obj["extra"] = {"diff_id": "sha256:" + "a" * 64}
    path.write_text(json.dumps(obj))
    rec = driver.record("old")
    assert (rec.made_by, rec.holders, rec.diff_id) == ("user", [], "sha256:" + "a" * 64)


def test_hold_release_and_remove_refused_while_held(driver: Any) -> None:
    driver.create("held")
    driver.hold("held", "snapshot:b")
    driver.hold("held", "image:sha256:" + "1" * 64)
    driver.hold("held", "snapshot:b")  # idempotent
    assert driver.record("held").holders == ["image:sha256:" + "1" * 64, "snapshot:b"]
    with pytest.raises(InUse, match="held by"):
        driver.remove("held")
    driver.release("held", "snapshot:b")
    driver.release("held", "snapshot:b")  # a missing holder: no-op
    with pytest.raises(InUse):
        driver.remove("held")
    driver.release("held", "image:sha256:" + "1" * 64)
    driver.remove("held")
    driver.release("held", "snapshot:b")  # a missing layer: no-op
    with pytest.raises(NotFound):
        driver.hold("held", "snapshot:b")
    driver.create("x")
    with pytest.raises(InvalidArgument):
        driver.hold("x", "two\nlines")


def test_created_held_and_removed_releasing_its_holder(driver: Any) -> None:
    """The snapshotter's pair: a layer made with its holder in the first record, removed with
    that hold in one step; any other holder still refuses the removal."""
    driver.create_rw("sn", None, CreateOpts(made_by="snapshotter", holder="snapshot:sn"))
    assert driver.record("sn").holders == ["snapshot:sn"]
    with pytest.raises(InUse, match="held by snapshot:sn"):
        driver.remove("sn")
    driver.hold("sn", "image:a")
    with pytest.raises(InUse, match="held by image:a"):
        driver.remove("sn", releasing="snapshot:sn")
    driver.release("sn", "image:a")
    driver.remove("sn", releasing="snapshot:sn")
    assert not driver.exists("sn")
    with pytest.raises(InvalidArgument):
        driver.create("bad", None, CreateOpts(holder="two\nlines"))


def test_commit_new_layer_base_and_child(driver: Any) -> None:
    data = layer_tar(driver)
    base, result = driver.commit_new_layer(None, io.BytesIO(data), layer_id_for=chain_id(None),
                                           made_by="image", holder="image:a")
    assert result.diff_id == diff_id_of(data)
    assert base == chain_id(None)(result.diff_id)
    rec = driver.record(base)
    assert (rec.parent, rec.made_by, rec.holders, rec.diff_id, rec.kind) == (
        None, "image", ["image:a"], result.diff_id, "ro")
    assert driver.layers() == [base]
    child_data = layer_tar(driver, b"child\n")
    child, _ = driver.commit_new_layer(base, io.BytesIO(child_data),
                                          layer_id_for=chain_id(base), made_by="image")
    assert driver.parent(child) == base
    assert driver.children(base) == [child]
    assert driver.record(child).diff_id == diff_id_of(child_data)
    assert leftovers(driver) == []
    assert not [n for n in os.listdir(Path(driver.home) / "locks") if n.startswith(".")]
    with driver.mounted(child) as root:
        name = "hello.txt" if driver.name == "windowsfilter" else "etc/hello"  # Files/ is root
        assert (root / name).read_bytes() == b"child\n"
    with pytest.raises(InUse):
        driver.remove(base)


def test_commit_new_layer_reuses_an_equal_layer(driver: Any) -> None:
    data = layer_tar(driver)
    first, _ = driver.commit_new_layer(None, io.BytesIO(data), layer_id_for=chain_id(None),
                                       made_by="image", holder="image:a")
    again, _ = driver.commit_new_layer(None, io.BytesIO(data), layer_id_for=chain_id(None),
                                       made_by="image", holder="image:b")
    assert again == first
    assert driver.record(first).holders == ["image:a", "image:b"]
    assert driver.layers() == [first]
    assert leftovers(driver) == []


def test_commit_new_layer_refuses_an_other_existing_layer(driver: Any) -> None:
    data = layer_tar(driver)
    taken = chain_id(None)(diff_id_of(data))
    driver.create(taken)  # same id, made by the user, no diffID
    with pytest.raises(AlreadyExists):
        driver.commit_new_layer(None, io.BytesIO(data), layer_id_for=chain_id(None),
                                made_by="image")
    assert driver.layers() == [taken]
    assert leftovers(driver) == []


def test_commit_new_layer_expected_diff_id_mismatch_leaves_nothing(driver: Any) -> None:
    with pytest.raises(InvalidArchive, match="expected"):
        driver.commit_new_layer(None, io.BytesIO(layer_tar(driver)),
                                layer_id_for=chain_id(None), made_by="image",
                                expected_diff_id="sha256:" + "0" * 64)
    assert driver.layers() == []
    assert leftovers(driver) == []


def test_commit_new_layer_bad_stream_or_parent_leaves_nothing(driver: Any) -> None:
    with pytest.raises(InvalidArchive):
        driver.commit_new_layer(None, io.BytesIO(b"not a tar" * 100),
                                layer_id_for=chain_id(None), made_by="image")
    with pytest.raises(NotFound):
        driver.commit_new_layer("missing", io.BytesIO(layer_tar(driver)),
                                layer_id_for=chain_id("missing"), made_by="image")
    with pytest.raises(InvalidArgument):
        driver.commit_new_layer(None, io.BytesIO(layer_tar(driver)),
                                layer_id_for=lambda _d: "../escape", made_by="image")
    assert driver.layers() == []
    assert leftovers(driver) == []


def test_staging_leftovers_are_removed_by_repair(driver: Any) -> None:
    """A crash inside commit_new_layer: the staged layer (and a half-renamed target) go."""
    from graphdriver.layers import COMMIT_INTENT, LayerRecord

    driver.create("keep")
    staged = LayerRecord(id=STAGING_PREFIX + "0" * 32, parent=None, kind="ro", made_by="image")
    driver._create_locked(staged, staged=True)
    # The intent says which id it was being renamed to; a half-renamed target is removed too.
    driver.meta.mark_incomplete(staged.id, f"{COMMIT_INTENT} target")
    again = type(driver)(driver.home, runroot=driver.runroot)
    assert again.layers() == ["keep"]
    assert leftovers(again) == []
    assert not os.path.lexists(Path(driver.home) / "meta" / staged.id)


def test_repair_leaves_a_running_removal_alone(driver: Any) -> None:
    """remove() renames a layer aside under the store lock and destroys it holding only the
    layer's lock: a store opened meanwhile (another process's repair) must not destroy what that
    removal is destroying, and does destroy it once nobody holds the lock (a crash's leftover)."""
    from graphdriver.layers import REMOVING_SUFFIX

    driver.create("going")
    meta_dir = Path(driver.home) / "meta" / "going"
    aside = meta_dir.with_name("going" + REMOVING_SUFFIX)
    lock = driver.layer_lock("going")
    lock.acquire()
    try:
        os.rename(meta_dir, aside)  # where remove() is when it releases the store lock
        type(driver)(driver.home, runroot=driver.runroot)
        assert os.path.isdir(aside)
    finally:
        lock.release()
    type(driver)(driver.home, runroot=driver.runroot)
    assert not os.path.lexists(aside)


def test_repair_finishes_a_removal_cut_short(driver: Any) -> None:
    """remove() renames the layer's paths aside one by one and its record last: a crash between
    those renames leaves a record whose paths are (partly) gone. The next open finishes that
    removal (the layer is gone, nothing renamed aside is left) and leaves its parent whole."""
    from graphdriver.layers import REMOVING_SUFFIX

    driver.create("base")
    driver.apply_diff("base", None, io.BytesIO(layer_tar(driver)))
    paths = [p for p in driver._layer_paths("base") if os.path.lexists(p)]
    assert paths
    for cut in range(1, len(paths) + 1):
        driver.create("going", "base")
        for path in driver._layer_paths("going")[:cut]:
            os.rename(path, path.with_name(path.name + REMOVING_SUFFIX))
        again = type(driver)(driver.home, runroot=driver.runroot)
        assert again.layers() == ["base"], cut
        assert again.children("base") == []
        assert leftovers(again) == []
        if driver.name == "overlay":
            assert sorted(os.listdir(Path(driver.home) / "l")) == [driver._short("base")]
        with again.mounted("base") as root:
            assert os.listdir(root)
        driver = again


def test_freeze_in_place(driver: Any) -> None:
    driver.create("base")
    driver.create_rw("work", "base")
    if driver.name == "windowsfilter":
        with pytest.raises(NotSupported):
            driver.freeze("work")
        return
    with driver.mounted("work") as root:
        (root / "made").write_bytes(b"in the container\n")
        with pytest.raises(InUse):
            driver.freeze("work")
    driver.freeze("work")
    driver.freeze("work")  # idempotent
    assert driver.record("work").kind == "ro"
    driver.create("next", "work")
    with driver.mounted("next") as root:
        assert (root / "made").read_bytes() == b"in the container\n"
