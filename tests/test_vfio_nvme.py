"""An NVMe controller driven through relay mappings only (real kernel, testbed)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hostrelay import GuestMemory, Relay
from hostrelay.model.wire import AttachRequest, MapFlag, MapRequest, Status, UnmapRequest

EP = 0x28
RW = int(MapFlag.READ | MapFlag.WRITE)
PAGE = 0x1000
# IOVA -> GPA, as a guest driver would choose them (deliberately not identity).
SQ, CQ, DATA = 0x100000, 0x101000, 0x110000
GPA = {SQ: 0x40000, CQ: 0x41000, DATA: 0x80000}


@pytest.fixture
def nvme_bdf() -> str:
    from hostrelay.drivers.nvme import CLASS_NVME
    from hostrelay.host.sysfs import find_pci
    from hostrelay.host.binding import bind_vfio
    from hostrelay.host.udev import wait_for_vfio_node
    from hostrelay.kernel.vfio import group_of

    found = find_pci(0x1B36, 0x0010, class_prefix=CLASS_NVME >> 8)
    if not found:
        pytest.skip("no QEMU nvme controller (1b36:0010) here; the testbed has one")
    bind_vfio(found[0])
    wait_for_vfio_node(group_of(found[0]))
    return found[0]


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory() as m:
        m.add_region(0, 16 << 20)
        yield m


def send(r: Relay, req: AttachRequest | MapRequest | UnmapRequest) -> Status:
    return Status(r.handle_request(req.pack(), 4)[0])


@pytest.mark.vfio(edu=0, nvme=1, backend=("type1", "iommufd"))
def test_nvme_identify_through_relay_mappings(nvme_bdf: str, memory: GuestMemory, vfio_backend: str) -> None:
    from hostrelay.drivers.nvme import AdminQueues, Nvme, NvmeError

    r = Relay(memory, bypass=False)
    try:
        device = r.add_vfio_endpoint(EP, nvme_bdf, backend=vfio_backend)
        assert (getattr(device, "cdev", None) is not None) == (vfio_backend == "iommufd")
        assert send(r, AttachRequest(1, EP)) == Status.OK
        for iova, gpa in GPA.items():
            assert send(r, MapRequest(1, iova, iova + PAGE - 1, gpa, RW)) == Status.OK

        def to_gpa(iova: int) -> int:
            base = iova & ~(PAGE - 1)
            return GPA[base] + (iova - base)

        nvme = Nvme(device, lambda iova, n: memory.read(to_gpa(iova), n), lambda iova, d: memory.write(to_gpa(iova), d))
        nvme.enable(AdminQueues(SQ, CQ, DATA))
        ident = nvme.identify_controller()
        assert ident.serial == "hostrelay-nvme0"  # what the testbed gave QEMU
        assert ident.vid == 0x1B36
        # The 4 KiB the controller wrote landed in guest memory at the GPA the MAP named.
        assert memory.read(GPA[DATA] + 4, 15) == b"hostrelay-nvme0"

        # Without the data mapping the controller's write cannot land.
        assert send(r, UnmapRequest(1, DATA, DATA + PAGE - 1)) == Status.OK
        memory.write(GPA[DATA], bytes(PAGE))
        try:
            nvme.identify_controller(timeout=5)
        except NvmeError:
            pass  # QEMU reports the failed DMA as a data transfer error
        assert memory.read(GPA[DATA], PAGE) == bytes(PAGE), "controller DMA landed after UNMAP"
    finally:
        r.close()
