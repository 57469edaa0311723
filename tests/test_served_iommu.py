"""A real Linux guest drives hostrelay live: hostrelay is the guest's only IOMMU.

The testbed boots QEMU 11.1 with ``hostrelay serve`` beside it
(``@pytest.mark.vfio(served_iommu=True)``, see hostrelay.testbed.served): the
virtio-iommu over vhost-user at 00:14.0, an emulated edu over vfio-user at
00:15.0 whose every DMA the relay translates, a VIOT naming them.  QEMU has
no IOMMU of its own.  The guest tests below run inside that guest and assert
what the guest itself sees: sysfs groups and reserved regions, its own
buffers' bytes after the device's DMA, its kernel log.  The last test runs
on the host after the boot: the server's recording of that whole live
stream (``--record``), fed through ``Relay.handle_request`` on a fresh
relay, gives every reply again and the same tables.

Scenario 1 of the virtio-iommu proposal, end to end: guest userspace binds
the edu to vfio-pci and, through the guest kernel's VFIO type1 and
virtio-iommu driver (Linux 6.12), maps a buffer; the edu DMAs RAM → device →
RAM through the mapping; after the unmap the same DMA does not land and the
guest's driver logs the fault our event queue delivered.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from served_guest import BASE, BDF, EP, FAULT_RE, IOMMU_BDF, PAGE, SysfsEdu, bind_edu, container, dmesg, low_page
from served_guest import scenario_1, sysfs

SERVED = pytest.mark.vfio(served_iommu=True, served_edu=1)
PASSTHROUGH = pytest.mark.vfio(served_iommu=True, served_edu=1, kernel_args=("iommu.passthrough=1",))
CYCLES = int(os.environ.get("HOSTRELAY_SERVED_CYCLES", "10000"))  # fewer for a quick look
SAMPLE = 100  # a DMA round trip every SAMPLE cycles, and an unmapped-IOVA check every SAMPLE too


@pytest.fixture(scope="module")
def bound() -> str:
    """The served edu on vfio-pci: its IOMMU group's number (the group appears once a driver binds)."""
    return bind_edu(BDF)


# --- the guest's view of the topology ------------------------------------------------------------


@SERVED
def test_the_guest_puts_the_edu_in_a_group_of_hostrelays_virtio_iommu(bound: str) -> None:
    # One IOMMU in the guest, and it is the vhost-user function (virtio 1af4:1057) hostrelay serves.
    assert sorted(p.name for p in sysfs("class/iommu").iterdir()) == [IOMMU_BDF]
    assert sysfs(f"bus/pci/devices/{IOMMU_BDF}/vendor").read_text().strip() == "0x1af4"
    assert sysfs(f"bus/pci/devices/{IOMMU_BDF}/device").read_text().strip() == "0x1057"
    (virtio,) = [p for p in sysfs(f"bus/pci/devices/{IOMMU_BDF}").iterdir() if re.fullmatch(r"virtio\d+", p.name)]
    assert (virtio / "driver").resolve().name == "virtio_iommu"
    # The edu's group is that IOMMU's, and holds the edu alone.
    link = os.readlink(sysfs(f"bus/pci/devices/{BDF}/iommu"))
    assert link.endswith(f"{IOMMU_BDF}/{virtio.name}/iommu/{IOMMU_BDF}"), link
    assert sorted(p.name for p in sysfs(f"kernel/iommu_groups/{bound}/devices").iterdir()) == [BDF]
    assert sysfs(f"bus/pci/devices/{BDF}/vendor").read_text().strip() == "0x1234"  # edu, over vfio-user
    log = dmesg()
    assert re.search(rf"virtio_iommu {virtio.name}: page mask: 0xfffffffffffff000", log), log[-2000:]
    assert re.search(r"ACPI: VIOT 0x[0-9A-F]+ 0+58 \(v00 HRELAY", log), "the VIOT the testbed wrote"
    # Nothing else in the guest is behind an IOMMU (the 9p transports are not in the VIOT).
    others = [p.name for p in sysfs("bus/pci/devices").iterdir() if (p / "iommu_group").exists() and p.name != BDF]
    assert others == [], others


@SERVED
def test_probe_reserved_regions_are_the_relays_msi_window(bound: str) -> None:
    from hostrelay.model.reality import DEFAULT_MSI_WINDOW

    lo, hi = DEFAULT_MSI_WINDOW
    # PROBE's RESV_MEM (subtype MSI) as Linux 6.12 reports it: "start end type" per region.
    text = sysfs(f"kernel/iommu_groups/{bound}/reserved_regions").read_text()
    assert text.splitlines() == [f"{lo:#018x} {hi:#018x} msi"], text


# --- scenario 1 ------------------------------------------------------------------------------------


@SERVED
def test_scenario_1_map_dma_round_trip_unmap_and_the_blocked_dma_is_a_guest_fault(bound: str) -> None:
    scenario_1(BDF, EP)


@SERVED
def test_without_vfio_the_edu_is_in_the_kernels_dma_domain_and_a_dma_to_a_gpa_faults(bound: str) -> None:
    from hostrelay.drivers.edu import Edu

    # Bound to vfio-pci but not opened: the group keeps the kernel's default (translated) domain.
    assert sysfs(f"kernel/iommu_groups/{bound}/type").read_text().strip() in ("DMA", "DMA-FQ")
    m, off, gpa = low_page()
    m[off:off + 64] = b"\x11" * 64
    before = len(dmesg())
    edu = Edu(SysfsEdu(BDF))  # type: ignore[arg-type]  # the Device surface Edu uses
    edu.from_device(gpa, 64)
    assert m[off:off + 64] == b"\x11" * 64, "a DMA at a GPA landed through a translated domain with nothing mapped"
    for _ in range(50):
        if re.search(FAULT_RE.format(ep=EP, addr=gpa, rw="W"), dmesg()[before:]):
            break
        time.sleep(0.1)
    assert re.search(FAULT_RE.format(ep=EP, addr=gpa, rw="W"), dmesg()[before:]), dmesg()[before:]


