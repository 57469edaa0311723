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

__all__ = ["AVAILABLE", "DEFAULT_IOMMU", "HW_CAP_DIRTY_TRACKING", "HwInfo", "Ioas", "Iommufd", "IommufdDevice", "cdev_of"]

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


def _option(fd: int, option_id: int, op: int, object_id: int, value: int = 0) -> int:
    """One ``IOMMU_OPTION`` (Linux >= 6.2); the value the kernel wrote back."""
    val = ffi.new("uint64_t *", value)
    _check(lib.hr_iommufd_option(fd, option_id, op, object_id, val), "IOMMU_OPTION", fd=fd)
    return int(val[0])


#: ``IOMMU_HW_CAP_DIRTY_TRACKING`` of ``IOMMU_GET_HW_INFO`` ``out_capabilities``
#: (Linux >= 6.7); 0 in a build without the iommufd uapi, which has no devices.
HW_CAP_DIRTY_TRACKING: int = int(getattr(lib, "IOMMU_HW_CAP_DIRTY_TRACKING", 0))


@dataclass(frozen=True)
class HwInfo:
    """What ``IOMMU_GET_HW_INFO`` says about the IOMMU behind a bound device (Linux >= 6.6).

    ``out_data_type`` is an ``IOMMU_HW_INFO_TYPE_*`` and ``out_capabilities``
    the ``IOMMU_HW_CAP_*`` bits (Linux >= 6.7; 0 before).  For Intel VT-d
    (``IOMMU_HW_INFO_TYPE_INTEL_VTD``) ``cap_reg`` and ``ecap_reg`` are the
    unit's Capability and Extended Capability registers (VT-d spec 11.4.2 and
    11.4.3); for any other type they are ``None``.
    """

    out_data_type: int
    out_capabilities: int
    cap_reg: int | None = None
    ecap_reg: int | None = None

    @property
    def vtd(self) -> bool:
        """True for an Intel VT-d unit (``IOMMU_HW_INFO_TYPE_INTEL_VTD``)."""
        return self.out_data_type == int(lib.IOMMU_HW_INFO_TYPE_INTEL_VTD)


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

    def rlimit_mode(self) -> int:
        """How this iommufd charges pinned pages to RLIMIT_MEMLOCK: 0 per user (the
        default, ``user->locked_vm``), 1 per process (``mm->locked_vm``, as type1)."""
        return _option(self.fd, lib.IOMMU_OPTION_RLIMIT_MODE, lib.IOMMU_OPTION_OP_GET, 0)

    def set_rlimit_mode(self, per_process: bool) -> None:
        """Choose the RLIMIT_MEMLOCK accounting of this iommufd (``IOMMU_OPTION_RLIMIT_MODE``).

        The kernel wants CAP_SYS_RESOURCE (EPERM without) and an iommufd that
        holds no object yet (EBUSY otherwise): set it before :meth:`ioas` or
        binding a device (Linux >= 6.2, drivers/iommu/iommufd/ioas.c
        iommufd_option_rlimit_mode).  It applies to this fd only.
        """
        _option(self.fd, lib.IOMMU_OPTION_RLIMIT_MODE, lib.IOMMU_OPTION_OP_SET, 0, 1 if per_process else 0)

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

    def copy_from(self, src: Ioas, src_iova: int, dst_iova: int, size: int, *, read: bool = True,
                  write: bool = True) -> None:  # fmt: skip
        """Map here at ``dst_iova`` (fixed) what ``src`` maps at ``[src_iova, src_iova + size)``
        (``IOMMU_IOAS_COPY``, Linux >= 6.2).

        The source range must be whole mappings of ``src`` (one ``map`` or
        several adjacent ones, else ENOENT).  The copy shares the pages ``src``
        pinned: they are neither pinned nor charged to RLIMIT_MEMLOCK again
        (6.12 drivers/iommu/iommufd/ioas.c iommufd_ioas_copy takes the source
        area's struct iopt_pages), where a second :meth:`map` of the same
        memory would be.  Both IOASes must belong to the same :class:`Iommufd`.
        """
        if src.iommufd is not self.iommufd:
            raise ValueError("IOMMU_IOAS_COPY works within one iommufd: the source IOAS is another fd's")
        flags = lib.IOMMU_IOAS_MAP_FIXED_IOVA
        flags |= lib.IOMMU_IOAS_MAP_READABLE if read else 0
        flags |= lib.IOMMU_IOAS_MAP_WRITEABLE if write else 0
        fd = self.iommufd.fd
        _check(lib.hr_iommufd_ioas_copy(fd, self.id, src.id, flags, src_iova, dst_iova, size), "IOMMU_IOAS_COPY",
               fd=fd, iova=dst_iova, size=size)  # fmt: skip

    def huge_pages(self) -> bool:
        """Whether the kernel may map contiguous pages of this IOAS with larger IOMMU pages
        (``IOMMU_OPTION_HUGE_PAGES``; on by default)."""
        return bool(_option(self.iommufd.fd, lib.IOMMU_OPTION_HUGE_PAGES, lib.IOMMU_OPTION_OP_GET, self.id))

    def set_huge_pages(self, on: bool) -> None:
        """Allow (``True``) or forbid larger IOMMU pages for this IOAS; off, everything is
        mapped PAGE_SIZE by PAGE_SIZE (Linux >= 6.2; turning it off may fail with EINVAL
        while devices are attached, drivers/iommu/iommufd/io_pagetable.c iopt_disable_large_pages)."""
        _option(self.iommufd.fd, lib.IOMMU_OPTION_HUGE_PAGES, lib.IOMMU_OPTION_OP_SET, self.id, 1 if on else 0)

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

    def hw_info(self) -> HwInfo:
        """``IOMMU_GET_HW_INFO`` for this device (Linux >= 6.6): the IOMMU type behind it,
        its generic capabilities and, for Intel VT-d, its capability registers."""
        # 64 bytes, 8-aligned: more than any driver's data this decodes.  The
        # kernel fills min(ours, its) bytes, zeroes the rest of the buffer and
        # writes its own length back (drivers/iommu/iommufd/device.c).
        buf = ffi.new("uint64_t[]", 8)
        length = ffi.new("uint32_t *", 8 * 8)
        kind = ffi.new("uint32_t *")
        caps = ffi.new("uint64_t *")
        fd = self.iommufd.fd
        _check(lib.hr_iommufd_get_hw_info(fd, self.dev_id, buf, length, kind, caps), "IOMMU_GET_HW_INFO",
               fd=fd, path=self.iommufd.path)  # fmt: skip
        out_type, out_caps = int(kind[0]), int(caps[0])
        if out_type == lib.IOMMU_HW_INFO_TYPE_INTEL_VTD and length[0] >= ffi.sizeof("struct iommu_hw_info_vtd"):
            vtd = ffi.cast("struct iommu_hw_info_vtd *", buf)
            return HwInfo(out_type, out_caps, int(vtd.cap_reg), int(vtd.ecap_reg))
        return HwInfo(out_type, out_caps)
