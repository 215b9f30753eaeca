"""containerd 1.6's List filter syntax (filters.py), case by case, as containerd reads it."""

from __future__ import annotations

import pytest

from graphdriver.errors import InvalidArgument
from graphdriver.snapshotter.filters import compile_filters, parse, snapshot_fields

SNAPS = {
    "a-np": ("active", "", {"containerd.io/gc.root": "check-walk"}),
    "p": ("committed", "", {"containerd.io/gc.root": "check-walk"}),
    "a": ("active", "p", {"containerd.io/gc.root": "check-walk"}),
    "v": ("view", "p", {"containerd.io/gc.root": "check-walk"}),
    "p-wl": ("committed", "", {"l": "1", "containerd.io/gc.root": "check-walk"}),
    "a-wl": ("active", "p-wl", {"l": "2", "containerd.io/gc.root": "check-walk"}),
    "v-wl": ("view", "p-wl", {"l": "3", "containerd.io/gc.root": "check-walk"}),
    "a-np-wl": ("active", "", {"l": "2", "containerd.io/gc.root": "check-walk"}),
    "bare": ("active", "", {}),
}


def selected(*filters: str) -> list[str]:
    match = compile_filters(list(filters))
    return sorted(n for n, (kind, parent, labels) in SNAPS.items()
                  if match(snapshot_fields(kind, n, parent, labels)))


@pytest.mark.parametrize(("filters", "expected"), [
    (['labels."containerd.io/gc.root"==check-walk'],
     ["a", "a-np", "a-np-wl", "a-wl", "p", "p-wl", "v", "v-wl"]),
    (['kind==active,labels."containerd.io/gc.root"==check-walk'],
     ["a", "a-np", "a-np-wl", "a-wl"]),
    (["kind==committed"], ["p", "p-wl"]),
    (["name==p", "name==a-np-wl"], ["a-np-wl", "p"]),
    (["name==a-wl,labels.l"], ["a-wl"]),
    (["parent==p"], ["a", "v"]),
    (['parent!="",labels."containerd.io/gc.root"==check-walk'], ["a", "a-wl", "v", "v-wl"]),
    (["labels.l"], ["a-np-wl", "a-wl", "p-wl", "v-wl"]),
    (["labels.l==2"], ["a-np-wl", "a-wl"]),
    (["labels.l!=2"], ["a", "a-np", "bare", "p", "p-wl", "v", "v-wl"]),
    (["name~=^a-"], ["a-np", "a-np-wl", "a-wl"]),
    (["name~=/-wl$/"], ["a-np-wl", "a-wl", "p-wl", "v-wl"]),
    ([" kind == view "], ["v", "v-wl"]),
    ([], sorted(SNAPS)),
    (["", "name==p"], sorted(SNAPS)),
])
def test_filters_select_as_containerd(filters: list[str], expected: list[str]) -> None:
    assert selected(*filters) == expected


def test_parse_quoted_fields_and_values() -> None:
    assert parse('labels."a.b/c"=="x,y"') == [(("labels", "a.b/c"), "==", "x,y")]
    assert parse("labels.l") == [(("labels", "l"), "", "")]


@pytest.mark.parametrize("bad", ["==x", "name=x", "name==", 'labels."unterminated', "name==a b",
                                 "name~=(", "name==a,"])
def test_bad_filters_are_invalid_argument(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        compile_filters([bad])
