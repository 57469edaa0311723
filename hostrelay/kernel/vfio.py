"""VFIO containers, groups and devices (the legacy type1v2 interface).

The model follows rust-vmm's vfio-ioctls: a :class:`Container` is one IOMMU
address space (``/dev/vfio/vfio``); a :class:`Group` (``/dev/vfio/N``) is the
unit of isolation and joins exactly one container; a :class:`Device` is an fd
for one function of a group.  Close order is always devices, then groups, then
the container: closing a container closes what it holds.

All kernel calls go through :mod:`hostrelay.kernel.ioctl`; errors are the typed
:class:`~hostrelay.kernel.errors.VfioError` subclasses.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from hostrelay.kernel import ioctl as k
from hostrelay.kernel.errors import VfioError, vfio_error

__all__ = ["Container", "Device", "Group", "IommuInfo", "IovaRange", "RegionInfo", "group_of"]

DEFAULT_DEV_ROOT = Path("/dev/vfio")
DEFAULT_SYSFS_ROOT = Path("/sys")


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise vfio_error(exc.errno or 0, "open", path=str(path)) from exc


def _close_quietly(fd: int, path: str | None) -> None:
    """Close ``fd`` on an error path: the error being handled is the one to
    report, and the fd is gone either way (Linux releases it before close
    can fail)."""
    try:
        k.close(fd, path)
    except OSError:
        pass


def close_all(closers: Iterable[Callable[[], None]]) -> None:
    """Call every closer even if one fails, then raise the first OSError.

    Linux releases an fd before close(2) can fail, so one failed close is no
    reason to leave the next fd (and the pins behind it) open.
    """
    first: OSError | None = None
    for close in closers:
        try:
            close()
        except OSError as exc:
            first = first or exc
    if first is not None:
        raise first


@dataclass(frozen=True)
class IovaRange:
    """A usable IOVA window; ``end`` is inclusive, as the kernel reports it."""

    start: int
    end: int

    def contains(self, iova: int, size: int) -> bool:
        """True if ``[iova, iova+size)`` lies inside this window."""
        return size > 0 and self.start <= iova and iova + size - 1 <= self.end


@dataclass(frozen=True)
class IommuInfo:
    """What ``VFIO_IOMMU_GET_INFO`` reports for a container.

    ``iova_ranges`` is empty when the kernel reported none (then nothing is
    known, not nothing is usable); ``dma_avail`` is ``None`` when the kernel
    has no DMA_AVAIL capability (before Linux 5.10).  ``migration`` is the
    migration capability's ``(pgsize_bitmap, max_dirty_bitmap_size)``, or
    ``None`` when the kernel has no dirty page logging (before Linux 5.8).
    """

    flags: int
    iova_pgsizes: int
    iova_ranges: tuple[IovaRange, ...]
    dma_avail: int | None
    migration: tuple[int, int] | None

    @property
    def dirty_pgsize(self) -> int | None:
        """The page size dirty bitmaps are asked in, or ``None`` if the kernel logs none.

        The smallest page both of ``iova_pgsizes`` and of the capability's
        ``pgsize_bitmap``; type1 takes only its smallest IOMMU page there
        (Linux 6.12: GET_BITMAP and UNMAP's bitmap are EINVAL with another),
        which is what its capability reports.
        """
        if not self.migration:
            return None
        both = self.iova_pgsizes & self.migration[0]
        return both & -both if both else None

    @property
    def granule(self) -> int:
        """The smallest IOMMU page size: every MAP/UNMAP must be aligned to it."""
        return self.iova_pgsizes & -self.iova_pgsizes

    def in_ranges(self, iova: int, size: int) -> bool:
        """True if ``[iova, iova+size)`` lies inside one usable IOVA window."""
        if not self.iova_ranges:
            return True
        return any(r.contains(iova, size) for r in self.iova_ranges)


@dataclass(frozen=True)
class RegionInfo:
    """One device region: its index, flags, size and file offset in the device fd."""

    index: int
    flags: int
    size: int
    offset: int

    @property
    def readable(self) -> bool:
        return bool(self.flags & k.const("VFIO_REGION_INFO_FLAG_READ"))

    @property
    def writable(self) -> bool:
        return bool(self.flags & k.const("VFIO_REGION_INFO_FLAG_WRITE"))


def group_of(bdf: str, sysfs_root: Path = DEFAULT_SYSFS_ROOT) -> int:
    """The IOMMU group number of PCI function ``bdf`` (e.g. ``"0000:00:03.0"``)."""
    link = sysfs_root / "bus" / "pci" / "devices" / bdf / "iommu_group"
    try:
        return int(os.path.basename(os.readlink(link)))
    except OSError as exc:
        raise vfio_error(exc.errno or 0, "read iommu_group", path=str(link)) from exc


class Container:
    """A VFIO container: one IOMMU address space shared by the groups in it.

    Opens ``/dev/vfio/vfio`` and checks the API version and type1v2 support.
    The IOMMU model is set when the first group joins (the kernel refuses
    ``VFIO_SET_IOMMU`` on a container without a group).
    """

    def __init__(self, dev_root: Path = DEFAULT_DEV_ROOT) -> None:
        self.path = str(Path(dev_root) / "vfio")
        self.fd = _open(Path(self.path))
        self.groups: list[Group] = []
        self.iommu_set = False
        try:
            version = k.get_api_version(self.fd, self.path)
            if version != k.const("VFIO_API_VERSION"):
                raise VfioError(71, "VFIO_GET_API_VERSION", path=self.path, fd=self.fd,
                                hint=f"kernel reports API version {version}, hostrelay speaks {k.const('VFIO_API_VERSION')}")  # fmt: skip
            if not k.check_extension(self.fd, k.const("VFIO_TYPE1v2_IOMMU"), self.path):
                raise VfioError(95, "VFIO_CHECK_EXTENSION", path=self.path, fd=self.fd,
                                hint="the kernel has no type1v2 IOMMU driver: load vfio_iommu_type1")  # fmt: skip
        except BaseException:
            _close_quietly(self.fd, self.path)
            self.fd = -1
            raise

    # -- lifetime -------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        """Close every group (and its devices), then the container.

        The last group leaving a container makes the kernel drop every mapping
        (type1 ``vfio_iommu_type1_detach_group``), so nothing stays pinned.
        Every fd is closed even if closing one of them fails; the first such
        error is raised afterwards (the fds are released all the same).
        """
        close_all([*(g.close for g in list(self.groups)), self._close_fd])

    def _close_fd(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            k.close(fd, self.path)

    def __enter__(self) -> Container:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _require_open(self) -> int:
        if self.fd < 0:
            raise vfio_error(9, "use of a closed container", path=self.path)  # EBADF
        return self.fd

    # -- groups ---------------------------------------------------------
    def attach(self, group: Group) -> None:
        """Put ``group`` in this container; the first group also sets type1v2."""
        fd = self._require_open()
        k.group_set_container(group.fd, fd, group.path)
        group.container = self
        self.groups.append(group)
        if not self.iommu_set:
            try:
                k.set_iommu(fd, k.const("VFIO_TYPE1v2_IOMMU"), self.path)
            except VfioError:
                self.detach(group)
                raise
            self.iommu_set = True

    def detach(self, group: Group) -> None:
        """Take ``group`` out (EBUSY while its device fds are open)."""
        k.group_unset_container(group.fd, group.path)
        group.container = None
        self.groups.remove(group)

    def check_extension(self, extension: int) -> bool:
        """True if the kernel supports ``extension`` (a ``VFIO_*`` extension id)."""
        return k.check_extension(self._require_open(), extension, self.path) > 0

    # -- the address space ----------------------------------------------
    def iommu_info(self) -> IommuInfo:
        """Page sizes, usable IOVA ranges and remaining mapping entries."""
        flags, pgsizes, ranges, avail, migration = k.iommu_get_info(self._require_open(), self.path)
        return IommuInfo(
            flags=flags,
            iova_pgsizes=pgsizes,
            iova_ranges=tuple(IovaRange(s, e) for s, e in (ranges or [])),
            dma_avail=avail,
            migration=migration,
        )

    def map_dma(self, iova: int, size: int, vaddr: int, *, read: bool = True, write: bool = True) -> None:
        """Map ``size`` bytes of host memory at ``vaddr`` to ``iova`` (pins the pages).

        ``read``/``write`` are from the device's point of view.  Raises
        :class:`~hostrelay.kernel.errors.VfioMappingExists` on overlap (type1 never
        merges), :class:`~hostrelay.kernel.errors.VfioResourceLimit` past
        ``dma_entry_limit`` or RLIMIT_MEMLOCK, ``VfioInvalidArgument`` when
        misaligned or outside the usable ranges.
        """
        flags = (k.const("VFIO_DMA_MAP_FLAG_READ") if read else 0) | (k.const("VFIO_DMA_MAP_FLAG_WRITE") if write else 0)
        k.map_dma(self._require_open(), iova, size, vaddr, flags, self.path)

    def unmap_dma(self, iova: int, size: int) -> int:
        """Unmap every mapping inside ``[iova, iova+size)``; return the bytes unmapped.

        type1v2 (Linux >= 3.x): a range that bisects a mapping fails with
        EINVAL and removes nothing; holes are fine; no mapping at all → 0.
        """
        return k.unmap_dma(self._require_open(), iova, size, 0, self.path)

    # -- dirty page logging (Linux >= 5.8) ---------------------------------------
    def dirty_start(self) -> None:
        """Start the container's dirty page log (``VFIO_IOMMU_DIRTY_PAGES_FLAG_START``)."""
        k.dirty_start(self._require_open(), self.path)

    def dirty_stop(self) -> None:
        """Stop it (``_FLAG_STOP``); the kernel frees its bitmaps."""
        k.dirty_stop(self._require_open(), self.path)

    def dirty_bitmap(self, iova: int, size: int, pgsize: int) -> bytes:
        """The dirty bitmap of ``[iova, iova+size)``, which must cover whole mappings (``_FLAG_GET_BITMAP``)."""
        return k.dirty_get_bitmap(self._require_open(), iova, size, pgsize, self.path)

    def unmap_dma_dirty(self, iova: int, size: int, pgsize: int) -> tuple[int, bytes]:
        """:meth:`unmap_dma` that also returns the removed range's dirty bitmap, read atomically with it."""
        return k.unmap_dma_dirty(self._require_open(), iova, size, pgsize, self.path)

    def unmap_all(self) -> int:
        """Unmap everything (``VFIO_DMA_UNMAP_FLAG_ALL``, Linux >= 5.12); return the bytes unmapped."""
        return k.unmap_dma(self._require_open(), 0, 0, k.const("VFIO_DMA_UNMAP_FLAG_ALL"), self.path)


class Group:
    """An IOMMU group node ``/dev/vfio/N``; the kernel allows one open at a time."""

    def __init__(self, group_id: int, dev_root: Path = DEFAULT_DEV_ROOT) -> None:
        self.id = group_id
        self.path = str(Path(dev_root) / str(group_id))
        self.fd = _open(Path(self.path))
        self.container: Container | None = None
        self.devices: list[Device] = []

    @classmethod
    def for_device(cls, bdf: str, *, dev_root: Path = DEFAULT_DEV_ROOT, sysfs_root: Path = DEFAULT_SYSFS_ROOT) -> Group:
        """Open the group that PCI function ``bdf`` belongs to."""
        return cls(group_of(bdf, sysfs_root), dev_root)

    def status(self) -> int:
        """``VFIO_GROUP_FLAGS_*`` bits."""
        return k.group_get_status(self.fd, self.path)

    @property
    def viable(self) -> bool:
        """True if every device in the group is bound to vfio-pci (or no driver)."""
        return bool(self.status() & k.const("VFIO_GROUP_FLAGS_VIABLE"))

    def device(self, bdf: str) -> Device:
        """Open the device fd of ``bdf`` (the group must be in a container with an IOMMU set)."""
        fd = k.group_get_device_fd(self.fd, bdf, self.path)
        try:
            dev = Device(self, bdf, fd)
        except BaseException:
            _close_quietly(fd, bdf)  # Device() asks the kernel first: do not leak the fd
            raise
        self.devices.append(dev)
        return dev

    def close(self) -> None:
        """Close the group's devices, then the group (which leaves its container).

        Closes everything even if one close fails, then raises the first error.
        """
        close_all([*(d.close for d in list(self.devices)), self._close_fd, self._leave_container])

    def _close_fd(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            k.close(fd, self.path)

    def _leave_container(self) -> None:
        if self.container is not None:
            self.container.groups.remove(self)
            self.container = None

    def __enter__(self) -> Group:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class Device:
    """A VFIO device fd: region access and reset (``group`` is None for a cdev-opened device)."""

    def __init__(self, group: Group | None, name: str, fd: int) -> None:
        self.group = group
        self.name = name
        self.fd = fd
        self.flags, self.num_regions, self.num_irqs = k.device_get_info(fd, name)
        self._regions: dict[int, RegionInfo] = {}

    def region(self, index: int) -> RegionInfo:
        """Region ``index`` (PCI: BAR0..5 = 0..5, ROM = 6, config = 7)."""
        if index not in self._regions:
            flags, size, offset = k.device_get_region_info(self.fd, index, self.name)
            self._regions[index] = RegionInfo(index, flags, size, offset)
        return self._regions[index]

    def read(self, index: int, offset: int, size: int) -> bytes:
        """Read ``size`` bytes at ``offset`` of region ``index``."""
        reg = self.region(index)
        if offset < 0 or offset + size > reg.size:
            raise ValueError(f"read [{offset:#x}, +{size:#x}) outside region {index} of size {reg.size:#x}")
        return os.pread(self.fd, size, reg.offset + offset)

    def write(self, index: int, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of region ``index``."""
        reg = self.region(index)
        if offset < 0 or offset + len(data) > reg.size:
            raise ValueError(f"write [{offset:#x}, +{len(data):#x}) outside region {index} of size {reg.size:#x}")
        if os.pwrite(self.fd, data, reg.offset + offset) != len(data):
            raise vfio_error(5, "region write", path=self.name, fd=self.fd)  # EIO: short write

    def read32(self, index: int, offset: int) -> int:
        return int.from_bytes(self.read(index, offset, 4), "little")

    def write32(self, index: int, offset: int, value: int) -> None:
        self.write(index, offset, value.to_bytes(4, "little"))

    def read64(self, index: int, offset: int) -> int:
        return int.from_bytes(self.read(index, offset, 8), "little")

    def write64(self, index: int, offset: int, value: int) -> None:
        self.write(index, offset, value.to_bytes(8, "little"))

    def enable_bus_master(self) -> None:
        """Set memory-space and bus-master enable in the PCI command register."""
        config = k.const("VFIO_PCI_CONFIG_REGION_INDEX")
        command = int.from_bytes(self.read(config, 4, 2), "little")
        self.write(config, 4, (command | 0x6).to_bytes(2, "little"))

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET`` (only if the device advertises reset)."""
        k.device_reset(self.fd, self.name)

    def close(self) -> None:
        """Close the device fd (released even if this raises)."""
        fd, self.fd = self.fd, -1
        if self.group is not None and self in self.group.devices:
            self.group.devices.remove(self)
        if fd >= 0:
            k.close(fd, self.name)
