"""What every kernel address space a domain's mappings go to has in common.

A type1 container (:class:`~hostrelay.backends.type1.VfioBackend`) and an
iommufd IOAS (:class:`~hostrelay.backends.iommufd.IoasSpace`) hold guest
mappings the same way; only the ioctl that makes one take effect differs.
This base class is the part they share:

- GPA -> host VA through :class:`~hostrelay.backends.memory.GuestMemory`: one
  guest mapping becomes one kernel mapping per RAM region piece, exactly its
  range (no power-of-two splitting); a GPA that is not guest RAM is refused.
- Limits checked *before* the ioctl, so a refusal leaves nothing half-done:
  the kernel entries left, and the bytes the kernel will charge to
  ``RLIMIT_MEMLOCK`` (:class:`~hostrelay.backends.type1.MemlockBudget`).
- UNMAP per contiguous run of mappings, verifying the kernel's unmapped byte
  count (both kernels copy the removed size back).
- The identity map of guest RAM (IOVA = GPA) for bypass.
- Counters (entries, kernel-charged bytes) kept in C (``struct
  hr_container``), where the data plane checks and updates them itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from hostrelay.backends.memory import GuestMemory
from hostrelay.model.mapping import Mapping
from hostrelay.model.status import InvalidRequest, NoResources, UnmapMismatch
from hostrelay.model.wire import MapFlag

__all__ = ["MappedSpace"]

log = logging.getLogger("hostrelay.backends")

_RW = int(MapFlag.READ | MapFlag.WRITE)


@dataclass(frozen=True, slots=True)
class _Piece:
    """One kernel mapping: a guest mapping's part that lies in one RAM region."""

    iova: int
    hva: int
    size: int


