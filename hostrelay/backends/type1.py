"""VFIO-backed endpoints: one type1v2 container per VFIO group.

A :class:`VfioBackend` is the :class:`hostrelay.model.ports.Backend` of every
endpoint of one host IOMMU group.  The group sits in its own container for its
whole life because ``VFIO_GROUP_UNSET_CONTAINER`` fails with EBUSY while a
device fd is open (Linux >= 3.6 ``vfio_group_unset_container``) and a VMM
keeps its device fds open; a guest domain therefore fans each MAP/UNMAP out to
the containers of its endpoints (:mod:`hostrelay.backends.fanout`).

What the backend adds over :class:`~hostrelay.kernel.vfio.Container`:

- GPA → host VA through :class:`~hostrelay.backends.memory.GuestMemory`: one guest
  mapping becomes one ``VFIO_IOMMU_MAP_DMA`` per region piece, exactly its
  range (no power-of-two splitting); a GPA that is not guest RAM is refused.
- Limits checked *before* the ioctl, so a refusal leaves nothing half-done:
  the container's ``vfio_dma`` entries against DMA_AVAIL as read at open
  (``dma_entry_limit``, Linux >= 5.10 reports it), and the bytes type1 will
  charge to ``RLIMIT_MEMLOCK`` (:class:`MemlockBudget`).
- UNMAP per contiguous run of mappings, verifying the kernel's unmapped byte
  count (type1v2 copies the removed size back, Linux >= 3.x).
- Identity map of guest RAM (IOVA = GPA) while the group is in bypass.
- Counters (entries, kernel-charged bytes) per container, kept in C
  (``struct hr_container``) where the data plane checks and updates them.

Accounting rules relied on (Linux 6.12 ``drivers/vfio/vfio_iommu_type1.c``):
``vfio_dma_do_map`` records ``dma->lock_cap = capable(CAP_IPC_LOCK)``;
``vfio_pin_map_dma`` reads ``limit = rlimit(RLIMIT_MEMLOCK) >> PAGE_SHIFT`` and
``vfio_pin_pages_remote`` refuses with ENOMEM once ``mm->locked_vm + pages > limit``
unless ``lock_cap``; every page of every ``vfio_dma`` is charged (no dedup
across IOVAs or containers), except reserved/PFNMAP pages, which guest RAM
never is.  ``mm->locked_vm`` is what ``/proc/self/status`` shows as ``VmLck``.
"""

from __future__ import annotations

import errno
import logging
import resource
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostrelay._native import ffi, lib
from hostrelay.model.mapping import Mapping
from hostrelay.kernel.errors import VfioError
from hostrelay.backends.memory import GuestMemory
from hostrelay.model.wire import MapFlag
from hostrelay.model.status import InvalidRequest, NoResources, UnmapMismatch
from hostrelay.kernel.vfio import DEFAULT_DEV_ROOT, DEFAULT_SYSFS_ROOT, Container, Device, Group, IommuInfo, close_all

__all__ = [
    "CAP_IPC_LOCK",
    "DEFAULT_DMA_ENTRY_LIMIT",
    "HostReserved",
    "MemlockBudget",
    "UnmapMismatch",
    "VfioBackend",
    "has_cap_ipc_lock",
    "locked_bytes",
    "read_reserved_regions",
]

log = logging.getLogger(__name__)

PAGE_SIZE = 4096  # x86 host pages: RLIMIT_MEMLOCK is charged in these
CAP_IPC_LOCK = 14  # include/uapi/linux/capability.h
# What QEMU assumes when the kernel has no DMA_AVAIL capability (< 5.10):
# the default of vfio_iommu_type1.dma_entry_limit (U16_MAX).
DEFAULT_DMA_ENTRY_LIMIT = 65535
_RW = int(MapFlag.READ | MapFlag.WRITE)


# --- process-wide facts -------------------------------------------------------


def _status_field(name: str, path: str = "/proc/self/status") -> str | None:
    with open(path, encoding="ascii") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return None


def has_cap_ipc_lock(path: str = "/proc/self/status") -> bool:
    """True if this process has CAP_IPC_LOCK in its effective set (``CapEff`` bit 14)."""
    value = _status_field("CapEff", path)
    return value is not None and bool(int(value, 16) >> CAP_IPC_LOCK & 1)


def locked_bytes(path: str = "/proc/self/status") -> int:
    """``VmLck`` of this process in bytes (``mm->locked_vm``, where type1 charges pins)."""
    value = _status_field("VmLck", path)
    return int(value.split()[0]) * 1024 if value else 0


