"""DMA round trip through a VFIO container with QEMU's edu device.

Run on a VFIO host with an edu device (the testbed has one):

    hostrelay testbed run -- python examples/dma_roundtrip.py

Maps a host buffer at an IOVA, has the device copy RAM → device → RAM, checks
the bytes, unmaps, repeats the device write and checks that it did not land and
that the guest kernel logged the IOMMU fault.  Exit status 0 when all hold.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

from hostrelay.kernel import ioctl as _kernel
from hostrelay.drivers.edu import DEVICE_ID, VENDOR_ID, Edu
from hostrelay.host.sysfs import find_pci
from hostrelay.host.binding import bind_vfio
from hostrelay.host.udev import wait_for_vfio_node
from hostrelay.kernel.vfio import Container, Group, group_of

IOVA = 0x100000
LENGTH = 2048


def main() -> int:
    devices = find_pci(VENDOR_ID, DEVICE_ID)
    if not devices:
        print("no edu device (1234:11e8) here: run this inside `hostrelay testbed run`")
        return 2
    bdf = devices[0]
    bind_vfio(bdf)
    wait_for_vfio_node(group_of(bdf))
    buf = mmap.mmap(-1, 0x2000)
    pattern = os.urandom(LENGTH)
    buf[:LENGTH] = pattern
    ok = True
    with Container() as container:
        group = Group.for_device(bdf)
        container.attach(group)
        edu = Edu(group.device(bdf))
        info = container.iommu_info()
        print(f"device {bdf} in group {group.id}; IOMMU page sizes {info.iova_pgsizes:#x}, "
              f"{len(info.iova_ranges)} usable IOVA ranges, {info.dma_avail} mappings available")
        container.map_dma(IOVA, 0x2000, _kernel.buffer_address(buf))
        print(f"MAP   IOVA {IOVA:#x}+0x2000 -> host buffer")
        t1 = edu.to_device(IOVA, LENGTH)
        t2 = edu.from_device(IOVA + 0x1000, LENGTH)
        landed = buf[0x1000 : 0x1000 + LENGTH] == pattern
        print(f"DMA   RAM->device ({t1 * 1000:.0f} ms), device->RAM ({t2 * 1000:.0f} ms): "
              f"{'data round trip matches' if landed else 'MISMATCH'}")
        ok &= landed
        unmapped = container.unmap_dma(IOVA, 0x2000)
        print(f"UNMAP IOVA {IOVA:#x}+0x2000 -> kernel unmapped {unmapped:#x} bytes")
        ok &= unmapped == 0x2000
        buf[0x1000 : 0x1000 + LENGTH] = bytes(LENGTH)
        edu.from_device(IOVA + 0x1000, LENGTH)
        blocked = buf[0x1000 : 0x1000 + LENGTH] == bytes(LENGTH)
        print(f"DMA   device->RAM after UNMAP: {'did not land (blocked)' if blocked else 'LANDED (IOMMU did not block it)'}")
        ok &= blocked
    log = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    faults = [line for line in log.splitlines() if "DMAR" in line and "fault" in line.lower() or "page fault from EP" in line]
    print("IOMMU fault in kernel log: " + (faults[-1].strip() if faults else "NONE"))
    ok &= bool(faults)
    print("RESULT: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
