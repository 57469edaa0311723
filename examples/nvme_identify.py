"""Userspace NVMe Identify through relay mappings only.

A guest driver (this script, standing in for one) puts the NVMe admin queues
and a data buffer in guest RAM, maps them with virtio-iommu MAP requests at
IOVAs of its choosing, and runs Identify Controller: the controller DMAs every
byte through the host IOMMU mappings the relay made.

    hostrelay testbed run --nvme 1 -- python examples/nvme_identify.py
"""

from __future__ import annotations

import sys

from hostrelay import GuestMemory, Relay
from hostrelay.drivers.nvme import CLASS_NVME, AdminQueues, Nvme
from hostrelay.model.wire import AttachRequest, MapFlag, MapRequest, Status
from hostrelay.host.sysfs import find_pci
from hostrelay.host.binding import bind_vfio

ENDPOINT = 0x10
PAGE = 0x1000
# IOVA -> GPA: the guest's choice, deliberately not identity.
LAYOUT = {0x100000: 0x40000, 0x101000: 0x41000, 0x200000: 0x80000}  # SQ, CQ, data


def main() -> int:
    found = find_pci(0x1B36, 0x0010, class_prefix=CLASS_NVME >> 8)
    if not found:
        print("no QEMU NVMe controller here: run inside `hostrelay testbed run --nvme 1`")
        return 2
    bind_vfio(found[0])
    with GuestMemory() as memory:
        memory.add_region(0, 16 << 20)
        relay = Relay(memory, bypass=False)
        try:
            device = relay.add_vfio_endpoint(ENDPOINT, found[0])
            rw = int(MapFlag.READ | MapFlag.WRITE)
            statuses = [relay.handle_request(AttachRequest(1, ENDPOINT).pack(), 4)]
            statuses += [relay.handle_request(MapRequest(1, iova, iova + PAGE - 1, gpa, rw).pack(), 4)
                         for iova, gpa in LAYOUT.items()]  # fmt: skip
            print("ATTACH + 3 MAPs:", [Status(s[0]).name for s in statuses])

            def gpa(iova: int) -> int:
                base = iova & ~(PAGE - 1)
                return LAYOUT[base] + iova - base

            nvme = Nvme(device, lambda i, n: memory.read(gpa(i), n), lambda i, d: memory.write(gpa(i), d))
            nvme.enable(AdminQueues(*LAYOUT))
            ident = nvme.identify_controller()
            print(f"Identify: vendor {ident.vid:#06x} model {ident.model!r} serial {ident.serial!r} fw {ident.firmware!r}")
            ok = all(s == bytes(4) for s in statuses) and ident.serial.startswith("hostrelay-nvme")
        finally:
            relay.close()
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
