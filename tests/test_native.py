"""Native tier: the compiled VFIO layer agrees with the kernel ABI, errors are typed."""

from __future__ import annotations

import errno
import os
import pickle

import pytest

from hostrelay import _kernel as k
from hostrelay.errors import (
    VfioError,
    VfioInvalidArgument,
    VfioMappingExists,
    VfioNotVfio,
    VfioPermissionError,
    VfioResourceLimit,
    vfio_error,
)

# Known values of the x86_64 ABI (all VFIO ioctls are _IO(';', 100 + n)).
IOCTLS = {
    "VFIO_GET_API_VERSION": 0x3B64,
    "VFIO_CHECK_EXTENSION": 0x3B65,
    "VFIO_SET_IOMMU": 0x3B66,
    "VFIO_GROUP_GET_STATUS": 0x3B67,
    "VFIO_GROUP_SET_CONTAINER": 0x3B68,
    "VFIO_GROUP_UNSET_CONTAINER": 0x3B69,
    "VFIO_GROUP_GET_DEVICE_FD": 0x3B6A,
    "VFIO_DEVICE_GET_INFO": 0x3B6B,
    "VFIO_DEVICE_GET_REGION_INFO": 0x3B6C,
    "VFIO_DEVICE_RESET": 0x3B6F,
    "VFIO_IOMMU_GET_INFO": 0x3B70,
    "VFIO_IOMMU_MAP_DMA": 0x3B71,
    "VFIO_IOMMU_UNMAP_DMA": 0x3B72,
}

SIZES = {
    "struct vfio_iommu_type1_dma_map": 32,
    "struct vfio_iommu_type1_dma_unmap": 24,
    "struct vfio_iommu_type1_info": 24,
    "struct vfio_info_cap_header": 8,
    "struct vfio_group_status": 8,
    "struct vfio_region_info": 32,
    "struct vfio_iova_range": 16,
    "struct vfio_iommu_type1_info_dma_avail": 12,
}

OFFSETS = [
    ("struct vfio_iommu_type1_dma_map", "argsz", 0),
    ("struct vfio_iommu_type1_dma_map", "flags", 4),
    ("struct vfio_iommu_type1_dma_map", "vaddr", 8),
    ("struct vfio_iommu_type1_dma_map", "iova", 16),
    ("struct vfio_iommu_type1_dma_map", "size", 24),
    ("struct vfio_iommu_type1_dma_unmap", "iova", 8),
    ("struct vfio_iommu_type1_dma_unmap", "size", 16),
    ("struct vfio_iommu_type1_info", "iova_pgsizes", 8),
    ("struct vfio_iommu_type1_info", "cap_offset", 16),
    ("struct vfio_info_cap_header", "next", 4),
    ("struct vfio_region_info", "size", 16),
    ("struct vfio_region_info", "offset", 24),
    ("struct vfio_iommu_type1_info_cap_iova_range", "nr_iovas", 8),
    ("struct vfio_iommu_type1_info_cap_iova_range", "iova_ranges", 16),
    ("struct vfio_iommu_type1_info_dma_avail", "avail", 8),
]

CONSTANTS = {
    "VFIO_API_VERSION": 0,
    "VFIO_TYPE1_IOMMU": 1,
    "VFIO_TYPE1v2_IOMMU": 3,
    "VFIO_UNMAP_ALL": 9,
    "VFIO_DMA_MAP_FLAG_READ": 1,
    "VFIO_DMA_MAP_FLAG_WRITE": 2,
    "VFIO_DMA_UNMAP_FLAG_ALL": 2,
    "VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE": 1,
    "VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL": 3,
    "VFIO_PCI_CONFIG_REGION_INDEX": 7,
}


@pytest.mark.parametrize("name,number", sorted(IOCTLS.items()))
def test_ioctl_numbers_match_the_abi(name: str, number: int) -> None:
    assert k.const(name) == number


@pytest.mark.parametrize("name,size", sorted(SIZES.items()))
def test_struct_sizes_match_the_abi(name: str, size: int) -> None:
    assert k.sizeof(name) == size


@pytest.mark.parametrize("struct,field,offset", OFFSETS)
def test_field_offsets_match_the_abi(struct: str, field: str, offset: int) -> None:
    assert k.offsetof(struct, field) == offset


@pytest.mark.parametrize("name,value", sorted(CONSTANTS.items()))
def test_constants_come_from_the_header(name: str, value: int) -> None:
    assert k.const(name) == value


def test_vfio_call_on_non_vfio_fd_is_typed_enotty() -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(VfioNotVfio) as exc:
            k.get_api_version(fd, "/dev/null")
        assert exc.value.errno == errno.ENOTTY
        assert exc.value.operation == "VFIO_GET_API_VERSION"
        assert exc.value.fd == fd and exc.value.path == "/dev/null"
        assert isinstance(exc.value, OSError)
        with pytest.raises(VfioNotVfio) as exc2:
            k.map_dma(fd, 0x100000, 0x1000, 0x7F0000000000, 3, "/dev/null")
        assert (exc2.value.iova, exc2.value.size) == (0x100000, 0x1000)
        assert "IOVA [0x100000, 0x101000)" in str(exc2.value)
        with pytest.raises(VfioNotVfio):
            k.unmap_dma(fd, 0, 0x1000)
        with pytest.raises(VfioNotVfio):
            k.iommu_get_info(fd)
        with pytest.raises(VfioNotVfio):
            k.group_get_device_fd(fd, "0000:00:00.0")
    finally:
        os.close(fd)


def test_closed_fd_keeps_errno_ebadf() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)
    with pytest.raises(VfioError) as exc:
        k.check_extension(fd, 3)
    assert exc.value.errno == errno.EBADF


@pytest.mark.parametrize(
    "err,op,cls,hint_word",
    [
        (errno.EEXIST, "VFIO_IOMMU_MAP_DMA", VfioMappingExists, "overlaps"),
        (errno.ENOSPC, "VFIO_IOMMU_MAP_DMA", VfioResourceLimit, "dma_entry_limit"),
        (errno.ENOMEM, "VFIO_IOMMU_MAP_DMA", VfioResourceLimit, "RLIMIT_MEMLOCK"),
        (errno.EPERM, "VFIO_SET_IOMMU", VfioPermissionError, "allow_unsafe_interrupts=1"),
        (errno.EINVAL, "VFIO_IOMMU_UNMAP_DMA", VfioInvalidArgument, "bisects"),
    ],
)
def test_error_table_types_and_remedies(err: int, op: str, cls: type[VfioError], hint_word: str) -> None:
    exc = vfio_error(err, op, path="/dev/vfio/vfio", fd=5, iova=0x2000, size=0x1000)
    assert type(exc) is cls and exc.errno == err
    assert hint_word in str(exc)
    assert "/dev/vfio/vfio (fd 5)" in str(exc)
    clone = pickle.loads(pickle.dumps(exc))
    assert type(clone) is cls and str(clone) == str(exc) and clone.iova == 0x2000


def test_buffer_address_is_the_buffer() -> None:
    import ctypes

    buf = bytearray(b"hostrelay")
    addr = k.buffer_address(buf)
    assert ctypes.string_at(addr, len(buf)) == b"hostrelay"
