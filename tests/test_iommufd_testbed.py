"""The iommufd testbed: the kernel built with IOMMUFD boots and offers both VFIO uAPIs.

Runs in the testbed booted with ``--iommufd`` (the kernel of
hostrelay.testbed.build, built on first use).  On a VFIO host it runs
directly and skips unless the host kernel has iommufd.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

pytestmark = pytest.mark.vfio(iommufd=True, edu=2)


def _char_device(path: Path) -> bool:
    return path.exists() and stat.S_ISCHR(path.stat().st_mode)


def test_dev_iommu_and_a_cdev_per_bound_device(edu_bdfs: list[str]) -> None:
    if not _char_device(Path("/dev/iommu")):
        pytest.skip("this kernel has no iommufd (/dev/iommu); the --iommufd testbed has")
    for bdf in edu_bdfs:
        # Linux >= 6.6 (VFIO_DEVICE_CDEV): a vfio-pci device gets
        # /sys/bus/pci/devices/<bdf>/vfio-dev/vfioN and /dev/vfio/devices/vfioN.
        names = os.listdir(f"/sys/bus/pci/devices/{bdf}/vfio-dev")
        assert len(names) == 1 and names[0].startswith("vfio"), names
        assert _char_device(Path("/dev/vfio/devices") / names[0])
    fd = os.open("/dev/iommu", os.O_RDWR)
    os.close(fd)


def test_the_legacy_container_stays_beside_iommufd(edu_bdfs: list[str]) -> None:
    # IOMMUFD_VFIO_CONTAINER=n: /dev/vfio/vfio is still type1's own container,
    # so every type1 test can run in this boot too.
    from hostrelay.kernel.vfio import Container, Group, group_of

    with Container() as c:
        c.attach(Group(group_of(edu_bdfs[0])))
        assert c.iommu_info().iova_pgsizes & 0x1000


PAGE = 0x1000
BASE = 0x100000


def _need_iommufd() -> None:
    from hostrelay.kernel import iommufd

    if not iommufd.AVAILABLE:
        pytest.fail("this build of hostrelay has no iommufd wrappers: cext/uapi.py found no iommufd headers")
    if not _char_device(Path("/dev/iommu")):
        pytest.skip("this kernel has no iommufd (/dev/iommu); the --iommufd testbed has")


def test_one_ioas_two_devices_shared_page_table_dma_then_blocked(edu_bdfs: list[str]) -> None:
    import mmap

    from hostrelay.drivers.edu import Edu
    from hostrelay.kernel.ioctl import buffer_address
    from hostrelay.kernel.iommufd import Iommufd, IommufdDevice

    _need_iommufd()
    m = mmap.mmap(-1, 2 * PAGE)
    pattern = bytes((i * 5 + 1) & 0xFF for i in range(2048))
    m[:2048] = pattern
    with Iommufd() as fd:
        ioas = fd.ioas()
        devs = [IommufdDevice(bdf, fd) for bdf in edu_bdfs[:2]]
        try:
            pts = [d.attach(ioas.id) for d in devs]
            # intel-iommu: both devices share one hardware page table (the kernel's choice).
            assert pts[0] == pts[1], pts
            ranges, align = ioas.iova_ranges()
            assert align <= PAGE and any(r.contains(BASE, 2 * PAGE) for r in ranges)
            assert not any(r.contains(0xFEE00000, PAGE) for r in ranges), "the MSI window is a hole"
            ioas.map(BASE, 2 * PAGE, buffer_address(m))
            for d in devs:
                edu = Edu(d)
                m[PAGE : PAGE + 2048] = bytes(2048)
                edu.to_device(BASE, 2048)
                edu.from_device(BASE + PAGE, 2048)
                assert m[PAGE : PAGE + 2048] == pattern, f"{d.name}: DMA through the IOAS"
            assert ioas.unmap(BASE, 2 * PAGE) == 2 * PAGE
            m[PAGE : PAGE + 2048] = bytes(2048)
            Edu(devs[0]).from_device(BASE + PAGE, 2048)
            assert m[PAGE : PAGE + 2048] == bytes(2048), "device write landed after IOMMU_IOAS_UNMAP"
        finally:
            for d in devs:
                d.close()


def test_replace_moves_a_device_between_ioases(edu_bdfs: list[str]) -> None:
    import mmap

    from hostrelay.drivers.edu import Edu
    from hostrelay.kernel.ioctl import buffer_address
    from hostrelay.kernel.iommufd import Iommufd, IommufdDevice

    _need_iommufd()
    old, new = mmap.mmap(-1, 2 * PAGE), mmap.mmap(-1, 2 * PAGE)
    old[:8], new[:8] = b"old  old", b"new  new"
    with Iommufd() as fd:
        a, b = fd.ioas(), fd.ioas()
        a.map(BASE, 2 * PAGE, buffer_address(old))
        b.map(BASE, 2 * PAGE, buffer_address(new))
        dev = IommufdDevice(edu_bdfs[0], fd)
        try:
            edu = Edu(dev)
            dev.attach(a.id)
            dev.attach(b.id)  # attached already: a replace (Linux >= 6.9), no detach in between
            edu.to_device(BASE, 8)  # reads page 0 of the IOAS it is in now...
            edu.from_device(BASE + PAGE, 8)  # ...and writes page 1
            assert new[PAGE : PAGE + 8] == b"new  new" and old[PAGE : PAGE + 8] == bytes(8)
            dev.detach()
            new[PAGE : PAGE + 8] = bytes(8)
            edu.from_device(BASE + PAGE, 8)
            assert new[PAGE : PAGE + 8] == bytes(8) and old[PAGE : PAGE + 8] == bytes(8), "a detached device reaches nothing"
        finally:
            dev.close()
