"""A domain's mappings as the device model sees them.

:class:`Mapping` is one MAP's record; :class:`DomainTable` is what the model
needs of a domain's table (the data plane implements it in C, see
:class:`hostrelay.dataplane.table.MappingTable`); the ``*Error`` classes are
the table's refusals, which the status table turns into statuses.  Ends are
inclusive, exactly as on the wire (virtio 1.2 §5.13.6.5 MAP, §5.13.6.6 UNMAP).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, Protocol


class Mapping(NamedTuple):
    """One mapping: IOVAs ``[start, end]`` (inclusive) -> GPA ``phys``."""

    start: int
    end: int
    phys: int
    flags: int

    @property
    def size(self) -> int:
        """Length in bytes (may be 2**64 for the whole address space)."""
        return self.end - self.start + 1


class TableError(Exception):
    """Base class of mapping-table refusals; the table is unchanged."""


class OverlapError(TableError):
    """An insert intersects a live mapping (5.13.6.5: MAP → INVAL)."""


class StraddleError(TableError):
    """A range removal would split a mapping (5.13.6.6: UNMAP → RANGE)."""


class TranslateError(TableError):
    """A span cannot be translated; ``address`` is the first IOVA that failed.

    ``kind`` is ``"unmapped"``, ``"permission"`` or ``"discontiguous"``.
    """

    def __init__(self, kind: str, address: int) -> None:
        super().__init__(f"{kind} at {address:#x}")
        self.kind = kind
        self.address = address


class DomainTable(Protocol):
    """A domain's IOVA -> GPA table, as the device model uses it."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Mapping]: ...

    def overlaps(self, start: int, end: int) -> bool:
        """True if any mapping intersects ``[start, end]``."""
        ...

    def translate(self, iova: int, size: int, need: int) -> int:
        """GPA of ``[iova, iova + size - 1]`` with permission ``need``, or raise :class:`TranslateError`."""
        ...

    def clear(self) -> None:
        """Remove every mapping."""
        ...
