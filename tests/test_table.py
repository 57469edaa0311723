"""The C mapping table (cext/hr_table.c) through its Python wrapper."""

from __future__ import annotations

import bisect
import errno
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostrelay._native import ffi, lib
from hostrelay.dataplane.table import (
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


# --- differential: the table against a sorted list, at B+ tree sizes ---------------------


class SortedModel:
    """Every table operation over a sorted list of (start, end, phys, flags)."""

    def __init__(self) -> None:
        self.maps: list[tuple[int, int, int, int]] = []
        self.starts: list[int] = []

    def _floor(self, addr: int) -> int:
        return bisect.bisect_right(self.starts, addr) - 1

    def insert(self, s: int, e: int, p: int, f: int) -> bool:
        i = bisect.bisect_left(self.starts, s)
        if i > 0 and self.maps[i - 1][1] >= s:
            return False
        if i < len(self.maps) and self.maps[i][0] <= e:
            return False
        self.maps.insert(i, (s, e, p, f))
        self.starts.insert(i, s)
        return True

    def overlaps(self, s: int, e: int) -> bool:
        i = self._floor(e)
        return i >= 0 and self.maps[i][1] >= s

    def lookup(self, addr: int) -> tuple[int, int, int, int] | None:
        i = self._floor(addr)
        return self.maps[i] if i >= 0 and self.maps[i][1] >= addr else None

    def next(self, addr: int) -> tuple[int, int, int, int] | None:
        i = bisect.bisect_left(self.starts, addr)
        return self.maps[i] if i < len(self.maps) else None

    def check_range(self, s: int, e: int) -> tuple[int, int] | None:
        """(first index, count) of the covered mappings, None on a straddle."""
        lo = bisect.bisect_left(self.starts, s)
        hi = bisect.bisect_right(self.starts, e)
        if lo > 0 and self.maps[lo - 1][1] >= s:
            return None
        if hi > lo and self.maps[hi - 1][1] > e:
            return None
        return lo, hi - lo

    def remove_range(self, s: int, e: int) -> int | None:
        r = self.check_range(s, e)
        if r is None:
            return None
        lo, n = r
        del self.maps[lo : lo + n]
        del self.starts[lo : lo + n]
        return n

    def find_exact(self, s: int, e: int) -> int | None:
        i = bisect.bisect_left(self.starts, s)
        if i < len(self.maps) and self.maps[i][0] == s and self.maps[i][1] == e:
            return i
        return None

    def translate(self, iova: int, size: int, need: int) -> tuple[str, int]:
        last = iova + size - 1
        i = self._floor(iova)
        if i < 0 or self.maps[i][1] < iova:
            return "unmapped", iova
        s, e, p, f = self.maps[i]
        if f & need != need:
            return "permission", iova
        gpa = p + (iova - s)
        while last > e:
            nxt, nphys = e + 1, p + (e - s) + 1
            i += 1
            if i == len(self.maps) or self.maps[i][0] != nxt:
                return "unmapped", nxt
            s, e, p, f = self.maps[i]
            if f & need != need:
                return "permission", nxt
            if p != nphys:
                return "discontiguous", nxt
        return "ok", gpa


def _as_tuple(m: Any) -> tuple[int, int, int, int]:
    return (int(m.start), int(m.end), int(m.phys), int(m.flags))


def test_table_matches_sorted_model_at_scale() -> None:
    """Thousands of random operations, grown to ~5000 mappings and shrunk again
    (many leaf and inner splits, borrows and merges), every result and the
    full contents compared with a plain sorted list."""
    rnd = random.Random(20260521)
    t = MappingTable()
    ptr = t.ptr
    model = SortedModel()
    out = ffi.new("struct hr_mapping *")
    gpa = ffi.new("uint64_t *")
    fault = ffi.new("uint64_t *")
    page = 0x1000
    dense_base = 1 << 40

    def rand_range() -> tuple[int, int]:
        kind = rnd.random()
        if kind < 0.45:  # clustered: 4 KiB pages, often adjacent
            s = dense_base + rnd.randrange(16000) * page
            return s, s + rnd.choice((1, 1, 1, 2, 3)) * page - 1
        if kind < 0.65:  # spread over the whole space
            s = rnd.randrange(1 << 64)
            return s, min(U64_MAX, s + rnd.randrange(1 << rnd.randrange(1, 44)))
        if kind < 0.8:  # touching 0
            s = rnd.randrange(64) * page
            return s, s + rnd.randrange(1, 3) * page - 1
        if kind < 0.95:  # touching 2^64 - 1
            e = U64_MAX - rnd.randrange(64) * page
            return e - rnd.randrange(1, 3) * page + 1, e
        s = rnd.randrange(1 << 64)  # tiny, anywhere
        return s, s + rnd.randrange(min(4, U64_MAX - s + 1))

    def rand_addr() -> int:
        if model.maps and rnd.random() < 0.6:
            s, e, _, _ = rnd.choice(model.maps)
            return rnd.choice((s, e, s - 1 if s else 0, min(U64_MAX, e + 1), (s + e) // 2))
        return rand_range()[0]

    def compare_all() -> None:
        assert [_as_tuple(m) for m in t] == model.maps
        assert len(t) == len(model.maps)

    def do_insert() -> None:
        s, e = rand_range()
        # Mostly GPA-contiguous with the IOVA so adjacent pages can be spanned.
        p = s - dense_base + 0x10000 if rnd.random() < 0.8 else rnd.randrange(1 << 52)
        p &= U64_MAX
        f = rnd.choice((1, 2, 3, 3, 3))
        ok = model.insert(s, e, p, f)
        assert lib.hr_table_insert(ptr, s, e, p, f) == (0 if ok else -errno.EEXIST)

    def do_remove_range() -> None:
        if model.maps and rnd.random() < 0.5:
            # Whole runs of neighbours, from one to a few hundred mappings.
            i = rnd.randrange(len(model.maps))
            j = min(len(model.maps) - 1, i + rnd.choice((0, 1, 5, 50, 300)))
            s, e = model.maps[i][0], model.maps[j][1]
            s -= rnd.choice((0, 0, 1)) if s else 0
            e += rnd.choice((0, 0, 1)) if e < U64_MAX else 0
        else:
            s = rand_addr()
            e = min(U64_MAX, s + rnd.randrange(1 << rnd.randrange(1, 22)))
        n = model.remove_range(s, e)
        assert lib.hr_table_remove_range(ptr, s, e) == (-errno.ERANGE if n is None else n)

    def do_remove_exact() -> None:
        if model.maps and rnd.random() < 0.8:
            s, e, _, _ = rnd.choice(model.maps)
            e = e if rnd.random() < 0.9 else e - 1 if e > s else e + 1
        else:
            s, e = rand_range()
        i = model.find_exact(s, e)
        expect = None if i is None else model.maps[i]
        # find_mark remembers where it found the mapping for the removal;
        # a mark on another mapping (or a stale one) must not be used.
        find = lib.hr_table_find_mark if rnd.random() < 0.5 else lib.hr_table_find_exact
        if find(ptr, s, e, out):
            assert _as_tuple(out) == expect
        else:
            assert expect is None
        assert lib.hr_table_find_exact(ptr, s, e, ffi.NULL) == (expect is not None)
        if model.maps and rnd.random() < 0.2:
            os_, oe, _, _ = rnd.choice(model.maps)
            assert lib.hr_table_find_mark(ptr, os_, oe, ffi.NULL) == 1
        assert lib.hr_table_remove_exact(ptr, s, e) == (expect is not None)
        if i is not None:
            del model.maps[i]
            del model.starts[i]

    def do_queries() -> None:
        a = rand_addr()
        m = model.lookup(a)
        assert (lib.hr_table_lookup(ptr, a, out) == 1) == (m is not None)
        if m is not None:
            assert _as_tuple(out) == m
        m = model.next(a)
        assert (lib.hr_table_next(ptr, a, out) == 1) == (m is not None)
        if m is not None:
            assert _as_tuple(out) == m
        s, e = a, min(U64_MAX, a + rnd.randrange(1 << rnd.randrange(1, 36)))
        assert lib.hr_table_overlaps(ptr, s, e) == model.overlaps(s, e)
        r = model.check_range(s, e)
        assert lib.hr_table_check_range(ptr, s, e) == (-errno.ERANGE if r is None else r[1])
        size = rnd.choice((1, 8, page, 3 * page, 8 * page, 1 << 20))
        iova = min(a, U64_MAX - size + 1)
        need = rnd.choice((1, 2, 3))
        kind, value = model.translate(iova, size, need)
        rc = lib.hr_table_translate(ptr, iova, size, need, gpa, fault)
        codes = {"ok": 0, "unmapped": -errno.ENOENT, "permission": -errno.EACCES, "discontiguous": -errno.EXDEV}
        assert rc == codes[kind]
        assert (gpa[0] if rc == 0 else fault[0]) == value
        n = rnd.choice((1, 7, 40))
        buf = ffi.new("struct hr_mapping[]", n)
        got = lib.hr_table_dump(ptr, a, buf, n)
        i = bisect.bisect_left(model.starts, a)
        assert [_as_tuple(buf[k]) for k in range(got)] == model.maps[i : i + n]

    # (insert, remove_range, remove_exact, queries) weights per phase.
    phases = [
        ((95, 0.3, 2, 15), 10000),  # grow to ~5000 mappings
        ((45, 0.5, 25, 20), 6000),  # churn near the top
        ((5, 5, 50, 20), 6000),  # shrink: merges up the tree
        ((80, 1, 10, 20), 5000),  # grow again over the recycled nodes
    ]
    ops = (do_insert, do_remove_range, do_remove_exact, do_queries)
    peak = 0
    sizes = []
    for weights, count in phases:
        for k in range(count):
            rnd.choices(ops, weights)[0]()
            peak = max(peak, len(model.maps))
            if k % 500 == 499:
                compare_all()
        compare_all()
        sizes.append(len(model.maps))
    assert peak > 4000 and min(sizes) < 1000, (peak, sizes)
    # Emptying through range removal and refilling still agrees.
    assert lib.hr_table_remove_range(ptr, 0, U64_MAX) == len(model.maps)
    model = SortedModel()
    compare_all()
    for i in range(3000):
        s = (i * 7919 % 3000) * page
        assert model.insert(s, s + page - 1, s, 3)
        assert lib.hr_table_insert(ptr, s, s + page - 1, s, 3) == 0
    compare_all()
    assert t.translate(0, 3000 * page, 3) == 0
    for i in range(0, 3000, 2):
        assert lib.hr_table_remove_exact(ptr, i * page, i * page + page - 1) == 1
    assert [m.start for m in t] == [i * page for i in range(1, 3000, 2)]


def test_deep_tree_random_order_build_and_teardown() -> None:
    """Enough mappings for several inner levels (inner splits, borrows and
    merges, root growth and collapse), checked against a plain set."""
    rnd = random.Random(7)
    t = MappingTable()
    ptr = t.ptr
    out = ffi.new("struct hr_mapping *")
    page = 0x1000
    n = 120_000
    order = list(range(n))
    rnd.shuffle(order)
    for k in order:
        assert lib.hr_table_insert(ptr, 2 * k * page, 2 * k * page + page - 1, k, 3) == 0
    live = set(order)
    assert [m.phys for m in t] == sorted(live)
    rnd.shuffle(order)
    for step, k in enumerate(order[: n - 50]):
        if step % 3:
            assert lib.hr_table_remove_exact(ptr, 2 * k * page, 2 * k * page + page - 1) == 1
        else:
            # The covering range includes the holes on both sides.
            assert lib.hr_table_remove_range(ptr, (2 * k - 1) * page if k else 0, (2 * k + 2) * page - 1) == 1
        live.discard(k)
        if step % 20_000 == 0:
            assert [m.phys for m in t] == sorted(live)
            assert lib.hr_table_lookup(ptr, 2 * k * page, out) == 0
    assert [m.phys for m in t] == sorted(live)
    assert lib.hr_table_remove_range(ptr, 0, U64_MAX) == 50
    assert len(t) == 0 and list(t) == []
