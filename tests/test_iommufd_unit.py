"""The iommufd kernel seam without a kernel that has it: build, lookups, errors."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from hostrelay.kernel import iommufd
from hostrelay.kernel.errors import VfioError


def test_the_extension_has_the_iommufd_wrappers_where_the_headers_had_them() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cext"))
    from uapi import find

    assert iommufd.AVAILABLE == (find() is not None)


def test_cdev_of_reads_the_vfio_dev_directory(tmp_path: Path) -> None:
    d = tmp_path / "bus" / "pci" / "devices" / "0000:00:03.0" / "vfio-dev" / "vfio2"
    d.mkdir(parents=True)
    assert iommufd.cdev_of("0000:00:03.0", tmp_path) == "vfio2"
    with pytest.raises(VfioError) as info:
        iommufd.cdev_of("0000:00:04.0", tmp_path)
    assert info.value.errno == errno.ENODEV and "vfio-dev" in str(info.value)


def test_opening_a_missing_dev_iommu_is_a_typed_error(tmp_path: Path) -> None:
    if not iommufd.AVAILABLE:
        pytest.skip("this build has no iommufd wrappers (no iommufd headers when it was built)")
    with pytest.raises(VfioError) as info:
        iommufd.Iommufd(tmp_path / "iommu")
    assert info.value.errno == errno.ENOENT and info.value.operation == "open"


def test_unavailable_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iommufd, "AVAILABLE", False)
    with pytest.raises(VfioError) as info:
        iommufd.Iommufd()
    assert info.value.errno == errno.ENOSYS and "cext/uapi.py" in str(info.value)


# --- the test hook reaches the iommufd wrappers (no kernel needed: an injected
# call returns before its ioctl) --------------------------------------------

from hostrelay.kernel import ioctl as k  # noqa: E402

IOMMUFD_OPS = ["IOAS_ALLOC", "IOAS_MAP", "IOAS_UNMAP", "IOAS_COPY", "IOAS_IOVA_RANGES", "IOMMU_DESTROY",
               "DEVICE_BIND", "DEVICE_ATTACH", "DEVICE_DETACH", "GET_HW_INFO", "OPTION"]  # fmt: skip


def test_op_names_the_iommufd_wrappers_in_every_build() -> None:
    for name in IOMMUFD_OPS:
        op = k.Op[name]
        assert op & k.Op.ALL and bin(int(op)).count("1") == 1, name
    bits = [int(op) for op in k.Op if op is not k.Op.ALL]
    assert len(bits) == len(set(bits)) == 27 and sum(bits) == int(k.Op.ALL), "one bit each, ALL is all of them"


def _unopened() -> iommufd.Iommufd:
    """An Iommufd object whose fd no kernel object stands behind (-1: EBADF if an ioctl ran)."""
    if not iommufd.AVAILABLE:
        pytest.skip("this build has no iommufd wrappers (no iommufd headers when it was built)")
    fd = object.__new__(iommufd.Iommufd)
    fd.path, fd.fd = "/dev/iommu", -1
    return fd


def test_an_injected_ioas_map_failure_is_a_typed_error_with_the_range() -> None:
    ioas = iommufd.Ioas(_unopened(), 7)
    with k.counting(), k.inject_failure(k.Op.IOAS_MAP, err=errno.ENOSPC) as inj:
        with pytest.raises(VfioError) as info:
            ioas.map(0x100000, 0x2000, 0x7F0000000000)
    e = info.value
    assert e.errno == errno.ENOSPC and e.operation == "IOMMU_IOAS_MAP", e
    assert e.iova == 0x100000 and e.size == 0x2000 and e.fd == -1, e
    assert inj.fired and inj.fd == -1
    assert {op: n for op, n in k.call_counts().items() if n} == {k.Op.IOAS_MAP: 1}


def test_an_injected_unmap_reports_nothing_unmapped() -> None:
    from hostrelay._native import ffi, lib

    _unopened()
    out = ffi.new("uint64_t *", 0xDEAD)
    with k.inject_failure(k.Op.IOAS_UNMAP, err=errno.EIO) as inj:
        assert lib.hr_iommufd_ioas_unmap(-1, 1, 0x1000, 0x1000, out) == -errno.EIO
    assert inj.fired and out[0] == 0, "a failed unmap must not hand back a byte count"


def test_every_iommufd_wrapper_is_counted_and_can_be_failed() -> None:
    fd = _unopened()
    a, b = iommufd.Ioas(fd, 1), iommufd.Ioas(fd, 2)
    dev = object.__new__(iommufd.IommufdDevice)
    dev.fd, dev.cdev, dev.iommufd, dev.dev_id = -1, "/dev/vfio/devices/vfio0", fd, 3
    calls = {
        k.Op.IOAS_ALLOC: fd.ioas,
        k.Op.IOAS_MAP: lambda: a.map(0x1000, 0x1000, 0x7F0000000000),
        k.Op.IOAS_UNMAP: lambda: a.unmap(0x1000, 0x1000),
        k.Op.IOAS_COPY: lambda: b.copy_from(a, 0x1000, 0x5000, 0x1000),
        k.Op.IOAS_IOVA_RANGES: a.iova_ranges,
        k.Op.IOMMU_DESTROY: a.destroy,
        k.Op.DEVICE_ATTACH: lambda: dev.attach(a.id),
        k.Op.DEVICE_DETACH: dev.detach,
        k.Op.GET_HW_INFO: dev.hw_info,
        k.Op.OPTION: fd.rlimit_mode,
    }
    with k.counting():
        for op, call in calls.items():
            with k.inject_failure(op, err=errno.EFAULT) as inj:
                with pytest.raises(VfioError) as info:
                    call()
            assert inj.fired and info.value.errno == errno.EFAULT, op
        # Unarmed, the same calls reach the kernel, which refuses fd -1.
        with pytest.raises(VfioError) as info:
            a.map(0x1000, 0x1000, 0x7F0000000000)
        assert info.value.errno == errno.EBADF
    counts = k.call_counts()
    assert {op: n for op, n in counts.items() if n} == {**{op: 1 for op in calls}, k.Op.IOAS_MAP: 2}


def test_copy_refuses_an_ioas_of_another_iommufd() -> None:
    a, b = iommufd.Ioas(_unopened(), 1), iommufd.Ioas(_unopened(), 1)
    with pytest.raises(ValueError):
        b.copy_from(a, 0, 0, 0x1000)


def test_an_injected_bind_failure_closes_the_cdev(tmp_path: Path) -> None:
    # A regular file stands in for the cdev: the injected BIND never reaches it.
    fd = _unopened()
    (tmp_path / "bus" / "pci" / "devices" / "0000:00:03.0" / "vfio-dev" / "vfio0").mkdir(parents=True)
    (tmp_path / "cdevs").mkdir()
    (tmp_path / "cdevs" / "vfio0").write_bytes(b"")
    before = len(os.listdir("/proc/self/fd"))
    with k.counting(), k.inject_failure(k.Op.DEVICE_BIND, err=errno.EBUSY) as inj:
        with pytest.raises(VfioError) as info:
            iommufd.IommufdDevice("0000:00:03.0", fd, cdev_root=tmp_path / "cdevs", sysfs_root=tmp_path)
    assert info.value.errno == errno.EBUSY and info.value.operation == "VFIO_DEVICE_BIND_IOMMUFD"
    assert inj.fired and k.call_counts()[k.Op.DEVICE_BIND] == 1
    assert len(os.listdir("/proc/self/fd")) == before, "the cdev fd was closed"
