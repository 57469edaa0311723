"""Guest memory: guest-physical address (GPA) → host virtual address (HVA).

The relay needs host addresses for two things: emulated devices read and
write guest RAM through translated GPAs, and ``VFIO_IOMMU_MAP_DMA``
takes a process virtual address.  Guest RAM is therefore either mapped into
this process from a file descriptor (a memfd shared with the VMM, or one this
class creates) or described by an address the embedding VMM already mapped.

A GPA span that crosses regions is returned as several pieces (a VFIO MAP of
it must be split); a GPA outside every region is refused
(:class:`GuestAddressError`), as the MAP text of 5.13.6.5 requires the
physical range to lie "within the guest-physical address space".
"""

from __future__ import annotations

import array
import bisect
import ctypes
import mmap
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from hostrelay.model.status import BadAddress

U64_MAX = (1 << 64) - 1


class GuestAddressError(BadAddress, ValueError):
    """A GPA span that is not entirely guest RAM."""

    def __init__(self, gpa: int, size: int, missing: int) -> None:
        super().__init__(f"GPA span {gpa:#x}+{size:#x}: {missing:#x} is not guest memory")
        self.gpa = gpa
        self.size = size
        self.missing = missing


@dataclass(frozen=True, slots=True)
class Span:
    """A piece of a GPA span that lies in one region."""

    gpa: int
    hva: int
    size: int


