"""Typed errors for everything hostrelay asks of the kernel.

Every failed VFIO call raises a :class:`VfioError` (an :class:`OSError`), so
``except OSError`` still works, ``exc.errno`` is the kernel's errno, and the
exception also carries the operation, the file it was done on and the IOVA
range involved.  Subclasses name the cases callers act on; the message adds a
remedy where one is known.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "VfioBusy",
    "VfioError",
    "VfioFault",
    "VfioInvalidArgument",
    "VfioMappingExists",
    "VfioNoDevice",
    "VfioNotVfio",
    "VfioPermissionError",
    "VfioResourceLimit",
    "vfio_error",
]


class VfioError(OSError):
    """A VFIO operation failed.

    Attributes: ``errno``, ``strerror``, ``operation`` (e.g. ``"VFIO_IOMMU_MAP_DMA"``),
    ``path`` (the device node), ``fd``, ``iova`` and ``size`` (the range, when
    the operation had one) and ``hint`` (what to do about it, or ``None``).
    """

    def __init__(
        self,
        err: int,
        operation: str,
        *,
        path: str | None = None,
        fd: int | None = None,
        iova: int | None = None,
        size: int | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(err, os.strerror(err))
        self.operation = operation
        self.path = path
        self.fd = fd
        self.iova = iova
        self.size = size
        self.hint = hint

    def __str__(self) -> str:
        where = self.path or (f"fd {self.fd}" if self.fd is not None else "")
        if self.path and self.fd is not None:
            where = f"{self.path} (fd {self.fd})"
        text = f"{self.operation}"
        if where:
            text += f" on {where}"
        if self.iova is not None:
            end = self.iova + (self.size or 0)
            text += f" for IOVA [{self.iova:#x}, {end:#x})"
            if self.size is not None:
                text += f" ({self.size:#x} bytes)"
        text += f" failed: [Errno {self.errno}] {self.strerror}"
        if self.hint:
            text += f". {self.hint}"
        return text

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild,
            (type(self), self.errno, self.operation, self.path, self.fd, self.iova, self.size, self.hint),
        )


def _rebuild(cls: type[VfioError], err: int, op: str, path: str | None, fd: int | None,
             iova: int | None, size: int | None, hint: str | None) -> VfioError:  # fmt: skip
    return cls(err, op, path=path, fd=fd, iova=iova, size=size, hint=hint)


class VfioMappingExists(VfioError):
    """MAP_DMA overlaps an existing mapping (EEXIST): type1 never merges or replaces."""


class VfioResourceLimit(VfioError):
    """A kernel limit was hit: ``dma_entry_limit`` (ENOSPC) or RLIMIT_MEMLOCK (ENOMEM)."""


class VfioInvalidArgument(VfioError):
    """EINVAL: misaligned or zero size, outside the IOVA ranges, bisecting unmap, wrong state."""


class VfioPermissionError(VfioError, PermissionError):
    """EPERM/EACCES: no access to the node, or no interrupt remapping."""


class VfioBusy(VfioError):
    """EBUSY: the group is open elsewhere, or device fds keep it in its container."""


class VfioNotVfio(VfioError):
    """ENOTTY: the file descriptor is not the VFIO object the ioctl is for."""


class VfioNoDevice(VfioError):
    """ENODEV/ENOENT: no such group or device (not bound to vfio-pci?)."""


class VfioFault(VfioError):
    """EFAULT: the host virtual address range is not mapped (or read-only for a write mapping)."""


_CLASSES: dict[int, type[VfioError]] = {
    _errno.EEXIST: VfioMappingExists,
    _errno.ENOSPC: VfioResourceLimit,
    _errno.ENOMEM: VfioResourceLimit,
    _errno.EINVAL: VfioInvalidArgument,
    _errno.EOVERFLOW: VfioInvalidArgument,
    _errno.EPERM: VfioPermissionError,
    _errno.EACCES: VfioPermissionError,
    _errno.EBUSY: VfioBusy,
    _errno.ENOTTY: VfioNotVfio,
    _errno.ENODEV: VfioNoDevice,
    _errno.ENOENT: VfioNoDevice,
    _errno.EFAULT: VfioFault,
}

# (operation, errno) -> what a person should do.  Kernel behaviour cited per line.
_HINTS: dict[tuple[str, int], str] = {
    ("VFIO_SET_IOMMU", _errno.EPERM): (
        "the IOMMU has no interrupt remapping, so type1 refuses the group (Linux >= 3.x "
        "vfio_iommu_type1_attach_group). Load vfio_iommu_type1 with allow_unsafe_interrupts=1 "
        "(modprobe vfio_iommu_type1 allow_unsafe_interrupts=1) only if you trust the device: "
        "without remapping it can inject arbitrary interrupts (MSI writes) into the host"
    ),
    ("VFIO_GROUP_SET_CONTAINER", _errno.EPERM): (
        "the IOMMU has no interrupt remapping; load vfio_iommu_type1 with allow_unsafe_interrupts=1 "
        "if you accept that the device can inject interrupts into the host"
    ),
    ("VFIO_IOMMU_MAP_DMA", _errno.ENOSPC): (
        "the container has no DMA mapping entries left (vfio_iommu_type1.dma_entry_limit, default 65535)"
    ),
    ("VFIO_IOMMU_MAP_DMA", _errno.ENOMEM): (
        "pinning the pages would exceed RLIMIT_MEMLOCK (type1 charges every container separately); "
        "raise the limit (ulimit -l, LimitMEMLOCK=) or grant CAP_IPC_LOCK"
    ),
    ("VFIO_IOMMU_MAP_DMA", _errno.EEXIST): "the range overlaps an existing mapping; unmap it first",
    ("VFIO_IOMMU_MAP_DMA", _errno.EINVAL): (
        "check that IOVA, size and vaddr are aligned to the smallest IOMMU page size and that the "
        "range lies inside one of the container's usable IOVA ranges"
    ),
    ("VFIO_IOMMU_UNMAP_DMA", _errno.EINVAL): (
        "type1v2 refuses an unmap that bisects a mapping or is not page aligned; nothing was unmapped"
    ),
    ("open", _errno.ENOENT): "no such VFIO node: is the device bound to vfio-pci (hostrelay bind)?",
    ("open", _errno.EBUSY): "a VFIO group can be open only once system wide; another process holds it",
    ("open", _errno.EACCES): "no permission on the VFIO node; see hostrelay udev-rules for group access",
    ("VFIO_GROUP_GET_DEVICE_FD", _errno.EINVAL): "the group must be in a container with an IOMMU set first",
    ("VFIO_GROUP_GET_DEVICE_FD", _errno.ENODEV): "that device is not in this group",
    ("VFIO_GROUP_UNSET_CONTAINER", _errno.EBUSY): "close the group's device fds first",
}


def vfio_error(
    err: int,
    operation: str,
    *,
    path: str | None = None,
    fd: int | None = None,
    iova: int | None = None,
    size: int | None = None,
) -> VfioError:
    """Build the typed error for ``err`` from ``operation`` (the one errno→type table)."""
    cls = _CLASSES.get(err, VfioError)
    hint: str | None
    if err == _errno.ENOTTY:
        hint = "the file descriptor is not a VFIO object of the kind this ioctl needs"
    else:
        hint = _HINTS.get((operation, err))
    return cls(err, operation, path=path, fd=fd, iova=iova, size=size, hint=hint)
