"""The one seam to the kernel: every call into the compiled VFIO wrappers.

Nothing else in hostrelay calls ``hostrelay._native.lib.hr_vfio_*``.  Each
function here does one ioctl (or ``close``) and turns a negative return
(``-errno``, preserved by the C side) into the typed :mod:`hostrelay.kernel.errors`
exception.  A stateful fake for unit tests only needs to replace this module's
functions.

Test hook: :func:`inject_failure` makes one chosen wrapper call fail with a
chosen errno without reaching the kernel, and :func:`counting` /
:func:`call_counts` count the calls per :class:`Op`.  Both act in C, under the
Python functions here *and* under the C data plane's own MAP/UNMAP ioctls
(cext/hr_fanout.c), and under the iommufd wrappers of
:mod:`hostrelay.kernel.iommufd` (``Op.IOAS_MAP`` and the others), so a test
can fail any kernel call the relay makes.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hostrelay._native import ffi, lib
from hostrelay.kernel.errors import vfio_error

__all__ = [
    "Injection",
    "Op",
    "buffer_address",
    "call_counts",
    "check_extension",
    "close",
    "const",
    "counting",
    "device_get_info",
    "device_get_region_info",
    "device_reset",
    "dirty_get_bitmap",
    "dirty_start",
    "dirty_stop",
    "get_api_version",
    "group_get_device_fd",
    "group_get_status",
    "group_set_container",
    "group_unset_container",
    "inject_failure",
    "iommu_get_info",
    "map_dma",
    "set_iommu",
    "unmap_dma",
    "unmap_dma_dirty",
]


def const(name: str) -> int:
    """A constant from ``<linux/vfio.h>`` as the compiler saw it (e.g. ``"VFIO_TYPE1v2_IOMMU"``)."""
    value: int = getattr(lib, name)
    return value


def _check(rc: int, op: str, *, path: str | None, fd: int, iova: int | None = None, size: int | None = None) -> int:
    if rc < 0:
        raise vfio_error(-rc, op, path=path, fd=fd, iova=iova, size=size)
    return rc


def get_api_version(fd: int, path: str | None = None) -> int:
    return _check(lib.hr_vfio_get_api_version(fd), "VFIO_GET_API_VERSION", path=path, fd=fd)


def check_extension(fd: int, extension: int, path: str | None = None) -> int:
    return _check(lib.hr_vfio_check_extension(fd, extension), "VFIO_CHECK_EXTENSION", path=path, fd=fd)


def set_iommu(fd: int, iommu_type: int, path: str | None = None) -> None:
    _check(lib.hr_vfio_set_iommu(fd, iommu_type), "VFIO_SET_IOMMU", path=path, fd=fd)


def group_get_status(fd: int, path: str | None = None) -> int:
    flags = ffi.new("uint32_t *")
    _check(lib.hr_vfio_group_get_status(fd, flags), "VFIO_GROUP_GET_STATUS", path=path, fd=fd)
    return int(flags[0])


def group_set_container(group_fd: int, container_fd: int, path: str | None = None) -> None:
    _check(lib.hr_vfio_group_set_container(group_fd, container_fd), "VFIO_GROUP_SET_CONTAINER", path=path, fd=group_fd)


def group_unset_container(group_fd: int, path: str | None = None) -> None:
    _check(lib.hr_vfio_group_unset_container(group_fd), "VFIO_GROUP_UNSET_CONTAINER", path=path, fd=group_fd)


def group_get_device_fd(group_fd: int, name: str, path: str | None = None) -> int:
    return _check(
        lib.hr_vfio_group_get_device_fd(group_fd, name.encode()), "VFIO_GROUP_GET_DEVICE_FD", path=path, fd=group_fd
    )


def device_get_info(fd: int, path: str | None = None) -> tuple[int, int, int]:
    """``(flags, num_regions, num_irqs)``."""
    info = ffi.new("struct vfio_device_info *")
    _check(lib.hr_vfio_device_get_info(fd, info), "VFIO_DEVICE_GET_INFO", path=path, fd=fd)
    return int(info.flags), int(info.num_regions), int(info.num_irqs)


def device_get_region_info(fd: int, index: int, path: str | None = None) -> tuple[int, int, int]:
    """``(flags, size, offset)`` of region ``index``."""
    info = ffi.new("struct vfio_region_info *")
    info.index = index
    _check(lib.hr_vfio_device_get_region_info(fd, info), "VFIO_DEVICE_GET_REGION_INFO", path=path, fd=fd)
    return int(info.flags), int(info.size), int(info.offset)


def device_reset(fd: int, path: str | None = None) -> None:
    _check(lib.hr_vfio_device_reset(fd), "VFIO_DEVICE_RESET", path=path, fd=fd)


def iommu_get_info(
    fd: int, path: str | None = None
) -> tuple[int, int, list[tuple[int, int]] | None, int | None, tuple[int, int] | None]:
    """``(flags, iova_pgsizes, iova_ranges, dma_avail, migration)`` of a container.

    Grows the buffer to the ``argsz`` the kernel asks for (type1 raises argsz
    when the capabilities do not fit and leaves cap_offset 0, Linux >= 5.4) and
    asks again, then walks the chain by each header's ``next`` (an offset from
    the start of the buffer; records are 8-byte padded since Linux 6.6, so never
    step by sizeof).  ``iova_ranges`` (inclusive ends) and ``dma_avail`` are
    ``None`` when the kernel does not report them; so is ``migration``, else
    ``(pgsize_bitmap, max_dirty_bitmap_size)`` of the migration capability
    (type1 reports it since Linux 5.8: the dirty-bitmap page sizes it accepts
    and the largest bitmap in bytes one GET_BITMAP may fill).
    """
    size = int(ffi.sizeof("struct vfio_iommu_type1_info"))
    for _ in range(8):
        buf = ffi.new("char[]", size)
        _check(lib.hr_vfio_iommu_get_info(fd, buf, size), "VFIO_IOMMU_GET_INFO", path=path, fd=fd)
        info = ffi.cast("struct vfio_iommu_type1_info *", buf)
        if info.argsz <= size:
            break
        size = int(info.argsz)
    else:
        raise vfio_error(71, "VFIO_IOMMU_GET_INFO", path=path, fd=fd)  # EPROTO: argsz never settled
    ranges: list[tuple[int, int]] | None = None
    dma_avail: int | None = None
    migration: tuple[int, int] | None = None
    offset = int(info.cap_offset) if info.flags & lib.VFIO_IOMMU_INFO_CAPS else 0
    seen: set[int] = set()
    hdr_size = int(ffi.sizeof("struct vfio_info_cap_header"))
    while offset and offset not in seen and offset + hdr_size <= size:
        seen.add(offset)  # a malformed chain must not loop forever
        hdr = ffi.cast("struct vfio_info_cap_header *", buf + offset)
        if hdr.id == lib.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
            cap = ffi.cast("struct vfio_iommu_type1_info_cap_iova_range *", buf + offset)
            ranges = [(int(cap.iova_ranges[i].start), int(cap.iova_ranges[i].end)) for i in range(cap.nr_iovas)]
        elif hdr.id == lib.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL:
            dma_avail = int(ffi.cast("struct vfio_iommu_type1_info_dma_avail *", buf + offset).avail)
        elif hdr.id == lib.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION:
            mig = ffi.cast("struct vfio_iommu_type1_info_cap_migration *", buf + offset)
            if offset + ffi.sizeof("struct vfio_iommu_type1_info_cap_migration") <= size:
                migration = (int(mig.pgsize_bitmap), int(mig.max_dirty_bitmap_size))
        offset = int(hdr.next)
    return int(info.flags), int(info.iova_pgsizes), ranges, dma_avail, migration


def map_dma(fd: int, iova: int, size: int, vaddr: int, flags: int, path: str | None = None) -> None:
    _check(lib.hr_vfio_map_dma(fd, flags, vaddr, iova, size), "VFIO_IOMMU_MAP_DMA", path=path, fd=fd, iova=iova, size=size)


def unmap_dma(fd: int, iova: int, size: int, flags: int = 0, path: str | None = None) -> int:
    """Unmap and return the number of bytes the kernel actually unmapped."""
    out = ffi.new("uint64_t *")
    _check(
        lib.hr_vfio_unmap_dma(fd, flags, iova, size, out), "VFIO_IOMMU_UNMAP_DMA", path=path, fd=fd, iova=iova, size=size
    )
    return int(out[0])


# --- dirty page logging (type1, Linux >= 5.8) --------------------------------------


def dirty_start(fd: int, path: str | None = None) -> None:
    """``VFIO_IOMMU_DIRTY_PAGES`` with ``_FLAG_START``: the container starts logging."""
    _check(lib.hr_vfio_dirty_pages(fd, lib.VFIO_IOMMU_DIRTY_PAGES_FLAG_START), "VFIO_IOMMU_DIRTY_PAGES(START)",
           path=path, fd=fd)  # fmt: skip


def dirty_stop(fd: int, path: str | None = None) -> None:
    """``VFIO_IOMMU_DIRTY_PAGES`` with ``_FLAG_STOP``: logging ends, the kernel frees its bitmaps."""
    _check(lib.hr_vfio_dirty_pages(fd, lib.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP), "VFIO_IOMMU_DIRTY_PAGES(STOP)",
           path=path, fd=fd)  # fmt: skip


def bitmap_bytes(size: int, pgsize: int) -> int:
    """Bytes of the bitmap for ``size`` bytes at ``pgsize``: whole u64 words.

    The kernel's ``DIRTY_BITMAP_BYTES`` (Linux 6.12 vfio_iommu_type1.c) rounds
    the page count up to a multiple of 64 and ``verify_bitmap_size`` refuses a
    smaller buffer with EINVAL.
    """
    pages = -(-size // pgsize)
    return -(-pages // 64) * 8


def dirty_get_bitmap(fd: int, iova: int, size: int, pgsize: int, path: str | None = None) -> bytes:
    """``_FLAG_GET_BITMAP`` of ``[iova, iova+size)``: bit ``i`` (LSB first) is page ``iova + i*pgsize``.

    type1 (Linux 6.12 ``vfio_iova_dirty_bitmap``) refuses with EINVAL a range
    that starts or ends inside a mapping, a ``pgsize`` other than the
    container's smallest page, or a call while logging is off.
    """
    n = bitmap_bytes(size, pgsize)
    buf = ffi.new("uint64_t[]", max(n // 8, 1))
    _check(lib.hr_vfio_dirty_get_bitmap(fd, iova, size, pgsize, buf, n), "VFIO_IOMMU_DIRTY_PAGES(GET_BITMAP)",
           path=path, fd=fd, iova=iova, size=size)  # fmt: skip
    return bytes(ffi.buffer(buf, n))


def unmap_dma_dirty(fd: int, iova: int, size: int, pgsize: int, path: str | None = None) -> tuple[int, bytes]:
    """``VFIO_IOMMU_UNMAP_DMA`` with ``VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP``: ``(bytes unmapped, bitmap)``.

    The bitmap is read under the same ``iommu->lock`` as the unmap (Linux
    6.12 ``vfio_dma_do_unmap`` calls ``update_user_bitmap`` for each removed
    ``vfio_dma`` before ``vfio_remove_dma``), so nothing dirtied before the
    unmap is lost; bit ``i`` is page ``iova + i*pgsize``.  EINVAL unless
    logging is on and ``pgsize`` is the container's smallest page.
    """
    n = bitmap_bytes(size, pgsize)
    buf = ffi.new("uint64_t[]", max(n // 8, 1))
    out = ffi.new("uint64_t *")
    _check(lib.hr_vfio_unmap_dma_dirty(fd, iova, size, pgsize, buf, n, out), "VFIO_IOMMU_UNMAP_DMA(GET_DIRTY_BITMAP)",
           path=path, fd=fd, iova=iova, size=size)  # fmt: skip
    return int(out[0]), bytes(ffi.buffer(buf, n))


def bench_map_unmap(fd: int, vaddr: int, iova: int, size: int, count: int, spread: int = 1) -> None:
    """The raw C loop of MAP_DMA+UNMAP_DMA pairs that benchmarks compare against.

    Pair ``i`` maps ``size`` bytes at ``iova + (i % spread) * size`` from
    ``vaddr`` plus the same offset, as a guest cycling through buffers would.
    """
    _check(lib.hr_vfio_bench_map_unmap(fd, vaddr, iova, size, count, spread), "bench MAP/UNMAP",
           path=None, fd=fd, iova=iova, size=size)  # fmt: skip


def close(fd: int, path: str | None = None) -> None:
    """``close(2)`` of a VFIO fd.  The fd is released even when this raises
    (Linux frees it before the steps that can fail), so never retry it."""
    _check(lib.hr_vfio_close(fd), "close", path=path, fd=fd)


# --- test hook ------------------------------------------------------------------


class Op(enum.IntFlag):
    """The wrapper operations of cext/hr_vfio.c and cext/iommufd/hr_iommufd.c, as the test hook names them."""

    GET_API_VERSION = lib.HR_VFIO_OP_GET_API_VERSION
    CHECK_EXTENSION = lib.HR_VFIO_OP_CHECK_EXTENSION
    SET_IOMMU = lib.HR_VFIO_OP_SET_IOMMU
    GROUP_GET_STATUS = lib.HR_VFIO_OP_GROUP_GET_STATUS
    GROUP_SET_CONTAINER = lib.HR_VFIO_OP_GROUP_SET_CONTAINER
    GROUP_UNSET_CONTAINER = lib.HR_VFIO_OP_GROUP_UNSET_CONTAINER
    GROUP_GET_DEVICE_FD = lib.HR_VFIO_OP_GROUP_GET_DEVICE_FD
    DEVICE_GET_INFO = lib.HR_VFIO_OP_DEVICE_GET_INFO
    DEVICE_GET_REGION_INFO = lib.HR_VFIO_OP_DEVICE_GET_REGION_INFO
    DEVICE_RESET = lib.HR_VFIO_OP_DEVICE_RESET
    IOMMU_GET_INFO = lib.HR_VFIO_OP_IOMMU_GET_INFO
    MAP_DMA = lib.HR_VFIO_OP_MAP_DMA
    UNMAP_DMA = lib.HR_VFIO_OP_UNMAP_DMA
    CLOSE = lib.HR_VFIO_OP_CLOSE
    # The iommufd wrappers (cext/iommufd/hr_iommufd.c, called by
    # hostrelay.kernel.iommufd): members in every build, with or without them.
    IOAS_ALLOC = lib.HR_VFIO_OP_IOAS_ALLOC
    IOAS_MAP = lib.HR_VFIO_OP_IOAS_MAP
    IOAS_UNMAP = lib.HR_VFIO_OP_IOAS_UNMAP
    IOAS_COPY = lib.HR_VFIO_OP_IOAS_COPY
    IOAS_IOVA_RANGES = lib.HR_VFIO_OP_IOAS_IOVA_RANGES
    IOMMU_DESTROY = lib.HR_VFIO_OP_IOMMU_DESTROY
    DEVICE_BIND = lib.HR_VFIO_OP_DEVICE_BIND
    DEVICE_ATTACH = lib.HR_VFIO_OP_DEVICE_ATTACH
    DEVICE_DETACH = lib.HR_VFIO_OP_DEVICE_DETACH
    GET_HW_INFO = lib.HR_VFIO_OP_GET_HW_INFO
    OPTION = lib.HR_VFIO_OP_OPTION
    # Dirty page logging (type1): START/STOP/GET_BITMAP, and UNMAP_DMA with the bitmap.
    DIRTY_PAGES = lib.HR_VFIO_OP_DIRTY_PAGES
    UNMAP_DMA_DIRTY = lib.HR_VFIO_OP_UNMAP_DMA_DIRTY
    ALL = lib.HR_VFIO_OP_ALL


class Injection:
    """One armed failure (from :func:`inject_failure`); ``fired`` says whether it hit."""

    def __init__(self, op: Op, nth: int, err: int) -> None:
        self.op = op
        self.nth = nth
        self.err = err
        self._done: bool | None = None  # set when the context exits
        self.fd = -1

    @property
    def fired(self) -> bool:
        """True once the chosen call has failed."""
        if self._done is not None:
            return self._done
        return not lib.hr_vfio_fail_pending()

    def __repr__(self) -> str:
        return f"Injection({self.op!r}, nth={self.nth}, err={self.err}, fired={self.fired})"


@contextmanager
def inject_failure(op: Op, nth: int = 0, err: int = errno.EIO) -> Iterator[Injection]:
    """Test hook: inside the ``with``, the ``nth`` next call (0 = the next one)
    among the wrapper operations in ``op`` returns ``-err`` without issuing its
    ioctl, once.

    Reaches the C data plane's MAP/UNMAP ioctls as well as this module's
    functions.  :attr:`Op.CLOSE` still closes the fd (a failing ``close`` on
    Linux has closed it) and only reports ``err``.  After the ``with`` the
    hook is disarmed whether or not it fired; :attr:`Injection.fired` and
    :attr:`Injection.fd` (the fd of the failed call) tell what happened.
    Process-wide and not for concurrent use: one injection at a time.
    """
    if not op or op & ~Op.ALL:
        raise ValueError(f"not a set of wrapper operations: {op!r}")
    if nth < 0 or err <= 0:
        raise ValueError("nth must be >= 0 and err a positive errno")
    if lib.hr_vfio_fail_pending():
        raise RuntimeError("another injection is armed")
    injection = Injection(op, nth, err)
    lib.hr_vfio_fail_next(int(op), nth, err)
    try:
        yield injection
    finally:
        injection._done = not lib.hr_vfio_fail_pending()
        injection.fd = int(lib.hr_vfio_fail_fd()) if injection._done else -1
        lib.hr_vfio_fail_next(0, 0, 0)


@contextmanager
def counting() -> Iterator[None]:
    """Test hook: count every wrapper call made inside the ``with`` (from zero).

    Read the counts with :func:`call_counts`, inside or after the ``with``
    (they stay until the next :func:`counting`).  Outside it nothing is
    counted, so the data plane pays nothing.
    """
    lib.hr_vfio_count_calls(1)
    try:
        yield
    finally:
        lib.hr_vfio_count_calls(0)


def call_counts() -> dict[Op, int]:
    """Test hook: wrapper calls per operation counted by the last :func:`counting`,
    injected failures included; every operation is listed, zero or not."""
    return {op: int(lib.hr_vfio_call_count(int(op))) for op in Op if op is not Op.ALL}


def buffer_address(buf: Any) -> int:
    """Host virtual address of a writable buffer (``mmap``, ``bytearray``)."""
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))


def sizeof(type_name: str) -> int:
    """``sizeof`` a C type as compiled (for layout checks)."""
    return int(ffi.sizeof(type_name))


def offsetof(type_name: str, field: str) -> int:
    """``offsetof`` a field as compiled (for layout checks)."""
    return int(ffi.offsetof(type_name, field))
