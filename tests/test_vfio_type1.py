"""The VFIO layer against the real kernel (runs inside the testbed, or on a VFIO host).

Pins the type1v2 semantics hostrelay relies on (Linux 6.12 as shipped in the
testbed; the behaviours below date from 3.x–5.12 as noted per test).
"""

from __future__ import annotations

import errno
import mmap
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostrelay.kernel import ioctl as _kernel
from hostrelay.kernel.errors import VfioInvalidArgument, VfioMappingExists, VfioResourceLimit
from hostrelay.kernel.vfio import Container, Group

PAGE = 0x1000
BASE = 0x100000


@pytest.fixture
def buf() -> Iterator[tuple[mmap.mmap, int]]:
    m = mmap.mmap(-1, 64 * PAGE)
    yield m, _kernel.buffer_address(m)
    m.close()


def _dmesg() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.splitlines()


@pytest.mark.vfio(iommu=("intel", "virtio"))
def test_edu_dma_round_trip_then_fault_after_unmap(vfio_iommu: str, edu_bdfs: list[str]) -> None:
    from hostrelay.drivers.edu import Edu

    bdf = edu_bdfs[0]
    m = mmap.mmap(-1, 2 * PAGE)
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(2048))
    m[:2048] = pattern
    with Container() as c:
        group = Group.for_device(bdf)
        c.attach(group)
        edu = Edu(group.device(bdf))
        c.map_dma(BASE, 2 * PAGE, _kernel.buffer_address(m))
        edu.to_device(BASE, 2048)  # the device reads host RAM through the IOMMU...
        edu.from_device(BASE + PAGE, 2048)
        assert m[PAGE : PAGE + 2048] == pattern  # ...and writes it back
        assert c.unmap_dma(BASE, 2 * PAGE) == 2 * PAGE
        before = len(_dmesg())
        m[PAGE : PAGE + 2048] = bytes(2048)
        edu.from_device(BASE + PAGE, 2048)
        assert m[PAGE : PAGE + 2048] == bytes(2048), "device write landed after UNMAP"
        new = _dmesg()[before:]
        expected = "DMAR" if vfio_iommu == "intel" else "page fault from EP"
        assert any(expected in line for line in new), f"no IOMMU fault logged; new dmesg lines: {new}"


@pytest.mark.vfio
def test_iommu_info_reports_pgsizes_ranges_and_avail(container: Container) -> None:
    info = container.iommu_info()
    assert info.granule == PAGE  # x86: 4 KiB is the smallest IOMMU page
    assert info.iova_ranges, "type1 reports IOVA ranges since Linux 5.4"
    assert all(r.start <= r.end for r in info.iova_ranges)
    assert info.dma_avail is not None and info.dma_avail > 0  # DMA_AVAIL cap, Linux >= 5.10
    assert container.check_extension(_kernel.const("VFIO_UNMAP_ALL"))  # Linux >= 5.12


@pytest.mark.vfio
def test_overlapping_map_is_eexist_with_range(container: Container, buf: tuple[mmap.mmap, int]) -> None:
    _, va = buf
    container.map_dma(BASE, 4 * PAGE, va)
    with pytest.raises(VfioMappingExists) as exc:
        container.map_dma(BASE + 2 * PAGE, 4 * PAGE, va)
    assert exc.value.errno == errno.EEXIST
    assert exc.value.operation == "VFIO_IOMMU_MAP_DMA"
    assert (exc.value.iova, exc.value.size) == (BASE + 2 * PAGE, 4 * PAGE)
    assert container.unmap_dma(BASE, 4 * PAGE) == 4 * PAGE


@pytest.mark.vfio
def test_unmap_that_bisects_fails_and_removes_nothing(container: Container, buf: tuple[mmap.mmap, int]) -> None:
    _, va = buf
    container.map_dma(BASE, 4 * PAGE, va)
    container.map_dma(BASE + 8 * PAGE, PAGE, va + 8 * PAGE)
    # Covers the second mapping fully but only the tail of the first.
    with pytest.raises(VfioInvalidArgument):
        container.unmap_dma(BASE + PAGE, 8 * PAGE)
    with pytest.raises(VfioInvalidArgument):
        container.unmap_dma(BASE, 2 * PAGE)
    # Nothing was removed: both mappings are still there in full.
    with pytest.raises(VfioMappingExists):
        container.map_dma(BASE + 8 * PAGE, PAGE, va)
    assert container.unmap_dma(BASE, 16 * PAGE) == 5 * PAGE


