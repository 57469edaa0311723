"""Native tier: the compiled VFIO layer agrees with the kernel ABI, errors are typed."""

from __future__ import annotations

import errno
import os
import pickle
from collections.abc import Iterator

import pytest

from hostrelay.kernel import ioctl as k
from hostrelay.kernel.errors import (
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


# --- the test hook at the kernel seam (hr_vfio_fail_next, hr_vfio_count_calls) ---


@pytest.fixture
def devnull() -> Iterator[int]:
    fd = os.open("/dev/null", os.O_RDWR)
    yield fd
    try:
        os.close(fd)
    except OSError:
        pass  # a test closed it through the seam


def test_injected_failure_replaces_one_call_and_skips_its_ioctl(devnull: int) -> None:
    # /dev/null answers every VFIO ioctl with ENOTTY: any other errno was made up.
    with k.inject_failure(k.Op.GET_API_VERSION, nth=1, err=errno.ENOSPC) as inj:
        with pytest.raises(VfioNotVfio):
            k.get_api_version(devnull)  # call 0: the real ioctl
        assert not inj.fired
        with pytest.raises(VfioResourceLimit) as exc:
            k.get_api_version(devnull)  # call 1: failed without the ioctl
        assert exc.value.errno == errno.ENOSPC and exc.value.operation == "VFIO_GET_API_VERSION"
        assert inj.fired
        with pytest.raises(VfioNotVfio):
            k.get_api_version(devnull)  # once only
    assert inj.fired and inj.fd == devnull


def test_injection_counts_only_the_operations_in_its_mask(devnull: int) -> None:
    with k.inject_failure(k.Op.MAP_DMA | k.Op.UNMAP_DMA, nth=0, err=errno.EBUSY) as inj:
        for _ in range(3):
            with pytest.raises(VfioNotVfio):
                k.check_extension(devnull, 3)
        assert not inj.fired
        with pytest.raises(VfioError) as exc:
            k.unmap_dma(devnull, 0, 0x1000)
        assert exc.value.errno == errno.EBUSY
    assert inj.fired


def test_an_injection_that_never_fired_is_disarmed(devnull: int) -> None:
    with k.inject_failure(k.Op.ALL, nth=5) as inj:
        pass
    assert not inj.fired and inj.fd == -1
    for _ in range(8):
        with pytest.raises(VfioNotVfio):
            k.get_api_version(devnull)


def test_injection_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        with k.inject_failure(k.Op(0)):
            pass
    with pytest.raises(ValueError):
        with k.inject_failure(k.Op.MAP_DMA, nth=-1):
            pass
    with pytest.raises(ValueError):
        with k.inject_failure(k.Op.MAP_DMA, err=0):
            pass
    with k.inject_failure(k.Op.MAP_DMA):
        with pytest.raises(RuntimeError):
            with k.inject_failure(k.Op.UNMAP_DMA):
                pass


def test_call_counts_per_operation_only_while_counting(devnull: int) -> None:
    with k.counting():
        for _ in range(2):
            with pytest.raises(VfioNotVfio):
                k.get_api_version(devnull)
        with pytest.raises(VfioNotVfio):
            k.map_dma(devnull, 0x1000, 0x1000, 0x7F0000000000, 3)
        with k.inject_failure(k.Op.UNMAP_DMA, err=errno.EIO):
            with pytest.raises(VfioError):
                k.unmap_dma(devnull, 0, 0x1000)  # an injected call is a call
    counts = k.call_counts()
    assert {op: n for op, n in counts.items() if n} == {k.Op.GET_API_VERSION: 2, k.Op.MAP_DMA: 1, k.Op.UNMAP_DMA: 1}
    assert k.Op.ALL not in counts and len(counts) == 27, "every wrapper operation, VFIO and iommufd"
    with pytest.raises(VfioNotVfio):
        k.get_api_version(devnull)
    assert k.call_counts() == counts, "nothing is counted outside counting()"


def test_an_injected_close_failure_still_closes_the_fd(devnull: int) -> None:
    with k.inject_failure(k.Op.CLOSE, err=errno.EIO) as inj:
        with pytest.raises(VfioError) as exc:
            k.close(devnull, "/dev/null")
    assert exc.value.errno == errno.EIO and inj.fired
    with pytest.raises(OSError) as gone:
        os.fstat(devnull)
    assert gone.value.errno == errno.EBADF, "the fd was released, as Linux does on a failing close"


def test_the_c_data_plane_ioctls_go_through_the_hook(devnull: int) -> None:
    # A container whose fd is /dev/null: the MAP ioctl itself fails with
    # ENOTTY (DEVERR); an injected ENOSPC is answered NOMEM instead, and
    # neither leaves a mapping or a counter behind.
    from hostrelay import GuestMemory, Relay
    from hostrelay._native import ffi, lib
    from hostrelay.model.wire import AttachRequest, MapRequest, Status

    with GuestMemory() as mem:
        mem.add_region(0, 1 << 20)
        r = Relay(mem)
        r.add_endpoint(1)
        assert r.handle_request(AttachRequest(3, 1).pack(), 4) == bytes(4)
        cont = ffi.new("struct hr_container *", {"fd": devnull, "avail": 1000})
        conts = ffi.new("struct hr_container *[]", [cont])
        assert lib.hr_relay_domain_set_containers(r._dp.c, 3, conts, 1) == 0
        req = MapRequest(3, 0x1000, 0x1FFF, 0, 3).pack()
        assert Status(r.handle_request(req, 4)[0]) == Status.DEVERR
        with k.counting(), k.inject_failure(k.Op.MAP_DMA, err=errno.ENOSPC) as inj:
            assert Status(r.handle_request(req, 4)[0]) == Status.NOMEM
        assert inj.fired and inj.fd == devnull and k.call_counts()[k.Op.MAP_DMA] == 1
        assert r.mapping_count(3) == 0 and cont.entries == 0 and cont.avail == 1000
        assert lib.hr_relay_domain_set_containers(r._dp.c, 3, conts, 0) == 0
