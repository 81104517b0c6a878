"""service.ids.IdTable: the compact id <-> row table of a bundle, against Python's json and dict."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import ids
from service.ids import IdsError, IdTable

unique_ids = st.lists(st.text(min_size=0, max_size=12), max_size=40, unique=True)


@settings(max_examples=200, deadline=None)
@given(values=unique_ids, ensure_ascii=st.booleans(), indent=st.sampled_from([None, 0, 2]))
def test_from_json_gives_the_ids_of_json_loads_and_their_rows(values: list[str], ensure_ascii: bool, indent: int | None) -> None:
    data = json.dumps(values, ensure_ascii=ensure_ascii, indent=indent).encode("utf-8", "surrogatepass")
    try:
        expected = json.loads(data)
    except UnicodeDecodeError:  # lone surrogates: not UTF-8, refused like json.loads refuses them
        with pytest.raises(IdsError, match="not valid JSON"):
            IdTable.from_json(data)
        return
    table = IdTable.from_json(data)
    assert len(table) == len(expected) and list(table) == expected and table[:3] == expected[:3]
    for row, value in enumerate(expected):
        assert table.get(value) == row and value in table and table[row] == value
    assert table.get("\x00absent") is None and "\x00absent" not in table and 3 not in table


def test_plain_lists_are_located_without_json_loads() -> None:
    data = b'["i0", "i1",\n  "caf\xc3\xa9" ,"", "a b"]'
    located = ids._locate_plain_strings(data)
    assert located is not None
    starts, ends = located
    assert [data[s:e].decode() for s, e in zip(starts, ends, strict=True)] == ["i0", "i1", "café", "", "a b"]


@pytest.mark.parametrize(
    "data",
    [b'["a" "b"]', b'["a",,"b"]', b'["a",]', b'[,"a"]', b'["a"; "b"]', b'["a"]x', b'["a\tb"]', b'["a\\"b"]',
     b'[1, 2]', b"[]", b'["a", 1]'],
)  # fmt: skip
def test_anything_but_a_list_of_plain_strings_goes_through_json_loads(data: bytes) -> None:
    assert ids._locate_plain_strings(data) is None
    try:
        expected = [str(v) for v in json.loads(data)]
    except json.JSONDecodeError:
        with pytest.raises(IdsError, match="not valid JSON"):
            IdTable.from_json(data)
        return
    assert list(IdTable.from_json(data)) == expected  # numbers become strings, as the service always read them


@pytest.mark.parametrize("data", [b'{"a": 1}', b'"a"', b"3"])
def test_a_json_value_that_is_not_a_list_is_refused(data: bytes) -> None:
    with pytest.raises(IdsError, match="expected a JSON list"):
        IdTable.from_json(data)


def test_a_repeated_id_is_refused_naming_it() -> None:
    with pytest.raises(IdsError, match=r"id 'b' appears more than once \(rows 1 and 3\)"):
        IdTable.from_json(b'["a", "b", "c", "b"]')


def test_hash_collisions_are_resolved_by_comparing_the_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "fnv1a", lambda data: 7)  # every id the same hash
    monkeypatch.setattr(ids, "_fnv1a_all", lambda data, starts, ends: np.full(len(starts), 7, dtype=np.uint64))
    values = [f"id{n}" for n in range(50)]
    table = IdTable.from_strings(values)
    assert [table.get(v) for v in values] == list(range(50)) and table.get("id50") is None
    with pytest.raises(IdsError, match="'id3' appears more than once"):
        IdTable.from_strings([*values, "id3"])


def test_the_vectorised_hash_is_the_python_hash() -> None:
    values = ["", "a", "i123456", "café", "x" * 100]
    table = IdTable.from_strings(values)
    encoded = [v.encode() for v in values]
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    ends = np.cumsum([len(e) for e in encoded])
    starts = ends - np.array([len(e) for e in encoded])
    assert ids._fnv1a_all(data, starts, ends).tolist() == [ids.fnv1a(e) for e in encoded]
    assert [table.get(v) for v in values] == list(range(5))
