"""Benchmark (guest side): VFIO MAP+UNMAP cycles per second through the guest's virtio-iommu.

Not a test (pytest does not collect ``bench_*.py``).  Runs inside the
testbed, on whichever virtio-iommu the boot has: QEMU's built-in
``virtio-iommu-pci`` (``hostrelay testbed run --qemu newer --iommu virtio
-- python tests/bench_viommu.py``) or hostrelay itself over vhost-user
(``--served-iommu --served-edu 1``); tests/bench_viommu_sbs.py alternates the
two and compares.

One edu is bound to vfio-pci and its group put in a type1 container.  A
cycle is ``VFIO_IOMMU_MAP_DMA`` + ``VFIO_IOMMU_UNMAP_DMA`` of one 4 KiB buffer
at one IOVA, issued from guest userspace by a C loop
(``hr_vfio_bench_map_unmap``, no Python between ioctls).  In the guest
kernel (Linux 6.12 drivers/iommu/virtio-iommu.c) each MAP_DMA pins the page
and sends one VIRTIO_IOMMU_T_MAP request; each UNMAP_DMA sends one
VIRTIO_IOMMU_T_UNMAP; the driver kicks the request queue and spins on the
used ring until the device answers (``viommu_sync_req``: the request queue
has no callback, so no interrupt is involved).  A cycle therefore costs the
guest's own VFIO work (pinning, accounting, the type1 tree) plus two
round trips of the device's request path -- the part that differs between
the two configurations.  A cycle does no DMA, so what the endpoint is
(QEMU's own ``edu`` with the built-in device, the vfio-user edu with the
served one) does not enter the timed figure.

The cycles are real: each round is framed by two checked cycles, the first
and the last, whose mapping an edu DMA uses (RAM -> device -> RAM through the
IOVA, the pattern comes back), and whose unmapping a second DMA proves
(the device's write no longer lands).

Clock: ``time.perf_counter`` in the guest (CLOCK_MONOTONIC).  Under TCG
without ``-icount`` the guest's clock sources (TSC, HPET, ACPI PM) are
driven by QEMU_CLOCK_VIRTUAL, which then follows the host's monotonic clock,
so guest seconds are host wall-clock seconds.  The host side checks this
anyway: each round prints a ``MARK`` line when it starts and ends, and the
driver stamps their arrival with its own clock (tests/bench_viommu_sbs.py).

The last line is ``RESULT {json}`` for the driver.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import time
from pathlib import Path

from hostrelay.drivers.edu import DEVICE_ID, VENDOR_ID, Edu
from hostrelay.host.binding import bind_vfio
from hostrelay.host.sysfs import find_pci
from hostrelay.host.udev import wait_for_vfio_node
from hostrelay.kernel import ioctl as _kernel
from hostrelay.kernel.vfio import Container, Group, group_of

PAGE = 0x1000
IOVA = 0x100000  # below edu's 28-bit DMA mask
HALF = 2048  # edu's largest safe transfer (hostrelay.drivers.edu.MAX_TRANSFER)


def mark(text: str) -> None:
    """A line the host stamps on arrival (flushed at once: stdout is a file on 9p)."""
    print(f"MARK {text}", flush=True)


def iommu_of(bdf: str) -> str:
    """Which IOMMU translates ``bdf``: the virtio device behind /sys/bus/pci/devices/BDF/iommu."""
    link = Path("/sys/bus/pci/devices") / bdf / "iommu"
    try:
        target = link.resolve(strict=True)
    except OSError:
        return "none"
    # virtio-iommu registers its iommu device under the virtio device, which
    # sits under the PCI function of the transport (Linux 6.12
    # iommu_device_sysfs_add): .../0000:00:01.0/virtio0/iommu/...
    return str(target).removeprefix("/sys/devices/")


class Checked:
    """One edu behind a container, and the cycle whose mapping a DMA proves."""

    def __init__(self, bdf: str) -> None:
        self.buf = mmap.mmap(-1, PAGE)
        self.va = _kernel.buffer_address(self.buf)
        self.container = Container()
        self.group = Group.for_device(bdf)
        self.container.attach(self.group)
        self.edu = Edu(self.group.device(bdf))
        self.checks = 0

    def cycle(self, seed: int) -> None:
        """MAP, DMA RAM -> device -> RAM through it, UNMAP, DMA again: raise unless all as expected."""
        pattern = bytes((i * 13 + seed) & 0xFF for i in range(HALF))
        self.buf[:HALF] = pattern
        self.buf[HALF:] = bytes(HALF)
        self.container.map_dma(IOVA, PAGE, self.va)
        self.edu.to_device(IOVA, HALF)
        self.edu.from_device(IOVA + HALF, HALF)
        if self.buf[HALF:] != pattern:
            raise RuntimeError(f"check {self.checks}: the edu's DMA through the mapping did not round-trip")
        if (n := self.container.unmap_dma(IOVA, PAGE)) != PAGE:
            raise RuntimeError(f"check {self.checks}: UNMAP_DMA unmapped {n} bytes, not {PAGE}")
        self.buf[HALF:] = bytes(HALF)
        self.edu.from_device(IOVA + HALF, HALF)
        if self.buf[HALF:] != bytes(HALF):
            raise RuntimeError(f"check {self.checks}: the edu's write landed after UNMAP")
        self.checks += 1

    def timed(self, cycles: int) -> float:
        """``cycles`` MAP+UNMAP cycles in the C loop; guest seconds taken."""
        t = time.perf_counter()
        _kernel.bench_map_unmap(self.container.fd, self.va, IOVA, PAGE, cycles)
        return time.perf_counter() - t

    def close(self) -> None:
        self.container.close()
        self.group.close()
        self.buf.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=20000, help="MAP+UNMAP cycles per round")
    ap.add_argument("--repeat", type=int, default=5, help="rounds")
    ap.add_argument("--warmup", type=int, default=2000, help="untimed cycles before the first round")
    args = ap.parse_args()
    found = find_pci(VENDOR_ID, DEVICE_ID)
    if not found:
        print("no edu function: run inside the testbed with an edu", file=sys.stderr)
        return 2
    bdf = found[0]
    bind_vfio(bdf)
    wait_for_vfio_node(group_of(bdf))
    iommu = iommu_of(bdf)
    bench = Checked(bdf)
    try:
        bench.cycle(0)
        bench.timed(args.warmup)
        rates: list[float] = []
        for r in range(args.repeat):
            bench.cycle(2 * r + 1)  # this round's first cycle, DMA-checked
            mark(f"start {r}")
            seconds = bench.timed(args.cycles)
            mark(f"end {r} {args.cycles} {seconds:.6f}")
            bench.cycle(2 * r + 2)  # and its last
            rates.append(args.cycles / seconds)
    finally:
        bench.close()
    med = statistics.median(rates)
    print(f"4 KiB VFIO MAP+UNMAP cycles through the guest's IOMMU "
          f"({iommu}), {args.cycles} cycles x {args.repeat} rounds, guest clock (= host wall clock under TCG)")
    for r, rate in enumerate(rates):
        print(f"  round {r}: {rate:9.0f} cycles/s  {1e6 / rate:7.2f} us/cycle")
    print(f"  best {max(rates):.0f}  median {med:.0f} cycles/s  ({1e6 / med:.2f} us/cycle); "
          f"{bench.checks} DMA-checked cycles passed")
    print("RESULT " + json.dumps({"bdf": bdf, "iommu": iommu, "cycles": args.cycles, "rates": rates,
                                  "checks": bench.checks}), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