class MemlockBudget:
    """What type1 will charge to ``RLIMIT_MEMLOCK``, checked before the ioctl.

    One per process (the relay's); every :class:`VfioBackend` of the relay
    shares it.  ``lock_cap`` is sampled at construction and by
    :meth:`refresh` (the kernel samples it at each MAP: call ``refresh`` after
    changing capabilities).  When the limit applies, the check reads ``VmLck``
    so that memory the VMM mlock()s itself is counted, exactly as the kernel
    counts it; with CAP_IPC_LOCK or an infinite limit it costs nothing.
    """

    def __init__(self, relay: Any, *, status_path: str = "/proc/self/status") -> None:
        self._status_path = status_path
        self.lock_cap = has_cap_ipc_lock(status_path)
        # The C data plane (struct hr_relay) keeps the one running total of
        # what this relay's containers charged.
        self.relay = relay

    def account(self, container: Any, entries: int, charged: int) -> None:
        """Record ``entries`` vfio_dma objects and ``charged`` bytes (negative: removed)."""
        lib.hr_relay_account(self.relay, container, entries, charged)

    def refresh(self) -> None:
        """Re-read CAP_IPC_LOCK."""
        self.lock_cap = has_cap_ipc_lock(self._status_path)

    def limit(self) -> int | None:
        """The byte limit type1 enforces now, or ``None`` when it enforces none."""
        if self.lock_cap:
            return None
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if soft == resource.RLIM_INFINITY:
            return None
        return soft // PAGE_SIZE * PAGE_SIZE  # the kernel compares in whole pages

    def check(self, charge: int) -> None:
        """Raise :class:`NoResources` if pinning ``charge`` more bytes would exceed the limit."""
        if charge <= 0:
            return
        limit = self.limit()
        if limit is None:
            return
        current = locked_bytes(self._status_path)
        if current + charge > limit:
            raise NoResources(
                f"pinning {charge:#x} bytes would exceed RLIMIT_MEMLOCK ({limit:#x} bytes, "
                f"{current:#x} already locked; type1 charges every container separately)"
            )


# --- host reserved IOVA regions ------------------------------------------------


@dataclass(frozen=True)
class HostReserved:
    """One line of ``/sys/kernel/iommu_groups/N/reserved_regions`` (inclusive end)."""

    start: int
    end: int
    kind: str  # direct, direct-relaxable, reserved, msi, sw-msi

    @property
    def is_msi(self) -> bool:
        """The hardware MSI doorbell window (x86: 0xfee00000-0xfeefffff)."""
        return self.kind == "msi"


def read_reserved_regions(group_id: int, sysfs_root: Path = DEFAULT_SYSFS_ROOT) -> list[HostReserved]:
    """The group's reserved IOVA regions (Linux >= 4.11 exposes the file)."""
    path = Path(sysfs_root) / "kernel" / "iommu_groups" / str(group_id) / "reserved_regions"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.append(HostReserved(int(parts[0], 16), int(parts[1], 16), parts[2]))
    return out


# --- the backend ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Piece:
    """One ``vfio_dma``: a guest mapping's part that lies in one RAM region."""

    iova: int
    hva: int
    size: int


