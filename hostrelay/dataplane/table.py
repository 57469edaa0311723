"""Thin wrapper over the C mapping table (``cext/hr_table.c``).

One :class:`MappingTable` per virtio-iommu domain.  The mappings live only in
C (the relay keeps no second copy in Python), so a later C virtqueue walker can
drive the same table through :attr:`MappingTable.ptr` without any
Python-side state going stale.

Ends are inclusive, exactly as on the wire (virtio v1.2+ 5.13.6.5 MAP,
5.13.6.6 UNMAP), so the whole 64-bit space is ``[0, 2**64 - 1]``.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

from hostrelay._native import ffi, lib
from hostrelay.model.mapping import Mapping, OverlapError, StraddleError, TableError, TranslateError

__all__ = ["Mapping", "MappingTable", "OverlapError", "StraddleError", "TableError", "TranslateError"]

U64_MAX = (1 << 64) - 1

# How many mappings one hr_table_dump() call copies out: big enough that
# iterating 64 Ki mappings costs a few dozen Python->C transitions.
_DUMP_BATCH = 1024


_TRANSLATE_KIND = {
    -errno.ENOENT: "unmapped",
    -errno.EACCES: "permission",
    -errno.EXDEV: "discontiguous",
}


def _check_range(start: int, end: int) -> None:
    if not (0 <= start <= end <= U64_MAX):
        raise ValueError(f"bad range [{start:#x}, {end:#x}]")


class MappingTable:
    """A domain's IOVA→GPA mappings, stored in a B+ tree in C.

    Every operation is O(log n) (range removal O(k log n) for k removed
    mappings).  Refusals raise a :class:`TableError` subclass and leave the
    table unchanged.
    """

    __slots__ = ("_ptr", "_out", "__weakref__")

    def __init__(self) -> None:
        ptr = lib.hr_table_new()
        if ptr == ffi.NULL:
            raise MemoryError("hr_table_new")
        # ffi.gc frees the nodes when the last reference goes, so a domain
        # that dies with its last endpoint releases its table without a
        # close() call on every path.
        self._ptr: Any = ffi.gc(ptr, lib.hr_table_free)
        # One reusable out-parameter: lookups on the hot path allocate nothing.
        self._out: Any = ffi.new("struct hr_mapping *")

    @property
    def ptr(self) -> Any:
        """The ``hr_table *`` for C code that drives the table directly."""
        return self._ptr

    def __len__(self) -> int:
        return int(lib.hr_table_count(self._ptr))

    def insert(self, start: int, end: int, phys: int, flags: int) -> None:
        """Add ``[start, end] -> phys``; :class:`OverlapError` on any overlap."""
        _check_range(start, end)
        rc = lib.hr_table_insert(self._ptr, start, end, phys, flags)
        if rc == 0:
            return
        if rc == -errno.EEXIST:
            raise OverlapError(f"[{start:#x}, {end:#x}] overlaps a mapping")
        if rc == -errno.ENOMEM:
            raise MemoryError("hr_table_insert")
        raise ValueError(f"hr_table_insert: {errno.errorcode.get(-rc, rc)}")

    def overlaps(self, start: int, end: int) -> bool:
        """True if any live mapping intersects ``[start, end]``."""
        _check_range(start, end)
        return bool(lib.hr_table_overlaps(self._ptr, start, end) > 0)

    def lookup(self, address: int) -> Mapping | None:
        """The mapping containing ``address``, if any."""
        if lib.hr_table_lookup(self._ptr, address, self._out):
            o = self._out
            return Mapping(o.start, o.end, o.phys, o.flags)
        return None

    def check_range(self, start: int, end: int) -> int:
        """Number of mappings an UNMAP of ``[start, end]`` would remove.

        Raises :class:`StraddleError` if it would split one.  Read-only.
        """
        _check_range(start, end)
        rc = int(lib.hr_table_check_range(self._ptr, start, end))
        if rc == -errno.ERANGE:
            raise StraddleError(f"[{start:#x}, {end:#x}] splits a mapping")
        return rc

    def covered(self, start: int, end: int) -> list[Mapping]:
        """The mappings inside ``[start, end]`` (after :meth:`check_range`)."""
        _check_range(start, end)
        return list(self._iter_until(start, end))

    def _iter_until(self, start: int, end: int) -> Iterator[Mapping]:
        for m in self.iter_from(start):
            if m.start > end:
                return
            yield m

    def remove_range(self, start: int, end: int) -> int:
        """Atomic UNMAP: remove every mapping inside ``[start, end]``.

        Raises :class:`StraddleError` (nothing removed) if a mapping sticks
        out of the range; holes are fine.  Returns how many were removed.
        """
        _check_range(start, end)
        rc = int(lib.hr_table_remove_range(self._ptr, start, end))
        if rc == -errno.ERANGE:
            raise StraddleError(f"[{start:#x}, {end:#x}] splits a mapping")
        return rc

    def clear(self) -> None:
        """Remove every mapping."""
        lib.hr_table_clear(self._ptr)

    def translate(self, iova: int, size: int, need: int) -> int:
        """GPA of ``[iova, iova + size - 1]`` for an access needing ``need``.

        The span may cross mappings that are adjacent in IOVA and contiguous
        in GPA; otherwise :class:`TranslateError` names the first bad IOVA.
        """
        if size <= 0 or iova < 0 or iova + size - 1 > U64_MAX:
            raise ValueError(f"bad span {iova:#x}+{size:#x}")
        gpa = ffi.new("uint64_t *")
        fault = ffi.new("uint64_t *")
        rc = lib.hr_table_translate(self._ptr, iova, size, need, gpa, fault)
        if rc == 0:
            return int(gpa[0])
        kind = _TRANSLATE_KIND.get(rc)
        if kind is None:
            raise ValueError(f"hr_table_translate: {errno.errorcode.get(-rc, rc)}")
        raise TranslateError(kind, int(fault[0]))

    def iter_from(self, start: int = 0) -> Iterator[Mapping]:
        """Mappings with ``start >= start``, in IOVA order.

        Reads the tree in batches; do not modify the table while iterating.
        """
        buf = ffi.new("struct hr_mapping[]", _DUMP_BATCH)
        while True:
            n = int(lib.hr_table_dump(self._ptr, start, buf, _DUMP_BATCH))
            for i in range(n):
                o = buf[i]
                yield Mapping(o.start, o.end, o.phys, o.flags)
            if n < _DUMP_BATCH:
                return
            last_end = int(buf[n - 1].end)
            if last_end == U64_MAX:
                return
            start = last_end + 1

    def __iter__(self) -> Iterator[Mapping]:
        return self.iter_from(0)
