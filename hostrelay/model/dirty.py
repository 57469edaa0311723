"""The migration dirty log as data: what each host address space can report, and page arithmetic.

:meth:`hostrelay.relay.Relay.start_dirty_log` answers with a
:class:`DirtyLogStatus`; :meth:`~hostrelay.relay.Relay.dirty_pages` with
guest-physical ``(address, size)`` ranges built by :func:`merge_pages` from
what each space contributed.  Pure arithmetic, no kernel: the bitmap decoding
(:func:`bitmap_runs`) and the IOVA -> GPA translation (:func:`translate_runs`)
are shared by every caller that reads a type1 dirty bitmap.

Ranges here are ``(start, size)`` in bytes; ``Segment`` is ``(iova_first,
iova_last, gpa_of_iova_first)``, inclusive like the virtio-iommu wire.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "DIRTY_PAGE",
    "DirtyLogStatus",
    "Segment",
    "SpaceDirtyStatus",
    "bitmap_runs",
    "merge_pages",
    "translate_runs",
]

#: The granule of :meth:`~hostrelay.relay.Relay.dirty_pages`: x86 host pages,
#: what a VMM's migration bitmap (QEMU's, KVM's dirty log) counts in.
DIRTY_PAGE = 4096

#: ``(iova_first, iova_last, gpa)``: IOVAs ``[iova_first, iova_last]`` reach GPA ``gpa`` onwards.
Segment = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class SpaceDirtyStatus:
    """One host address space and how its DMA writes are known.

    ``kind`` is ``"type1"`` (a VFIO container, ``name`` ``"group N"``),
    ``"iommufd"`` (every IOAS of the relay's ``/dev/iommu``), ``"emulated"``
    (endpoints served by :meth:`~hostrelay.relay.Relay.translate`) or
    ``"custom"`` (a VMM's own backend).  ``tracked``: pages come from the
    kernel's (or the relay's own) record of writes; otherwise ``reason`` says
    why not and every page a device there could write is reported.
    ``pgsize`` is the kernel bitmap's page size where the kernel tracks.
    """

    kind: str
    name: str
    tracked: bool
    reason: str | None = None
    pgsize: int | None = None


@dataclass(frozen=True, slots=True)
class DirtyLogStatus:
    """What :meth:`~hostrelay.relay.Relay.start_dirty_log` could set up, per host address space."""

    spaces: tuple[SpaceDirtyStatus, ...]

    @property
    def precise(self) -> bool:
        """True if every space is tracked (nothing is reported only because it is mapped)."""
        return all(s.tracked for s in self.spaces)

    def space(self, kind: str, name: str | None = None) -> SpaceDirtyStatus:
        """The entry of ``kind`` (and ``name``); :class:`KeyError` if there is none."""
        for s in self.spaces:
            if s.kind == kind and (name is None or s.name == name):
                return s
        raise KeyError(f"no {kind} space{'' if name is None else ' ' + name} in the dirty log")


def bitmap_runs(bitmap: bytes, pgsize: int) -> list[tuple[int, int]]:
    """Runs of set bits as ``(offset, size)`` in bytes from the bitmap's base.

    The layout of Linux's ``bitmap_set`` on the ``u64`` words type1 fills
    (little-endian x86: bit ``i`` is bit ``i % 8`` of byte ``i // 8``).
    Whole zero or all-ones words are stepped over at once: type1 without a
    pinned-page scope returns every bit set.
    """
    runs: list[tuple[int, int]] = []
    start = -1  # first page of the open run, -1: none
    nbits = len(bitmap) * 8
    full = b"\xff" * 8
    zero = bytes(8)
    for w in range(0, len(bitmap), 8):
        word = bitmap[w : w + 8]
        base = w * 8
        if word == full and start >= 0:
            continue
        if word == zero and start < 0:
            continue
        value = int.from_bytes(word, "little")
        for bit in range(len(word) * 8):
            if value >> bit & 1:
                if start < 0:
                    start = base + bit
            elif start >= 0:
                runs.append((start * pgsize, (base + bit - start) * pgsize))
                start = -1
    if start >= 0:
        runs.append((start * pgsize, (nbits - start) * pgsize))
    return runs


def translate_runs(base: int, runs: Iterable[tuple[int, int]], segments: Iterable[Segment]) -> list[tuple[int, int]]:
    """IOVA runs (offsets from ``base``) as GPA ranges through ``segments``.

    A run is clipped to each segment it meets: bits past the last mapped
    IOVA (the bitmap's padding to whole words) or in holes map to nothing.
    """
    segs = sorted(segments)
    out: list[tuple[int, int]] = []
    for off, size in runs:
        lo, hi = base + off, base + off + size - 1
        for first, last, gpa in segs:
            if last < lo:
                continue
            if first > hi:
                break
            s, e = max(lo, first), min(hi, last)
            out.append((gpa + (s - first), e - s + 1))
    return out


def merge_pages(ranges: Iterable[tuple[int, int]], page: int = DIRTY_PAGE) -> list[tuple[int, int]]:
    """``(address, size)`` ranges rounded out to ``page``, sorted, overlapping and adjacent ones merged."""
    spans = sorted((a - a % page, -(-(a + s) // page) * page) for a, s in ranges if s > 0)
    out: list[list[int]] = []
    for lo, hi in spans:
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi - lo) for lo, hi in out]