@pytest.mark.vfio
def test_unmap_over_holes_returns_bytes_unmapped(container: Container, buf: tuple[mmap.mmap, int]) -> None:
    _, va = buf
    container.map_dma(BASE + PAGE, PAGE, va)
    container.map_dma(BASE + 4 * PAGE, 2 * PAGE, va + 4 * PAGE)
    container.map_dma(BASE + 10 * PAGE, 3 * PAGE, va + 10 * PAGE)
    assert container.unmap_dma(BASE, 32 * PAGE) == 6 * PAGE
    assert container.unmap_dma(BASE, 32 * PAGE) == 0  # nothing left: success with size 0


@pytest.mark.vfio
def test_unmap_all_empties_the_container(container: Container, buf: tuple[mmap.mmap, int]) -> None:
    _, va = buf
    for i in range(5):
        container.map_dma(BASE + i * 0x10000, PAGE * (i + 1), va)
    assert container.unmap_all() == PAGE * (1 + 2 + 3 + 4 + 5)
    assert container.unmap_dma(0, 1 << 40) == 0
    container.map_dma(BASE, PAGE, va)  # the space is free again
    assert container.unmap_all() == PAGE


@pytest.mark.vfio
def test_misaligned_map_fails(container: Container, buf: tuple[mmap.mmap, int]) -> None:
    _, va = buf
    for iova, size, vaddr in ((BASE + 0x800, PAGE, va), (BASE, 0x800, va), (BASE, PAGE, va + 0x10), (BASE, 0, va)):
        with pytest.raises(VfioInvalidArgument) as exc:
            container.map_dma(iova, size, vaddr)
        assert exc.value.errno == errno.EINVAL
    assert container.unmap_dma(0, 1 << 40) == 0  # none of them left a mapping


@pytest.mark.vfio
def test_map_outside_reported_iova_ranges_fails(container: Container, buf: tuple[mmap.mmap, int]) -> None:
    _, va = buf
    ranges = sorted(container.iommu_info().iova_ranges, key=lambda r: r.start)
    holes = [(a.end + 1, b.start) for a, b in zip(ranges, ranges[1:]) if b.start > a.end + 1]
    assert holes, f"expected a reserved hole (the MSI window) between the IOVA ranges {ranges}"
    hole_start, _ = holes[0]
    with pytest.raises(VfioInvalidArgument):
        container.map_dma(hole_start, PAGE, va)
    beyond = ranges[-1].end + 1
    if beyond < 1 << 64:
        with pytest.raises(VfioInvalidArgument):
            container.map_dma(beyond, PAGE, va)
    # Just inside the first range works.
    container.map_dma(ranges[0].start + BASE, PAGE, va)
    assert container.unmap_all() == PAGE


@pytest.mark.vfio(kernel_args=("vfio_iommu_type1.dma_entry_limit=8",))
def test_dma_entry_limit_ninth_map_fails_and_avail_reads_back(container: Container, buf: tuple[mmap.mmap, int]) -> None:
    param = Path("/sys/module/vfio_iommu_type1/parameters/dma_entry_limit")
    assert param.read_text().strip() == "8", "the testbed did not apply the module parameter"
    _, va = buf
    assert container.iommu_info().dma_avail == 8
    for i in range(8):
        container.map_dma(BASE + 2 * i * PAGE, PAGE, va + i * PAGE)
        assert container.iommu_info().dma_avail == 7 - i
    with pytest.raises(VfioResourceLimit) as exc:
        container.map_dma(BASE + 64 * PAGE, PAGE, va)
    assert exc.value.errno == errno.ENOSPC
    assert "dma_entry_limit" in str(exc.value)
    assert container.iommu_info().dma_avail == 0
    assert container.unmap_dma(BASE, 2 * PAGE) == PAGE
    assert container.iommu_info().dma_avail == 1
    container.map_dma(BASE + 64 * PAGE, PAGE, va)  # room again
    assert container.unmap_all() == 8 * PAGE
    assert container.iommu_info().dma_avail == 8
