"""Guest half of tests/test_vfio_user_qemu.py: drive the vfio-user edu with the unchanged driver.

Runs inside the testbed (QEMU 11.1, ``-device vfio-user-pci`` connected to the
host's EduServer): binds the only 1234:11e8 function to vfio-pci as the
testbed's other tests do, maps a buffer through the guest's VFIO type1
container, runs RAM -> device -> RAM with :mod:`hostrelay.drivers.edu`,
unmaps and tries the device write again; prints one JSON line of what it saw.
"""

from __future__ import annotations

import json
import mmap

from hostrelay.drivers.edu import DEVICE_ID, VENDOR_ID, Edu
from hostrelay.host.binding import bind_vfio
from hostrelay.host.sysfs import find_pci
from hostrelay.host.udev import wait_for_vfio_node
from hostrelay.kernel import ioctl as _kernel
from hostrelay.kernel.vfio import Container, Group, group_of

PAGE = 0x1000
BASE = 0x100000


def main() -> None:
    found = find_pci(VENDOR_ID, DEVICE_ID)
    bdf = found[0]
    bind_vfio(bdf)
    wait_for_vfio_node(group_of(bdf))
    m = mmap.mmap(-1, 2 * PAGE)
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(2048))
    m[:2048] = pattern
    with Container() as c:
        group = Group.for_device(bdf)
        c.attach(group)
        dev = group.device(bdf)
        ident = dev.read32(0, 0)
        edu = Edu(dev)
        c.map_dma(BASE, 2 * PAGE, _kernel.buffer_address(m))
        edu.to_device(BASE, 2048)
        edu.from_device(BASE + PAGE, 2048)
        round_trip = m[PAGE:PAGE + 2048] == pattern
        unmapped = c.unmap_dma(BASE, 2 * PAGE)
        m[PAGE:PAGE + 2048] = bytes(2048)
        edu.from_device(BASE + PAGE, 2048)
        after_unmap_untouched = m[PAGE:PAGE + 2048] == bytes(2048)
    print("RESULT " + json.dumps({"found": found, "id": ident, "round_trip": round_trip, "unmapped": unmapped,
                                  "after_unmap_untouched": after_unmap_untouched}))  # fmt: skip


if __name__ == "__main__":
    main()
