"""iommufd: one kernel I/O address space (IOAS) that any number of devices attach to.

The modern VFIO uAPI (Linux >= 6.6 with ``CONFIG_IOMMUFD`` and
``CONFIG_VFIO_DEVICE_CDEV``): ``/dev/iommu`` holds IOASes, and a device is
opened through its own cdev (``/dev/vfio/devices/vfioN``) and bound to an
iommufd, then attached to an IOAS.  Every device attached to one IOAS reaches
the same mappings, pinned and charged once, and a device moves by attaching
it elsewhere (a replace, Linux >= 6.9).  These are the kernel objects;
errors are the same typed :class:`~hostrelay.kernel.errors.VfioError` as the
type1 ones.

The wrappers exist only in an extension built against a uapi that has them
(``cext/uapi.py``); :data:`AVAILABLE` says whether this one was.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from hostrelay._native import ffi, lib
from hostrelay.kernel.errors import VfioError, vfio_error
from hostrelay.kernel.vfio import DEFAULT_SYSFS_ROOT, Device, IovaRange

__all__ = ["AVAILABLE", "DEFAULT_IOMMU", "Ioas", "Iommufd", "IommufdDevice", "cdev_of"]

#: True if the extension was built with the iommufd uapi.
AVAILABLE: bool = hasattr(lib, "hr_iommufd_ioas_alloc")
DEFAULT_IOMMU = Path("/dev/iommu")
DEFAULT_CDEV_ROOT = Path("/dev/vfio/devices")


def _require() -> None:
    if not AVAILABLE:
        raise VfioError(errno.ENOSYS, "iommufd", hint="this build of hostrelay has no iommufd: its kernel headers "
                        "lack <linux/iommufd.h> (run python3 cext/uapi.py, then rebuild)")  # fmt: skip


def _check(rc: int, op: str, *, fd: int, path: str | None = None, iova: int | None = None,
           size: int | None = None) -> None:  # fmt: skip
    if rc < 0:
        raise vfio_error(-rc, op, path=path, fd=fd, iova=iova, size=size)


def cdev_of(bdf: str, sysfs_root: Path = DEFAULT_SYSFS_ROOT) -> str:
    """The name of ``bdf``'s VFIO device cdev (``vfioN``), from sysfs (Linux >= 6.6)."""
    d = sysfs_root / "bus" / "pci" / "devices" / bdf / "vfio-dev"
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        raise vfio_error(errno.ENODEV, "find the VFIO device cdev", path=str(d)) from None
    if len(names) != 1:
        raise vfio_error(errno.ENODEV, "find the VFIO device cdev", path=str(d))
    return names[0]


class Iommufd:
    """An open ``/dev/iommu``: the context IOASes and bound devices live in."""

    def __init__(self, path: Path = DEFAULT_IOMMU) -> None:
        _require()
        self.path = str(path)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise vfio_error(exc.errno or errno.EIO, "open", path=self.path) from None

    def ioas(self) -> Ioas:
        """A new, empty IOAS (``IOMMU_IOAS_ALLOC``)."""
        out = ffi.new("uint32_t *")
        _check(lib.hr_iommufd_ioas_alloc(self.fd, out), "IOMMU_IOAS_ALLOC", fd=self.fd, path=self.path)
        return Ioas(self, int(out[0]))

    def close(self) -> None:
        """Close the fd: the kernel destroys every object in it and unpins everything."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Iommufd:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


@dataclass
class Ioas:
    """One I/O address space of an :class:`Iommufd`."""

    iommufd: Iommufd
    id: int

    def map(self, iova: int, size: int, vaddr: int, *, read: bool = True, write: bool = True) -> None:
        """Map ``[iova, iova + size)`` to process memory at ``vaddr`` (fixed IOVA, exact range)."""
        flags = lib.IOMMU_IOAS_MAP_FIXED_IOVA
        flags |= lib.IOMMU_IOAS_MAP_READABLE if read else 0
        flags |= lib.IOMMU_IOAS_MAP_WRITEABLE if write else 0
        fd = self.iommufd.fd
        _check(lib.hr_iommufd_ioas_map(fd, self.id, flags, vaddr, iova, size), "IOMMU_IOAS_MAP",
               fd=fd, iova=iova, size=size)  # fmt: skip

    def unmap(self, iova: int, size: int) -> int:
        """Unmap every mapping inside ``[iova, iova + size)``; the bytes the kernel unmapped."""
        out = ffi.new("uint64_t *")
        fd = self.iommufd.fd
        _check(lib.hr_iommufd_ioas_unmap(fd, self.id, iova, size, out), "IOMMU_IOAS_UNMAP", fd=fd, iova=iova, size=size)
        return int(out[0])

    def iova_ranges(self) -> tuple[tuple[IovaRange, ...], int]:
        """The usable IOVA ranges (inclusive ends) and the required alignment.

        The ranges narrow as devices attach: they are the intersection of
        what every attached device's IOMMU allows.
        """
        pairs = ffi.new("uint64_t[]", 128)
        num = ffi.new("uint32_t *")
        align = ffi.new("uint64_t *")
        fd = self.iommufd.fd
        _check(lib.hr_iommufd_ioas_iova_ranges(fd, self.id, pairs, 64, num, align), "IOMMU_IOAS_IOVA_RANGES", fd=fd)
        n = min(int(num[0]), 64)
        return tuple(IovaRange(int(pairs[2 * i]), int(pairs[2 * i + 1])) for i in range(n)), int(align[0])

    def destroy(self) -> None:
        """``IOMMU_DESTROY`` (EBUSY while a device is attached)."""
        fd = self.iommufd.fd
        _check(lib.hr_iommufd_destroy(fd, self.id), "IOMMU_DESTROY", fd=fd)


class IommufdDevice(Device):
    """A PCI function opened through its VFIO cdev and bound to an :class:`Iommufd`.

    Region access and reset are :class:`~hostrelay.kernel.vfio.Device`'s
    (the cdev answers the same device ioctls once bound).
    """

    def __init__(self, bdf: str, iommufd: Iommufd, *, cdev_root: Path = DEFAULT_CDEV_ROOT,
                 sysfs_root: Path = DEFAULT_SYSFS_ROOT) -> None:  # fmt: skip
        _require()
        path = cdev_root / cdev_of(bdf, sysfs_root)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise vfio_error(exc.errno or errno.EIO, "open", path=str(path)) from None
        out = ffi.new("uint32_t *")
        try:
            # The cdev answers nothing but BIND until bound (Linux 6.6 vfio_device_fops).
            _check(lib.hr_iommufd_device_bind(fd, iommufd.fd, out), "VFIO_DEVICE_BIND_IOMMUFD", fd=fd, path=str(path))
            super().__init__(None, bdf, fd)
        except BaseException:
            os.close(fd)
            raise
        self.iommufd = iommufd
        self.dev_id = int(out[0])
        self.cdev = str(path)
        self.pt_id: int | None = None

    def attach(self, pt_id: int) -> int:
        """Attach to IOAS (or page table) ``pt_id``, replacing any attachment; the page table's id."""
        out = ffi.new("uint32_t *")
        _check(lib.hr_iommufd_device_attach(self.fd, pt_id, out), "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
               fd=self.fd, path=self.cdev)  # fmt: skip
        self.pt_id = int(out[0])
        return self.pt_id

    def detach(self) -> None:
        """The device reaches nothing (``VFIO_DEVICE_DETACH_IOMMUFD_PT``)."""
        _check(lib.hr_iommufd_device_detach(self.fd), "VFIO_DEVICE_DETACH_IOMMUFD_PT", fd=self.fd, path=self.cdev)
        self.pt_id = None
