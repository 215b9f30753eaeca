"""archive/jsontext.py writes what json.dumps writes (compact), for the values it takes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphdriver.archive.jsontext import dumps

_SCALARS = (st.none() | st.booleans() | st.integers()
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF)))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(_VALUES, st.booleans())
def test_same_text_as_json_dumps(value: object, ensure_ascii: bool) -> None:
    assert dumps(value, ensure_ascii=ensure_ascii) == json.dumps(
        value, separators=(",", ":"), ensure_ascii=ensure_ascii)


def test_tuples_are_lists() -> None:
    assert dumps({"a": (1, "\udcff")}) == json.dumps({"a": [1, "\udcff"]}, separators=(",", ":"))


@pytest.mark.parametrize("value", [b"x", {1: 2}, float("inf"), float("nan"), {"a": object()}])
def test_what_has_no_json_form_raises_type_error(value: object) -> None:
    with pytest.raises(TypeError):
        dumps(value)
