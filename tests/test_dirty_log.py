"""The migration dirty log against the real kernel (Linux 6.12 testbed, edu devices as DMA engines).

type1: the kernel's log (``VFIO_IOMMU_DIRTY_PAGES``) read through the relay,
writes through mappings the guest then unmaps or detaches, and the kernel's
own answer to "which pages did the device write" on vfio-pci, measured here.
iommufd: reported untracked with the reason the hardware gives, every
writable mapped page reported.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from hostrelay import GuestMemory, Relay
from hostrelay.kernel.ioctl import Op, call_counts, counting, inject_failure
from hostrelay.model.wire import AttachRequest, DetachRequest, MapRequest, Status, UnmapRequest
from ring_transport import use_ring
from test_vfio_relay import EP_A, EP_B, MIB, PAGE, RW, Dma, send

# What Linux 6.12's type1 reports for a vfio-pci device, measured by
# test_type1_log_edu_writes_unmap_detach (kept here so a kernel that
# behaves otherwise fails the test and is noticed): vfio-pci never calls
# vfio_pin_pages, so the container has no pinned-page dirty scope
# (iommu->num_non_pinned_groups > 0) and update_user_bitmap sets every bit of
# every vfio_dma, and re-populates them after each GET_BITMAP.
TYPE1_REPORTS = "every mapped page"
TYPE1_SECOND_CALL = "every mapped page again"


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    """8 MiB of guest RAM in two memfd regions."""
    with GuestMemory() as m:
        m.add_region(0, 4 * MIB)
        m.add_region(4 * MIB, 4 * MIB)
        yield m


def _pages(ranges: list[tuple[int, int]]) -> set[int]:
    return {a + i * PAGE for a, s in ranges for i in range(s // PAGE)}


@pytest.mark.vfio(edu=2)
@pytest.mark.parametrize("door", ["handle_request", "ring"])
def test_type1_log_edu_writes_unmap_detach(memory: GuestMemory, edu_bdfs: list[str], door: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Both doors: ``handle_request``, and the C ring walker handing the deferred domains to Python."""
    if door == "ring":
        use_ring(monkeypatch)
    r = Relay(memory, bypass=False)
    try:
        r.add_vfio_endpoint(EP_A, edu_bdfs[0])
        r.add_vfio_endpoint(EP_B, edu_bdfs[1])
        a, b = Dma(r, EP_A, memory), Dma(r, EP_B, memory)
        assert send(r, AttachRequest(1, EP_A)) == Status.OK
        # Four pages at IOVA 1 MiB -> GPA 2 MiB, and two more apart.
        assert send(r, MapRequest(1, 0x100000, 0x103FFF, 0x200000, RW)) == Status.OK
        assert send(r, MapRequest(1, 0x180000, 0x181FFF, 0x500000, RW)) == Status.OK
        mapped = _pages([(0x200000, 4 * PAGE), (0x500000, 2 * PAGE)])
        status = r.start_dirty_log()
        ga = status.space("type1", r.vfio_backend(EP_A).label)
        assert ga.tracked and ga.pgsize == PAGE, status
        # The edu reads its buffer from the first page (a read dirties
        # nothing), then writes two of the pages.
        a.load(0x100000, 0x200000)
        assert a.lands(0x101000, 0x201000) and a.lands(0x103000, 0x203000)
        first = _pages(r.dirty_pages())
        second = _pages(r.dirty_pages())
        measured = ("exactly the written pages" if first == {0x201000, 0x203000}
                    else "every mapped page" if first == mapped else f"something else: {sorted(first)}")  # fmt: skip
        again = ("every mapped page again" if second == mapped else "empty" if not second
                 else f"something else: {sorted(second)}")  # fmt: skip
        print(f"\nDIRTY-LOG type1 (Linux {__import__('os').uname().release}): first call {measured}; second call {again}")
        assert measured == TYPE1_REPORTS
        assert again == TYPE1_SECOND_CALL

        # A write through a mapping the guest then unmaps is still reported,
        # read with the unmap (UNMAP_DMA with GET_DIRTY_BITMAP), and the
        # UNMAP takes the Python path while the log runs.
        assert a.lands(0x180000, 0x500000)
        with counting():
            assert send(r, UnmapRequest(1, 0x180000, 0x181FFF)) == Status.OK
        counts = call_counts()
        assert counts[Op.UNMAP_DMA_DIRTY] == 1 and counts[Op.UNMAP_DMA] == 0, counts
        assert not a.lands(0x180000, 0x500000), "unmapped: the DMA no longer lands"
        got = _pages(r.dirty_pages())
        assert {0x500000} <= got, "written, then unmapped: still reported"
        assert 0x501000 not in got or TYPE1_REPORTS == "every mapped page", "a page never written"
        assert not {0x500000, 0x501000} & _pages(r.dirty_pages()), "reported once, then gone with its vfio_dma"

        # DETACH during the log: the container leaves the domain, its bitmap read with the unmap.
        assert send(r, AttachRequest(2, EP_B)) == Status.OK
        assert send(r, MapRequest(2, 0x300000, 0x300FFF, 0x600000, RW)) == Status.OK
        b.load(0x300000, 0x600000)
        assert b.lands(0x300000, 0x600000)
        with counting():
            assert send(r, DetachRequest(2, EP_B)) == Status.OK
        assert call_counts()[Op.UNMAP_DMA_DIRTY] == 1
        assert 0x600000 in _pages(r.dirty_pages()), "written, then detached: still reported"

        r.stop_dirty_log()
        # The fast path is back: the C data plane's plain UNMAP_DMA.
        assert send(r, MapRequest(1, 0x190000, 0x190FFF, 0x510000, RW)) == Status.OK
        with counting():
            assert send(r, UnmapRequest(1, 0x190000, 0x190FFF)) == Status.OK
        assert call_counts()[Op.UNMAP_DMA] == 1 and call_counts()[Op.UNMAP_DMA_DIRTY] == 0
        # The relay's tables still equal the kernel: what the kernel unmaps is
        # exactly what the tables hold (domain 1: the four pages; B: nothing).
        assert r.vfio_backend(EP_A).unmap_all() == 4 * PAGE
        assert r.vfio_backend(EP_B).unmap_all() == 0
    finally:
        r.close()