class MappedSpace:
    """One kernel address space holding guest mappings; subclasses supply the ioctls.

    ``map``/``unmap`` either fully succeed or raise leaving the kernel and
    the counters as they were (a kernel count mismatch on UNMAP excepted,
    see :class:`~hostrelay.model.status.UnmapMismatch`).  Subclasses set
    :attr:`memory`, :attr:`budget` (a ``MemlockBudget``), :attr:`c` (the
    ``struct hr_container``), :attr:`entry_limit` and :attr:`label`, and
    implement :meth:`_kmap`, :meth:`_kunmap`, :meth:`_in_ranges` and
    :meth:`_usable`.
    """

    memory: GuestMemory
    budget: Any
    c: Any
    entry_limit: int
    label: str
    _identity: list[_Piece] | None = None  # None: no identity map

    # -- what a subclass provides ----------------------------------------------------
    def _kmap(self, iova: int, size: int, hva: int, *, read: bool, write: bool) -> None:
        raise NotImplementedError

    def _kunmap(self, iova: int, size: int) -> int:
        raise NotImplementedError

    def _kunmap_logged(self, iova: int, size: int, segments: list[tuple[int, int, int]]) -> int:
        """:meth:`_kunmap` of guest mappings whose IOVA -> GPA ``segments`` are known.

        A space that reads a dirty log at unmap (type1 while logging)
        overrides this; the others unmap plainly.
        """
        return self._kunmap(iova, size)

    def _in_ranges(self, iova: int, size: int) -> bool:
        raise NotImplementedError

    def _usable(self) -> list[tuple[int, int]]:
        """The usable IOVA ranges (inclusive ends); empty: all of them."""
        raise NotImplementedError

    @property
    def entries(self) -> int:
        """Live kernel mappings this space's relay created."""
        return int(self.c.entries)

    @property
    def charged(self) -> int:
        """Bytes the kernel charged to RLIMIT_MEMLOCK for them."""
        return int(self.c.charged)

    # -- planning (no side effects) ---------------------------------------------
    def _pieces(self, mapping: Mapping) -> list[_Piece]:
        if not mapping.flags & _RW:
            # type1 refuses a mapping with neither READ nor WRITE (EINVAL);
            # such a guest mapping grants no access, so the kernel is not told.
            return []
        # GuestAddressError (→ FAULT) if any byte is not guest RAM: never mapped.
        spans = self.memory.spans(mapping.phys, mapping.size)
        pieces = [_Piece(mapping.start + (s.gpa - mapping.phys), s.hva, s.size) for s in spans]
        for p in pieces:
            if not self._in_ranges(p.iova, p.size):
                raise InvalidRequest(
                    f"IOVA [{p.iova:#x}, {p.iova + p.size - 1:#x}] is outside the usable IOVA ranges "
                    f"of {self.label}"
                )
        return pieces

    def precheck(self, mapping: Mapping) -> int:
        """Refuse ``mapping`` now if it cannot be mapped; return its memlock charge.

        Checks guest RAM, the usable IOVA ranges and the entry budget; the
        caller checks the summed charge of every space against
        :class:`MemlockBudget` (the kernel's limit is process-wide).
        """
        pieces = self._pieces(mapping)
        self._check_entries(len(pieces))
        return sum(p.size for p in pieces)

    def _check_entries(self, n: int) -> None:
        if n and self.entries + n > self.entry_limit:
            raise NoResources(
                f"{self.label}: {self.entries} of {self.entry_limit} DMA entries in use, "
                f"{n} more needed (vfio_iommu_type1.dma_entry_limit)"
            )

    # -- the Backend protocol ---------------------------------------------------
    def map(self, mapping: Mapping) -> None:
        """One ``VFIO_IOMMU_MAP_DMA`` per RAM piece of ``mapping``; all or nothing."""
        pieces = self._pieces(mapping)
        if not pieces:
            return
        charge = sum(p.size for p in pieces)
        self._check_entries(len(pieces))
        self.budget.check(charge)
        self._map_pieces(pieces, read=bool(mapping.flags & MapFlag.READ), write=bool(mapping.flags & MapFlag.WRITE))

    def _map_pieces(self, pieces: Sequence[_Piece], *, read: bool, write: bool) -> None:
        done: list[_Piece] = []
        try:
            for p in pieces:
                self._kmap(p.iova, p.size, p.hva, read=read, write=write)
                done.append(p)
        except BaseException:
            for p in reversed(done):
                try:
                    self._kunmap(p.iova, p.size)
                except Exception:
                    log.exception("%s: rollback of piece %#x+%#x failed", self.label, p.iova, p.size)
            raise
        self._account(len(pieces), sum(p.size for p in pieces))

    def _account(self, entries: int, charged: int) -> None:
        self.budget.account(self.c, entries, charged)

    def unmap(self, mappings: Sequence[Mapping]) -> None:
        """Remove exactly ``mappings``: one ``VFIO_IOMMU_UNMAP_DMA`` per contiguous run.

        Each run's unmapped byte count must equal what the mappings put in the
        kernel.  A kernel error rolls the earlier runs back (re-maps them);
        a count mismatch raises :class:`UnmapMismatch` after logging it.
        """
        runs = self._runs(mappings)
        done: list[list[Mapping]] = []
        mismatch: UnmapMismatch | None = None
        for run in runs:
            start, end = run[0].start, run[-1].end
            plan = [self._pieces(m) for m in run]
            expected = sum(p.size for ps in plan for p in ps)
            n = sum(len(ps) for ps in plan)
            if n == 0:
                done.append(run)
                continue
            try:
                got = self._kunmap_logged(start, end - start + 1, [(m.start, m.end, m.phys) for m in run])
            except BaseException:
                self._remap(done)
                raise
            self._account(-n, -got)
            if got != expected:
                log.error(
                    "%s: UNMAP [%#x, %#x] removed %#x bytes, the table expected %#x",
                    self.label, start, end, got, expected,
                )
                # Keep going: the caller removes every mapping from its table.
                mismatch = UnmapMismatch(
                    f"{self.label}: kernel unmapped {got:#x} bytes of [{start:#x}, {end:#x}], "
                    f"expected {expected:#x}"
                )
            done.append(run)
        if mismatch is not None:
            raise mismatch

    def _remap(self, runs: Iterable[list[Mapping]]) -> None:
        for run in runs:
            for m in run:
                try:
                    self.map(m)
                except Exception:
                    log.exception("%s: rollback re-map of %s failed", self.label, m)

    @staticmethod
    def _runs(mappings: Sequence[Mapping]) -> list[list[Mapping]]:
        ordered = sorted(mappings, key=lambda m: m.start)
        runs: list[list[Mapping]] = []
        for m in ordered:
            if runs and runs[-1][-1].end + 1 == m.start:
                runs[-1].append(m)
            else:
                runs.append([m])
        return runs

    # -- bypass ------------------------------------------------------------------
    @property
    def identity_mapped(self) -> bool:
        """True while guest RAM is identity-mapped (its devices are in bypass)."""
        return self._identity is not None

    def identity_pieces(self) -> list[tuple[int, int]]:
        """``(gpa, size)`` of each identity-mapped piece (empty when off)."""
        return [(p.iova, p.size) for p in self._identity or ()]

    def _identity_plan(self) -> list[_Piece]:
        # Guest RAM clipped to the usable IOVA ranges: RAM under a reserved
        # window (MSI doorbell, RMRR) cannot be reached by DMA on real
        # hardware either.
        ranges = self._usable() or [(0, (1 << 64) - 1)]
        out = []
        for region in self.memory.regions:
            for lo, hi in ranges:
                s, e = max(lo, region.gpa), min(hi, region.end)
                if s <= e:
                    out.append(_Piece(s, region.hva + (s - region.gpa), e - s + 1))
        return sorted(out, key=lambda p: p.iova)

    def set_identity(self, on: bool) -> None:
        """Map guest RAM at IOVA = GPA (``on``) or remove that map; idempotent, all or nothing."""
        if on == (self._identity is not None):
            return
        if on:
            pieces = self._identity_plan()
            self._check_entries(len(pieces))
            self.budget.check(sum(p.size for p in pieces))
            self._map_pieces(pieces, read=True, write=True)
            self._identity = pieces
            return
        pieces = self._identity or []
        for i, p in enumerate(pieces):
            try:
                got = self._kunmap_logged(p.iova, p.size, [(p.iova, p.iova + p.size - 1, p.iova)])
            except BaseException:
                self._map_pieces(pieces[:i], read=True, write=True)  # back to fully mapped
                raise
            self._account(-1, -got)
            if got != p.size:
                log.error("%s: identity UNMAP of %#x+%#x removed %#x bytes", self.label, p.iova, p.size, got)
        self._identity = None