class Region:
    """One contiguous block of guest RAM and where it is in this process."""

    __slots__ = ("gpa", "size", "hva", "fd", "offset", "_mmap", "_owns_fd")

    def __init__(
        self,
        gpa: int,
        size: int,
        hva: int,
        *,
        fd: int | None,
        offset: int,
        mapping: mmap.mmap | None,
        owns_fd: bool,
    ) -> None:
        self.gpa = gpa
        self.size = size
        self.hva = hva
        self.fd = fd
        self.offset = offset
        self._mmap = mapping
        self._owns_fd = owns_fd

    @property
    def end(self) -> int:
        """Last GPA of the region (inclusive)."""
        return self.gpa + self.size - 1

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` into the region."""
        if self._mmap is not None:
            return self._mmap[offset : offset + size]
        return ctypes.string_at(self.hva + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset`` into the region."""
        if self._mmap is not None:
            self._mmap[offset : offset + len(data)] = data
        else:
            ctypes.memmove(self.hva + offset, data, len(data))

    def close(self) -> None:
        """Unmap (and close the memfd) if this object created them."""
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self._owns_fd and self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __repr__(self) -> str:
        return f"Region(gpa={self.gpa:#x}, size={self.size:#x}, hva={self.hva:#x})"


def _mmap_address(m: mmap.mmap, size: int) -> int:
    # The exported buffer is dropped at once so the mmap can still be closed;
    # the address stays valid for as long as the mapping exists.
    view = (ctypes.c_char * size).from_buffer(m)
    try:
        return ctypes.addressof(view)
    finally:
        del view


class GuestMemory:
    """The guest's RAM as a set of non-overlapping GPA regions.

    ``GuestMemory()`` starts empty; :meth:`add_region` adds RAM.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._regions: list[Region] = []
        # Changes whenever the set of regions changes (the relay's C copy
        # follows it); a plain attribute because the hot path reads it.
        self.generation = 0
        # The same number as one int64 C can read (handle_request's native
        # door compares it without a Python attribute load); never resized.
        self.generation_cell = array.array("q", [0])

    def add_region(
        self,
        gpa: int,
        size: int,
        *,
        fd: int | None = None,
        offset: int = 0,
        address: int | None = None,
    ) -> Region:
        """Add ``size`` bytes of guest RAM at ``gpa``.

        - no ``fd`` and no ``address``: a new anonymous memfd of that size is
          created and mapped (sparse: untouched pages cost nothing);
        - ``fd``: that file is mapped shared from ``offset`` (the VMM's memfd);
        - ``address``: the RAM is already mapped at that host address by the
          embedder, which keeps it alive for the life of this object.

        Raises :class:`ValueError` for an empty, wrapping or overlapping region.
        """
        if size <= 0 or gpa < 0 or gpa + size - 1 > U64_MAX:
            raise ValueError(f"bad region {gpa:#x}+{size:#x}")
        if fd is not None and address is not None:
            raise ValueError("give fd or address, not both")
        if offset < 0 or (offset and fd is None):
            raise ValueError("offset only applies to fd-backed regions")
        end = gpa + size - 1
        i = bisect.bisect_right(self._starts, end)
        if i > 0 and self._regions[i - 1].end >= gpa:
            raise ValueError(f"region {gpa:#x}+{size:#x} overlaps {self._regions[i - 1]!r}")

        if address is not None:
            if address <= 0:
                raise ValueError("address must be a host virtual address")
            region = Region(gpa, size, address, fd=None, offset=0, mapping=None, owns_fd=False)
        else:
            owns = fd is None
            if fd is None:
                fd = os.memfd_create(f"hostrelay-gpa-{gpa:#x}", os.MFD_CLOEXEC)
                try:
                    os.ftruncate(fd, size)
                except BaseException:
                    os.close(fd)
                    raise
            try:
                m = mmap.mmap(
                    fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
                )
            except BaseException:
                if owns:
                    os.close(fd)
                raise
            region = Region(
                gpa, size, _mmap_address(m, size), fd=fd, offset=offset, mapping=m, owns_fd=owns
            )
        self._starts.insert(i, gpa)
        self._regions.insert(i, region)
        self.generation += 1
        self.generation_cell[0] = self.generation
        return region

    @property
    def regions(self) -> tuple[Region, ...]:
        """The regions in GPA order."""
        return tuple(self._regions)

    def spans(self, gpa: int, size: int) -> list[Span]:
        """Split ``[gpa, gpa + size - 1]`` at region boundaries.

        Raises :class:`GuestAddressError` naming the first GPA that is not
        guest RAM, so a request touching a hole is refused as a whole.
        """
        if size <= 0 or gpa < 0 or gpa + size - 1 > U64_MAX:
            raise GuestAddressError(gpa, size, gpa)
        out: list[Span] = []
        cur = gpa
        last = gpa + size - 1
        i = bisect.bisect_right(self._starts, cur) - 1
        while True:
            if i < 0 or i >= len(self._regions) or not (
                self._regions[i].gpa <= cur <= self._regions[i].end
            ):
                raise GuestAddressError(gpa, size, cur)
            r = self._regions[i]
            piece_end = min(last, r.end)
            out.append(Span(cur, r.hva + (cur - r.gpa), piece_end - cur + 1))
            if piece_end == last:
                return out
            cur = piece_end + 1
            i += 1  # regions are sorted: only the next one can continue the span

    def require(self, gpa: int, size: int) -> None:
        """Raise :class:`GuestAddressError` unless the whole span is guest RAM.

        Like :meth:`spans` without building the pieces (the MAP hot path).
        """
        if size <= 0 or gpa < 0 or gpa + size - 1 > U64_MAX:
            raise GuestAddressError(gpa, size, gpa)
        last = gpa + size - 1
        i = bisect.bisect_right(self._starts, gpa) - 1
        cur = gpa
        regions = self._regions
        while 0 <= i < len(regions):
            r = regions[i]
            if not r.gpa <= cur <= r.end:
                break
            if last <= r.end:
                return
            cur = r.end + 1
            i += 1
        raise GuestAddressError(gpa, size, cur)

    def contains(self, gpa: int, size: int) -> bool:
        """True if the whole span is guest RAM."""
        try:
            self.require(gpa, size)
        except GuestAddressError:
            return False
        return True

    def host_address(self, gpa: int) -> int:
        """HVA of one guest-physical byte."""
        return self.spans(gpa, 1)[0].hva

    def read(self, gpa: int, size: int) -> bytes:
        """Copy ``size`` bytes of guest memory (may cross regions)."""
        if size == 0:
            return b""
        parts = []
        for s in self.spans(gpa, size):
            r = self._region_of(s.gpa)
            parts.append(r.read(s.gpa - r.gpa, s.size))
        return b"".join(parts)

    def write(self, gpa: int, data: bytes) -> None:
        """Store ``data`` into guest memory (may cross regions)."""
        if not data:
            return
        spans = self.spans(gpa, len(data))  # validate all before writing any
        pos = 0
        for s in spans:
            r = self._region_of(s.gpa)
            r.write(s.gpa - r.gpa, data[pos : pos + s.size])
            pos += s.size

    def _region_of(self, gpa: int) -> Region:
        return self._regions[bisect.bisect_right(self._starts, gpa) - 1]

    def clear(self) -> None:
        """Unmap every region this object mapped and start empty (a new layout follows).

        The generation moves on, so the relay's C copy of the layout follows
        before its next use; only safe while nothing holds a host address of
        the old regions (:meth:`hostrelay.relay.Relay.replace_memory` checks).
        """
        self.close()
        self.generation += 1
        self.generation_cell[0] = self.generation

    def close(self) -> None:
        """Unmap every region this object mapped."""
        for r in self._regions:
            r.close()
        self._regions.clear()
        self._starts.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
