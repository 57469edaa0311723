"""A minimal VMM embedding the relay behind its virtio-iommu request queue.

Two sides share memfd guest RAM, as in a real VMM:

- the *driver side* (standing in for the guest's virtio-iommu driver, on its
  own thread) writes ATTACH/MAP/UNMAP requests into the split virtqueue and
  kicks the device through an eventfd, as a guest's MMIO notify write would;
- the *device side* (the VMM's virtio-iommu device thread) waits on the kick
  and calls ``relay.process_queue()``, which walks the ring in C and forwards
  every MAP/UNMAP to the host IOMMU through VFIO.

Run on a VFIO host with an edu device (the testbed has one):

    hostrelay testbed run -- python examples/vmm_virtqueue.py

The edu device then DMAs through the mappings the "guest" made: the copy lands
while mapped and is blocked after UNMAP.  Exit status 0 when all holds.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time

from hostrelay import GuestMemory, Relay
from hostrelay.drivers.edu import DEVICE_ID, VENDOR_ID, Edu
from hostrelay.model.wire import AttachRequest, MapFlag, MapRequest, Status, UnmapRequest
from hostrelay.host.sysfs import find_pci
from hostrelay.host.binding import bind_vfio
from hostrelay.drivers.virtqueue import DriverQueue

ENDPOINT = 0x08  # PCI requester ID of the passed-through function in the guest
RING_GPA, BUF_GPA, IOVA = 0x100000, 0x400000, 0x10000000 - 0x10000  # IOVA below edu's 28-bit DMA mask


def device_thread(relay: Relay, kick: int, stop: threading.Event) -> None:
    """The VMM's virtio-iommu device: one process_queue() per kick."""
    while not stop.is_set():
        ready, _, _ = select.select([kick], [], [], 0.1)
        if ready:
            os.eventfd_read(kick)
            relay.process_queue(0)


def main() -> int:
    found = find_pci(VENDOR_ID, DEVICE_ID)
    if not found:
        print("no edu device here: run inside `hostrelay testbed run`")
        return 2
    bind_vfio(found[0])
    memory = GuestMemory()
    memory.add_region(0, 32 << 20)  # the guest's RAM: a memfd the VMM also maps
    relay = Relay(memory, bypass=False)
    relay.add_vfio_endpoint(ENDPOINT, found[0])

    queue = DriverQueue(memory, RING_GPA, 64)
    relay.set_queue(0, size=queue.size, desc=queue.desc, avail=queue.avail, used=queue.used_ring)
    kick = os.eventfd(0)
    stop = threading.Event()
    dev = threading.Thread(target=device_thread, args=(relay, kick, stop), daemon=True)
    dev.start()

    def request(*reqs: AttachRequest | MapRequest | UnmapRequest) -> list[Status]:
        """Driver side: queue the requests, kick once, wait for them to be used."""
        tails = [queue.add([r.pack()], [4], publish=False) for r in reqs]
        queue.publish(*(h for h, _ in tails))
        os.eventfd_write(kick, 1)
        used = 0
        while used < len(reqs):  # a guest would take the used-buffer interrupt
            used += len(queue.used())
            time.sleep(0.001)
        return [Status(memory.read(outs[0], 1)[0]) for _, outs in tails]

    ok = True
    rw = int(MapFlag.READ | MapFlag.WRITE)
    print("guest: ATTACH + MAP (one kick):", [s.name for s in request(AttachRequest(1, ENDPOINT),
                                                                        MapRequest(1, IOVA, IOVA + 0x1FFF, BUF_GPA, rw))])
    edu = Edu(relay.vfio_device(ENDPOINT))
    memory.write(BUF_GPA, b"hello from guest RAM" + bytes(108))
    edu.to_device(IOVA, 128)
    edu.from_device(IOVA + 0x1000, 128)
    copied = memory.read(BUF_GPA + 0x1000, 20)
    print(f"device: DMA through the mapping copied {copied!r}")
    ok &= copied == b"hello from guest RAM"

    print("guest: UNMAP:", [s.name for s in request(UnmapRequest(1, IOVA, IOVA + 0x1FFF))])
    memory.write(BUF_GPA + 0x1000, bytes(128))
    edu.from_device(IOVA + 0x1000, 128)
    blocked = memory.read(BUF_GPA + 0x1000, 128) == bytes(128)
    print(f"device: DMA after UNMAP {'was blocked by the IOMMU' if blocked else 'LANDED'}")
    ok &= blocked

    stop.set()
    dev.join()
    relay.close()
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