class VfioBackend:
    """The container of one VFIO group, driven by the relay's domains.

    ``map``/``unmap`` either fully succeed or raise leaving the container and
    its counters as they were (a kernel count mismatch on UNMAP excepted, see
    :class:`UnmapMismatch`).
    """

    def __init__(
        self,
        memory: GuestMemory,
        group_id: int,
        *,
        budget: MemlockBudget,
        dev_root: Path = DEFAULT_DEV_ROOT,
        sysfs_root: Path = DEFAULT_SYSFS_ROOT,
    ) -> None:
        self.memory = memory
        self.group_id = group_id
        self.budget = budget
        self.container = Container(dev_root)
        group: Group | None = None
        try:
            group = Group(group_id, dev_root)
            if not group.viable:
                raise VfioError(errno.EBUSY, "VFIO_GROUP_GET_STATUS", path=group.path,
                                hint="group is not viable: bind every device of the group to vfio-pci")  # fmt: skip
            self.container.attach(group)
            self.group = group
            # Read after SET_IOMMU: the ranges and page sizes are the group's.
            self.info: IommuInfo = self.container.iommu_info()
        except BaseException:
            # The group is closed here, not by the container: it is not in
            # the container unless SET_CONTAINER succeeded, and a group
            # left open cannot be opened again (one open per group node).
            try:
                close_all([*([group.close] if group is not None else []), self.container.close])
            except OSError:
                pass  # fds are released anyway; the error to report is the one raised here
            raise
        # The container is new, so DMA_AVAIL is the whole per-container budget
        # (copied from dma_entry_limit at VFIO_SET_IOMMU).
        self.entry_limit = self.info.dma_avail if self.info.dma_avail is not None else DEFAULT_DMA_ENTRY_LIMIT
        # The counters live in C (struct hr_container) so the C data plane
        # checks and updates the same numbers on the hot path.
        self.c = ffi.new("struct hr_container *")
        self.c.fd = self.container.fd
        self.c.avail = self.entry_limit
        self.host_reserved = read_reserved_regions(group_id, sysfs_root)
        self.devices: dict[str, Device] = {}
        self._identity: list[_Piece] | None = None  # None: no identity map

    # -- devices -------------------------------------------------------------
    def open_device(self, bdf: str) -> Device:
        """The device fd of ``bdf`` (kept open for the backend's life, as a VMM does)."""
        dev = self.devices.get(bdf)
        if dev is None:
            dev = self.group.device(bdf)
            self.devices[bdf] = dev
        return dev

    @property
    def entries(self) -> int:
        """Live vfio_dma objects this backend created."""
        return int(self.c.entries)

    @property
    def charged(self) -> int:
        """Bytes type1 charged to RLIMIT_MEMLOCK for them."""
        return int(self.c.charged)

    def close(self) -> None:
        """Close devices, group and container (type1 then unpins everything).

        Every fd is closed even if closing one fails; the first error is
        raised afterwards, with the backend closed all the same.
        """
        self.devices.clear()
        if not self.container.closed:
            self._account(-self.entries, -self.charged)
        self.c.fd = -1
        self._identity = None
        self.container.close()

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
            if not self.info.in_ranges(p.iova, p.size):
                raise InvalidRequest(
                    f"IOVA [{p.iova:#x}, {p.iova + p.size - 1:#x}] is outside the usable IOVA ranges "
                    f"of group {self.group_id}"
                )
        return pieces

    def precheck(self, mapping: Mapping) -> int:
        """Refuse ``mapping`` now if it cannot be mapped; return its memlock charge.

        Checks guest RAM, the usable IOVA ranges and the entry budget; the
        caller checks the summed charge of every container against
        :class:`MemlockBudget` (the kernel's limit is process-wide).
        """
        pieces = self._pieces(mapping)
        self._check_entries(len(pieces))
        return sum(p.size for p in pieces)

    def _check_entries(self, n: int) -> None:
        if n and self.entries + n > self.entry_limit:
            raise NoResources(
                f"group {self.group_id}: {self.entries} of {self.entry_limit} DMA entries in use, "
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
                self.container.map_dma(p.iova, p.size, p.hva, read=read, write=write)
                done.append(p)
        except BaseException:
            for p in reversed(done):
                try:
                    self.container.unmap_dma(p.iova, p.size)
                except Exception:
                    log.exception("group %d: rollback of piece %#x+%#x failed", self.group_id, p.iova, p.size)
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
                got = self.container.unmap_dma(start, end - start + 1)
            except BaseException:
                self._remap(done)
                raise
            self._account(-n, -got)
            if got != expected:
                log.error(
                    "group %d: UNMAP [%#x, %#x] removed %#x bytes, the table expected %#x",
                    self.group_id, start, end, got, expected,
                )
                # Keep going: the caller removes every mapping from its table.
                mismatch = UnmapMismatch(
                    f"group {self.group_id}: kernel unmapped {got:#x} bytes of [{start:#x}, {end:#x}], "
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
                    log.exception("group %d: rollback re-map of %s failed", self.group_id, m)

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
        """True while guest RAM is identity-mapped (the group is in bypass)."""
        return self._identity is not None

    def identity_pieces(self) -> list[tuple[int, int]]:
        """``(gpa, size)`` of each identity-mapped piece (empty when off)."""
        return [(p.iova, p.size) for p in self._identity or ()]

    def _identity_plan(self) -> list[_Piece]:
        # Guest RAM clipped to the usable IOVA ranges: RAM under a reserved
        # window (MSI doorbell, RMRR) cannot be reached by DMA on real
        # hardware either.
        ranges = [(r.start, r.end) for r in self.info.iova_ranges] or [(0, (1 << 64) - 1)]
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
                got = self.container.unmap_dma(p.iova, p.size)
            except BaseException:
                self._map_pieces(pieces[:i], read=True, write=True)  # back to fully mapped
                raise
            self._account(-1, -got)
            if got != p.size:
                log.error("group %d: identity UNMAP of %#x+%#x removed %#x bytes", self.group_id, p.iova, p.size, got)
        self._identity = None

    # -- inspection ----------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters of this container (what the kernel holds for it)."""
        return {
            "group": self.group_id,
            "entries": self.entries,
            "entry_limit": self.entry_limit,
            "charged_bytes": self.charged,
            "identity_bytes": sum(p.size for p in self._identity or ()),
        }

    def unmap_all(self) -> int:
        """``VFIO_DMA_UNMAP_FLAG_ALL`` (Linux >= 5.12): empty the container; return the bytes.

        For inspection and teardown: the relay's tables are not told.
        """
        got = self.container.unmap_all()
        self._account(-self.entries, -self.charged)
        self._identity = None
        return got
