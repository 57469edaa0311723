"""VFIO-backed endpoints: one type1v2 container per VFIO group.

A :class:`VfioBackend` is the :class:`hostrelay.model.ports.Backend` of every
endpoint of one host IOMMU group.  The group sits in its own container for its
whole life because ``VFIO_GROUP_UNSET_CONTAINER`` fails with EBUSY while a
device fd is open (Linux >= 3.6 ``vfio_group_unset_container``) and a VMM
keeps its device fds open; a guest domain therefore fans each MAP/UNMAP out to
the containers of its endpoints (:mod:`hostrelay.backends.fanout`).

What the backend adds over :class:`~hostrelay.kernel.vfio.Container` is
:class:`~hostrelay.backends.space.MappedSpace`'s (pieces per RAM region,
limits before the ioctl, verified UNMAP runs, the bypass identity map, C
counters), with ``VFIO_IOMMU_MAP_DMA``/``UNMAP_DMA`` as the kernel calls, and
the container's own limit: ``vfio_dma`` entries against DMA_AVAIL as read at
open (``dma_entry_limit``, Linux >= 5.10 reports it).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostrelay._native import ffi, lib
from hostrelay.kernel.errors import VfioError
from hostrelay.backends.memory import GuestMemory
from hostrelay.backends.space import MappedSpace
from hostrelay.model.dirty import Segment, bitmap_runs, translate_runs
from hostrelay.model.mapping import Mapping
from hostrelay.model.status import NoResources, UnmapMismatch
from hostrelay.kernel.vfio import DEFAULT_DEV_ROOT, DEFAULT_SYSFS_ROOT, Container, Device, Group, IommuInfo, close_all

__all__ = [
    "CAP_IPC_LOCK",
    "DEFAULT_DMA_ENTRY_LIMIT",
    "HostReserved",
    "MemlockBudget",
    "UnmapMismatch",
    "VfioBackend",
    "has_cap_ipc_lock",
    "has_capability",
    "locked_bytes",
    "read_reserved_regions",
]

log = logging.getLogger(__name__)

PAGE_SIZE = 4096  # x86 host pages: RLIMIT_MEMLOCK is charged in these
CAP_IPC_LOCK = 14  # include/uapi/linux/capability.h
# What QEMU assumes when the kernel has no DMA_AVAIL capability (< 5.10):
# the default of vfio_iommu_type1.dma_entry_limit (U16_MAX).
DEFAULT_DMA_ENTRY_LIMIT = 65535


# --- process-wide facts -------------------------------------------------------


def _status_field(name: str, path: str = "/proc/self/status") -> str | None:
    with open(path, encoding="ascii") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return None


def has_capability(bit: int, path: str = "/proc/self/status") -> bool:
    """True if this process has capability ``bit`` in its effective set (``CapEff``)."""
    value = _status_field("CapEff", path)
    return value is not None and bool(int(value, 16) >> bit & 1)


def has_cap_ipc_lock(path: str = "/proc/self/status") -> bool:
    """True if this process has CAP_IPC_LOCK in its effective set (``CapEff`` bit 14)."""
    return has_capability(CAP_IPC_LOCK, path)


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


class VfioBackend(MappedSpace):
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
        self.label = f"group {group_id}"
        self.host_reserved = read_reserved_regions(group_id, sysfs_root)
        self.devices: dict[str, Device] = {}
        self._identity = None  # no identity map
        # The dirty log: the bitmap page size while the kernel logs (None:
        # off), and GPA ranges unmapped meanwhile that the kernel said dirty.
        self.dirty_pgsize: int | None = None
        self.dirty_removed: list[tuple[int, int]] = []

    # -- devices -------------------------------------------------------------
    def open_device(self, bdf: str) -> Device:
        """The device fd of ``bdf`` (kept open for the backend's life, as a VMM does)."""
        dev = self.devices.get(bdf)
        if dev is None:
            dev = self.group.device(bdf)
            self.devices[bdf] = dev
        return dev

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
        self.dirty_pgsize = None  # the kernel drops the log with the container
        self.container.close()

    # -- the kernel calls MappedSpace is built on ------------------------------------
    def _kmap(self, iova: int, size: int, hva: int, *, read: bool, write: bool) -> None:
        self.container.map_dma(iova, size, hva, read=read, write=write)

    def _kunmap(self, iova: int, size: int) -> int:
        return self.container.unmap_dma(iova, size)

    def _kunmap_logged(self, iova: int, size: int, segments: list[Segment]) -> int:
        pgsize = self.dirty_pgsize
        if pgsize is None:
            return self.container.unmap_dma(iova, size)
        # While logging, every unmap reads the removed range's bitmap with
        # it: once a vfio_dma is gone, GET_BITMAP can no longer name its pages.
        got, bitmap = self.container.unmap_dma_dirty(iova, size, pgsize)
        self.dirty_removed += translate_runs(iova, bitmap_runs(bitmap, pgsize), segments)
        return got

    # -- the dirty log (type1, Linux >= 5.8) ------------------------------------------
    def dirty_start(self) -> int:
        """Start the kernel's dirty log; return its page size.

        Raises :class:`~hostrelay.kernel.errors.VfioError` (ENOTSUP when the
        kernel reports no migration capability, or what START answered).
        """
        pgsize = self.info.dirty_pgsize
        if pgsize is None:
            raise VfioError(errno.ENOTSUP, "VFIO_IOMMU_DIRTY_PAGES(START)", path=self.container.path,
                            hint="the container reports no VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION")  # fmt: skip
        self.container.dirty_start()
        self.dirty_pgsize = pgsize
        self.c.dirty_pgsize = pgsize  # the C UNMAP reads the bitmap with each unmap (cext/hr_fanout.c)
        self.dirty_removed = []
        return pgsize

    def dirty_stop(self) -> None:
        """Stop the kernel's dirty log (what it still held is dropped)."""
        if self.dirty_pgsize is None:
            return
        self.dirty_pgsize = None
        self.c.dirty_pgsize = 0
        self.dirty_removed = []
        if not self.container.closed:
            self.container.dirty_stop()

    def dirty_collect(self, mappings: list[Mapping]) -> list[tuple[int, int]]:
        """GPA ranges the kernel says were written since the last call (or the start).

        ``mappings`` are the guest mappings this container holds (its
        domains' tables); with the identity pieces they are exactly its
        ``vfio_dma`` entries.  GET_BITMAP is asked per IOVA-contiguous run of
        entries because type1 refuses a range that starts or ends inside one
        (Linux 6.12 ``vfio_iova_dirty_bitmap``: EINVAL), and each set bit is
        translated through the entry holding it.  Ranges unmapped meanwhile
        (read with their unmap) are included and then forgotten.
        """
        pgsize = self.dirty_pgsize
        if pgsize is None:
            raise RuntimeError(f"{self.label}: the kernel is not logging dirty pages")
        entries: list[Segment] = []
        for m in mappings:
            for p in self._pieces(m):
                entries.append((p.iova, p.iova + p.size - 1, m.phys + (p.iova - m.start)))
        entries += [(p.iova, p.iova + p.size - 1, p.iova) for p in self._identity or ()]
        entries.sort()
        # The largest bitmap one call may fill (the capability's
        # max_dirty_bitmap_size, 256 MiB on Linux 6.12): a run longer than
        # that is split at an entry boundary.
        limit_bytes = self.info.migration[1] if self.info.migration else 1 << 28
        max_span = limit_bytes * 8 * pgsize
        out: list[tuple[int, int]] = []
        run: list[Segment] = []

        def flush() -> None:
            if run:
                base, last = run[0][0], run[-1][1]
                bitmap = self.container.dirty_bitmap(base, last - base + 1, pgsize)
                out.extend(translate_runs(base, bitmap_runs(bitmap, pgsize), run))
                run.clear()

        for seg in entries:
            if run and (run[-1][1] + 1 != seg[0] or seg[1] - run[0][0] + 1 > max_span):
                flush()
            run.append(seg)
        flush()
        out += self.dirty_removed
        self.dirty_removed = []
        return out

    def _in_ranges(self, iova: int, size: int) -> bool:
        return self.info.in_ranges(iova, size)

    def _usable(self) -> list[tuple[int, int]]:
        return [(r.start, r.end) for r in self.info.iova_ranges]

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
