"""The C mapping table (cext/hr_table.c) through its Python wrapper."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostrelay._native import ffi, lib
from hostrelay._table import (
    Mapping,
    MappingTable,
    OverlapError,
    StraddleError,
    TranslateError,
)

U64_MAX = (1 << 64) - 1
R, W = 1, 2


def test_insert_lookup_count() -> None:
    t = MappingTable()
    assert len(t) == 0
    t.insert(0x1000, 0x1FFF, 0xA000, R)
    t.insert(0x3000, 0x3FFF, 0xB000, R | W)
    assert len(t) == 2
    assert t.lookup(0x1000) == Mapping(0x1000, 0x1FFF, 0xA000, R)
    assert t.lookup(0x1FFF) == Mapping(0x1000, 0x1FFF, 0xA000, R)
    assert t.lookup(0x2000) is None
    assert t.lookup(0x0FFF) is None
    assert t.lookup(0x3ABC) == Mapping(0x3000, 0x3FFF, 0xB000, R | W)
    assert list(t) == [Mapping(0x1000, 0x1FFF, 0xA000, R), Mapping(0x3000, 0x3FFF, 0xB000, R | W)]


@pytest.mark.parametrize(
    ("start", "end"),
    [(14, 14), (0, 12), (16, 21), (5, 24), (10, 19), (19, 19), (0, U64_MAX)],
)
def test_any_overlap_is_refused(start: int, end: int) -> None:
    # crosvm's test_map_overlap cases around a mapping of [10, 19].
    t = MappingTable()
    t.insert(10, 19, 0, R)
    with pytest.raises(OverlapError):
        t.insert(start, end, 0, R)
    assert list(t) == [Mapping(10, 19, 0, R)]


def test_neighbours_are_not_overlaps() -> None:
    t = MappingTable()
    t.insert(10, 19, 0, R)
    t.insert(0, 9, 0, R)
    t.insert(20, 29, 0, R)
    assert [m.start for m in t] == [0, 10, 20]
    assert not t.overlaps(30, 40)
    assert t.overlaps(29, 40)


def test_inverted_range_is_value_error() -> None:
    t = MappingTable()
    with pytest.raises(ValueError):
        t.insert(5, 4, 0, R)
    assert lib.hr_table_insert(t.ptr, 5, 4, 0, R) < 0
    assert len(t) == 0


def test_remove_range_crosvm_cases() -> None:
    # crosvm test_remove_map: [1,5) [5,9) [9,13) as inclusive ranges.
    t = MappingTable()
    for s in (1, 5, 9):
        t.insert(s, s + 3, s * 0x100, R)
    for rng in [(0, 5), (1, 5), (1, 9), (6, 9), (6, 19)]:
        with pytest.raises(StraddleError):
            t.remove_range(*rng)
        assert len(t) == 3
    assert t.remove_range(5, 8) == 1
    with pytest.raises(StraddleError):
        t.remove_range(1, 9)
    assert t.remove_range(0, 14) == 2
    assert len(t) == 0


def test_whole_space_mapping_and_removal() -> None:
    t = MappingTable()
    t.insert(0, U64_MAX, 0, R)
    assert len(t) == 1
    assert t.lookup(U64_MAX) == Mapping(0, U64_MAX, 0, R)
    assert list(t) == [Mapping(0, U64_MAX, 0, R)]
    with pytest.raises(StraddleError):
        t.remove_range(0, U64_MAX - 1)
    with pytest.raises(StraddleError):
        t.remove_range(1, U64_MAX)
    assert t.check_range(0, U64_MAX) == 1
    assert t.remove_range(0, U64_MAX) == 1
    assert len(t) == 0


def test_mapping_at_top_of_space() -> None:
    t = MappingTable()
    t.insert(U64_MAX - 0xFFF, U64_MAX, 0x5000, R)
    t.insert(0, 0xFFF, 0x1000, R)
    assert [m.start for m in t.iter_from(1)] == [U64_MAX - 0xFFF]
    assert t.translate(U64_MAX, 1, R) == 0x5FFF
    with pytest.raises(StraddleError):
        t.remove_range(U64_MAX, U64_MAX)
    assert t.remove_range(1 << 63, U64_MAX) == 1
    assert list(t) == [Mapping(0, 0xFFF, 0x1000, R)]


def test_check_range_counts_without_removing() -> None:
    t = MappingTable()
    for i in range(5):
        t.insert(i * 0x10, i * 0x10 + 7, 0, R)
    assert t.check_range(0, 0x4F) == 5
    assert t.check_range(0x8, 0xF) == 0
    assert t.covered(0x10, 0x37) == [Mapping(0x10, 0x17, 0, R), Mapping(0x20, 0x27, 0, R), Mapping(0x30, 0x37, 0, R)]
    with pytest.raises(StraddleError):
        t.check_range(0x11, 0x40)
    assert len(t) == 5


def test_translate_spans_contiguous_mappings() -> None:
    t = MappingTable()
    t.insert(0x1000, 0x1FFF, 0x4000, R | W)
    t.insert(0x2000, 0x2FFF, 0x5000, R | W)  # GPA-contiguous with the first
    t.insert(0x3000, 0x3FFF, 0x9000, R | W)  # not contiguous
    t.insert(0x5000, 0x5FFF, 0xA000, R)  # read-only
    assert t.translate(0x1200, 0x10, R) == 0x4200
    assert t.translate(0x1F00, 0x200, W) == 0x4F00
    with pytest.raises(TranslateError) as e:
        t.translate(0x2F00, 0x200, R)
    assert (e.value.kind, e.value.address) == ("discontiguous", 0x3000)
    with pytest.raises(TranslateError) as e:
        t.translate(0x3F00, 0x200, R)
    assert (e.value.kind, e.value.address) == ("unmapped", 0x4000)
    with pytest.raises(TranslateError) as e:
        t.translate(0x0, 1, R)
    assert (e.value.kind, e.value.address) == ("unmapped", 0x0)
    with pytest.raises(TranslateError) as e:
        t.translate(0x5000, 4, W)
    assert (e.value.kind, e.value.address) == ("permission", 0x5000)
    with pytest.raises(ValueError):
        t.translate(0x1000, 0, R)


def test_dump_batches_and_iteration_over_many() -> None:
    t = MappingTable()
    rnd = random.Random(1)
    starts = rnd.sample(range(0, 1 << 40, 0x1000), 3000)
    for s in starts:
        t.insert(s, s + 0xFFF, s, R)
    assert len(t) == 3000
    assert [m.start for m in t] == sorted(starts)
    out = ffi.new("struct hr_mapping[]", 10)
    assert lib.hr_table_dump(t.ptr, 0, out, 10) == 10
    assert [out[i].start for i in range(10)] == sorted(starts)[:10]
    t.clear()
    assert len(t) == 0 and list(t) == []


def test_range_removal_keeps_tree_consistent_when_large() -> None:
    t = MappingTable()
    for i in range(10000):
        t.insert(i * 0x2000, i * 0x2000 + 0xFFF, 0, R)
    assert t.remove_range(0x2000 * 100, 0x2000 * 9000 - 1) == 8900
    assert len(t) == 1100
    starts = [m.start for m in t]
    assert starts == [i * 0x2000 for i in list(range(100)) + list(range(9000, 10000))]
    for i in (0, 99, 9000, 9999):
        assert t.lookup(i * 0x2000 + 5) is not None
    assert t.lookup(0x2000 * 500) is None


# --- property: the table against a plain list -----------------------------------------


class ListModel:
    """The UNMAP rules of 5.13.6.6 over a plain list."""

    def __init__(self) -> None:
        self.maps: list[tuple[int, int, int]] = []

    def insert(self, s: int, e: int, p: int) -> bool:
        if any(ms <= e and s <= me for ms, me, _ in self.maps):
            return False
        self.maps.append((s, e, p))
        return True

    def remove(self, s: int, e: int) -> int | None:
        hit = [m for m in self.maps if m[0] <= e and s <= m[1]]
        if any(m[0] < s or m[1] > e for m in hit):
            return None
        for m in hit:
            self.maps.remove(m)
        return len(hit)


small = st.integers(0, 64)
ops = st.lists(
    st.tuples(st.sampled_from(["ins", "rm", "look"]), small, st.integers(0, 12)), max_size=60
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_table_matches_list_model(script: list[tuple[str, int, int]]) -> None:
    t = MappingTable()
    model = ListModel()
    for op, a, length in script:
        s, e = a, a + length
        if op == "ins":
            ok = model.insert(s, e, a * 7)
            if ok:
                t.insert(s, e, a * 7, R)
            else:
                with pytest.raises(OverlapError):
                    t.insert(s, e, a * 7, R)
        elif op == "rm":
            n = model.remove(s, e)
            if n is None:
                with pytest.raises(StraddleError):
                    t.remove_range(s, e)
            else:
                assert t.remove_range(s, e) == n
        else:
            hit = [m for m in model.maps if m[0] <= a <= m[1]]
            got = t.lookup(a)
            assert (got is None) == (not hit)
            if got is not None:
                assert (got.start, got.end, got.phys) == hit[0]
        assert [(m.start, m.end, m.phys) for m in t] == sorted(model.maps)
        assert len(t) == len(model.maps)