@PASSTHROUGH
def test_passthrough_boot_dma_at_iova_equal_gpa_lands(bound: str) -> None:
    from hostrelay.drivers.edu import Edu

    assert "iommu.passthrough=1" in Path("/proc/cmdline").read_text()
    # Linux 6.12 with iommu.passthrough=1: the group's default domain is identity (with
    # the device's BYPASS_CONFIG feature, attached as an ATTACH_F_BYPASS domain).
    assert sysfs(f"kernel/iommu_groups/{bound}/type").read_text().strip() == "identity"
    m, off, gpa = low_page()
    pattern = os.urandom(64)
    m[off:off + 64] = pattern
    m[off + 2048:off + 2048 + 64] = bytes(64)
    edu = Edu(SysfsEdu(BDF))  # type: ignore[arg-type]  # the Device surface Edu uses
    edu.to_device(gpa, 64)  # RAM -> device at IOVA = GPA
    edu.from_device(gpa + 2048, 64)  # device -> RAM
    assert m[off + 2048:off + 2048 + 64] == pattern, "in passthrough, the device's DMA at IOVA = GPA did not land"
    assert "page fault from EP" not in dmesg()


# --- many cycles ------------------------------------------------------------------------------------


@SERVED
def test_ten_thousand_guest_map_unmap_cycles_and_no_dma_through_an_unmapped_iova(bound: str) -> None:
    from hostrelay.kernel import ioctl as _kernel

    round_trips = blocked = 0
    start = time.monotonic()
    for c, edu, m in container(BDF):
        va = _kernel.buffer_address(m)
        for i in range(CYCLES):
            iova = BASE + (i % 512) * 2 * PAGE  # 512 IOVA slots, each reused ~20 times
            c.map_dma(iova, 2 * PAGE, va)
            if i % SAMPLE == 0:
                m[:64] = i.to_bytes(4, "little") * 16
                m[PAGE:PAGE + 64] = bytes(64)
                edu.to_device(iova, 64)
                edu.from_device(iova + PAGE, 64)
                assert m[PAGE:PAGE + 64] == m[:64], f"cycle {i}: round trip at {iova:#x}"
                round_trips += 1
            assert c.unmap_dma(iova, 2 * PAGE) == 2 * PAGE, f"cycle {i}"
            if i % SAMPLE == SAMPLE // 2:
                m[PAGE:PAGE + 64] = b"\x99" * 64
                edu.from_device(iova + PAGE, 64)  # the device's buffer holds the last round trip's bytes
                assert m[PAGE:PAGE + 64] == b"\x99" * 64, f"cycle {i}: a DMA landed through unmapped {iova + PAGE:#x}"
                blocked += 1
    wall = time.monotonic() - start
    print(f"FIGURE {CYCLES} map/unmap cycles (2 pages) in {wall:.1f} s guest wall time "
          f"({wall / CYCLES * 1e6:.0f} us a cycle), {round_trips} DMA round trips, {blocked} unmapped-IOVA DMAs blocked")
    assert round_trips == CYCLES // SAMPLE and blocked == CYCLES // SAMPLE


# --- on the host, after the boot: the recorded live stream replays ---------------------------------------


@pytest.mark.skipif(bool(os.environ.get("HOSTRELAY_TESTBED")), reason="reads the boot's recording on the host")
def test_the_recorded_live_stream_replays_to_the_same_replies_and_tables(request: pytest.FixtureRequest) -> None:
    from hostrelay.frontends.record import read_records, replay
    from hostrelay.testbed.served import RECORD_NAME

    runner = request.config.pluginmanager.get_plugin("hostrelay-testbed-runner")
    if runner is None:
        pytest.skip("no testbed runner here (a VFIO host runs the guest tests itself)")
    keys = [k for k, items in runner.groups.items() if k.served_iommu and not k.kernel_args
            and any(i.nodeid.startswith(request.node.nodeid.split("::")[0]) for i in items)]  # fmt: skip
    if not keys:
        pytest.skip("select this module's served guest tests too: the recording is of their boot")
    files = runner.files_for(keys[0])
    lines = files.get(RECORD_NAME, b"").decode().splitlines()
    assert lines, f"the served boot returned no recording; files: {sorted(files)}\n{files.get('served.log', b'').decode()[-3000:]}"
    objs = list(read_records(lines))
    assert objs[0]["endpoints"] == [EP] and objs[-1]["kind"] == "table"
    maps = sum(1 for o in objs if o["kind"] == "request" and o["request"][:2] == "03")  # VIRTIO_IOMMU_T_MAP
    assert maps >= CYCLES, f"{maps} MAP requests recorded"
    result = replay(lines)
    print(f"FIGURE replayed {result.requests} live requests, {result.resets} resets, statuses {result.statuses}")
    assert not result.mismatches, result.mismatches[:5]
    assert not result.table_mismatches, result.table_mismatches[:2]
    assert result.ok and result.replayed_table == result.final_table
