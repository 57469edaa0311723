"""Bypass: an endpoint in bypass reaches guest RAM at IOVA = GPA.

virtio-iommu lets endpoints bypass translation: while unattached with the
config ``bypass`` field set, or attached to a domain created with
ATTACH_F_BYPASS.  For a passed-through device the relay makes that real by
identity-mapping guest RAM in the device's VFIO container, and removes the
map when the endpoint leaves bypass.

    hostrelay testbed run -- python examples/bypass.py
"""

from __future__ import annotations

import sys

from hostrelay import GuestMemory, Relay
from hostrelay.drivers.edu import DEVICE_ID, VENDOR_ID, Edu
from hostrelay.model.wire import AttachFlag, AttachRequest, DetachRequest
from hostrelay.host.sysfs import find_pci
from hostrelay.host.binding import bind_vfio

ENDPOINT = 0x08
GPA = 0x300000
N = 256


def dma_lands(edu: Edu, memory: GuestMemory) -> bool:
    """Copy GPA -> GPA+4K with the device using IOVA = GPA; True if it landed."""
    memory.write(GPA, bytes(range(N)))
    memory.write(GPA + 0x1000, bytes(N))
    edu.to_device(GPA, N)
    edu.from_device(GPA + 0x1000, N)
    return memory.read(GPA + 0x1000, N) == bytes(range(N))


def main() -> int:
    found = find_pci(VENDOR_ID, DEVICE_ID)
    if not found:
        print("no edu device here: run inside `hostrelay testbed run`")
        return 2
    bind_vfio(found[0])
    with GuestMemory() as memory:
        memory.add_region(0, 16 << 20)
        relay = Relay(memory, bypass=True)  # the config's bypass field, as the guest first sees it
        try:
            edu = Edu(relay.add_vfio_endpoint(ENDPOINT, found[0]))
            steps = []
            steps.append(("unattached, config bypass=1", dma_lands(edu, memory), True))
            relay.write_config(36, b"\x00")  # the driver clears bypass
            steps.append(("unattached, config bypass=0", dma_lands(edu, memory), False))
            relay.handle_request(AttachRequest(5, ENDPOINT, int(AttachFlag.BYPASS)).pack(), 4)
            steps.append(("attached to a bypass domain", dma_lands(edu, memory), True))
            relay.handle_request(DetachRequest(5, ENDPOINT).pack(), 4)
            relay.handle_request(AttachRequest(6, ENDPOINT).pack(), 4)
            steps.append(("attached to a translated domain, nothing mapped", dma_lands(edu, memory), False))
        finally:
            relay.close()
    ok = True
    for what, landed, expected in steps:
        print(f"{what:50} DMA at IOVA=GPA {'lands' if landed else 'is blocked'}")
        ok &= landed == expected
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