@pytest.mark.vfio(edu=1)
def test_type1_start_refused_is_reported_conservatively(memory: GuestMemory, edu_bdfs: list[str]) -> None:
    r = Relay(memory, bypass=False)
    try:
        r.add_vfio_endpoint(EP_A, edu_bdfs[0])
        assert send(r, AttachRequest(1, EP_A)) == Status.OK
        assert send(r, MapRequest(1, 0x100000, 0x101FFF, 0x200000, RW)) == Status.OK
        with inject_failure(Op.DIRTY_PAGES, err=errno.EIO) as inj:
            status = r.start_dirty_log()
        assert inj.fired
        ga = status.space("type1", r.vfio_backend(EP_A).label)
        assert not ga.tracked and ga.reason is not None and "DIRTY_PAGES" in ga.reason, ga
        assert r.dirty_pages() == [(0x200000, 2 * PAGE)], "untracked: every writable mapped page"
        r.stop_dirty_log()
        assert r.vfio_backend(EP_A).unmap_all() == 2 * PAGE
    finally:
        r.close()


@pytest.mark.vfio(edu=2, iommufd=True)
def test_iommufd_is_untracked_with_the_reason(memory: GuestMemory, edu_bdfs: list[str]) -> None:
    r = Relay(memory, vfio_backend="iommufd", bypass=False)
    try:
        r.add_vfio_endpoint(EP_A, edu_bdfs[0])
        a = Dma(r, EP_A, memory)
        (dev,) = r.iommufd_group(EP_A).devices.values()
        caps = dev.hw_info().out_capabilities
        assert send(r, AttachRequest(1, EP_A)) == Status.OK
        assert send(r, MapRequest(1, 0x100000, 0x102FFF, 0x200000, RW)) == Status.OK
        assert send(r, MapRequest(1, 0x110000, 0x110FFF, 0x300000, 1)) == Status.OK  # read-only
        status = r.start_dirty_log()
        s = status.space("iommufd")
        print(f"\nDIRTY-LOG iommufd: IOMMU_GET_HW_INFO out_capabilities={caps:#x}; reason: {s.reason}")
        assert not s.tracked and s.reason is not None
        # Measured in the testbed (QEMU 7.2's emulated intel-iommu, Linux
        # 6.12): out_capabilities 0, so no HWPT could track dirty pages even
        # if hostrelay allocated one with IOMMU_HWPT_ALLOC_DIRTY_TRACKING.
        assert caps == 0 and "no IOMMU_HW_CAP_DIRTY_TRACKING" in s.reason
        assert r.dirty_pages() == [(0x200000, 3 * PAGE)], "every writable mapped page"
        # MAP during the log (the C path) works and is reported; so is
        # a mapping that is gone by the next call.
        assert send(r, MapRequest(1, 0x120000, 0x120FFF, 0x400000, RW)) == Status.OK
        a.load(0x100000, 0x200000)
        assert a.lands(0x120000, 0x400000)
        assert send(r, UnmapRequest(1, 0x120000, 0x120FFF)) == Status.OK
        assert not a.lands(0x120000, 0x400000)
        assert r.dirty_pages() == [(0x200000, 3 * PAGE), (0x400000, PAGE)]
        assert r.dirty_pages() == [(0x200000, 3 * PAGE)]
        r.stop_dirty_log()
        ioas = r.domain_ioas(1)
        assert ioas is not None and ioas.unmap_all() == 4 * PAGE, "the IOAS holds exactly the table"
    finally:
        r.close()
