"""Guest-side helpers of the served-IOMMU tests (tests/test_served_iommu.py, tests/test_served_rebind.py).

Inside a ``--served-iommu`` boot (hostrelay.testbed.served): the topology's
addresses, sysfs and kernel-log access, the server's log as the guest sees it
(``$HOSTRELAY_TESTBED_XFER/served.log``, written live by ``hostrelay serve``
on the host), the edu through sysfs or through a guest VFIO container, and
scenario 1 (a DMA round trip through a guest mapping, then the blocked DMA
after the unmap and the fault the guest's driver logs).
"""

from __future__ import annotations

import mmap
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hostrelay.frontends.vfio_user import endpoint_id_of

BDF = "0000:00:15.0"  # hostrelay.testbed.served: the first served edu
IOMMU_BDF = "0000:00:14.0"  # and the vhost-user virtio-iommu
EP = endpoint_id_of(BDF)
PAGE = 0x1000
BASE = 0x100000  # IOVAs below the edu's 28-bit DMA mask
# Linux 6.12 drivers/iommu/virtio-iommu.c viommu_fault_handler: dev_err_ratelimited(viommu->dev,
# "%s fault from EP %u at %#llx [%s%s%s]\n", reason ("page" for MAPPING), endpoint, address, R/W/X).
FAULT_RE = r"virtio_iommu virtio\d+: page fault from EP {ep} at {addr:#x} \[{rw}\]"


def sysfs(path: str) -> Path:
    """``/sys/<path>``."""
    return Path("/sys") / path


def dmesg() -> str:
    """The guest kernel's log."""
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout


def served_log_path() -> Path:
    """The server's log, as the guest sees it (the xfer share; the server appends to it live)."""
    return Path(os.environ.get("HOSTRELAY_TESTBED_XFER", "")) / "served.log"


def served_log_full() -> str:
    """All of the server's log so far ("" if there is none: not a served boot)."""
    try:
        return served_log_path().read_text(errors="replace")
    except OSError:
        return ""


def served_log() -> str:
    """The end of the server's log (for failure messages)."""
    return served_log_full()[-3000:] or "(no served.log)"


def group_of(bdf: str) -> str:
    """The IOMMU group number of ``bdf`` (the group must exist)."""
    return (sysfs(f"bus/pci/devices/{bdf}") / "iommu_group").resolve().name


def bind_edu(bdf: str = BDF) -> str:
    """The served edu on vfio-pci: its IOMMU group's number (the group appears once a driver binds)."""
    from hostrelay.host.binding import bind_vfio
    from hostrelay.host.udev import wait_for_vfio_node

    if not sysfs(f"bus/pci/devices/{bdf}/driver").exists():
        bind_vfio(bdf)
    group = group_of(bdf)
    wait_for_vfio_node(int(group))
    return group


class SysfsEdu:
    """What hostrelay.drivers.edu.Edu needs of a device, through sysfs (BAR0 mmap, config file): no VFIO.

    For DMA in the guest's own default domain (bound to vfio-pci but not
    opened, the device stays in the domain the kernel gave its group).
    """

    name = "edu via sysfs"

    def __init__(self, bdf: str) -> None:
        self.root = sysfs(f"bus/pci/devices/{bdf}")
        fd = os.open(self.root / "resource0", os.O_RDWR | os.O_SYNC)
        try:
            self.bar = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def read32(self, region: int, offset: int) -> int:
        """A BAR0 register."""
        assert region == 0
        return int.from_bytes(self.bar[offset:offset + 4], "little")

    def read64(self, region: int, offset: int) -> int:
        """Two BAR0 registers, low first."""
        return self.read32(region, offset) | self.read32(region, offset + 4) << 32

    def write64(self, region: int, offset: int, value: int) -> None:
        """Two BAR0 registers, low first (the edu takes 32-bit accesses)."""
        assert region == 0
        self.bar[offset:offset + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")
        self.bar[offset + 4:offset + 8] = (value >> 32).to_bytes(4, "little")

    def enable_bus_master(self) -> None:
        """Memory space and bus master in the command register."""
        with open(self.root / "config", "r+b", buffering=0) as f:
            f.seek(4)
            cmd = int.from_bytes(f.read(2), "little")
            f.seek(4)
            f.write((cmd | 0x6).to_bytes(2, "little"))  # memory space + bus master


def low_page(limit: int = 1 << 28) -> tuple[mmap.mmap, int, int]:
    """A user page whose guest-physical address is below ``limit`` (the edu's DMA mask): (map, offset, GPA).

    Anonymous memory is populated in chunks until /proc/self/pagemap (PFNs
    need root) shows such a page; the chunks not used are unmapped.
    """
    from hostrelay.kernel import ioctl as _kernel

    chunk = 32 << 20
    with open("/proc/self/pagemap", "rb") as pm:
        for _ in range(48):
            m = mmap.mmap(-1, chunk, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
            base = _kernel.buffer_address(m)
            pm.seek(base // PAGE * 8)
            entries = pm.read(chunk // PAGE * 8)
            for i in range(chunk // PAGE):
                e = int.from_bytes(entries[i * 8:i * 8 + 8], "little")
                if e >> 63 and (e & ((1 << 55) - 1)) * PAGE < limit:
                    return m, i * PAGE, (e & ((1 << 55) - 1)) * PAGE
            # keep it mapped: a new chunk must not get these pages back
    raise AssertionError("no page below the edu's DMA mask in 1.5 GiB of anonymous memory")


def container(bdf: str = BDF) -> Iterator[tuple[Any, Any, mmap.mmap]]:
    """Once: a guest VFIO type1 container with ``bdf``'s group, the edu on it, a 2-page buffer."""
    from hostrelay.drivers.edu import Edu
    from hostrelay.kernel.vfio import Container, Group

    m = mmap.mmap(-1, 2 * PAGE)
    with Container() as c:
        group = Group.for_device(bdf)
        c.attach(group)
        yield c, Edu(group.device(bdf)), m


def wait_for_log(pattern: str, since: int = 0, timeout: float = 5.0) -> str:
    """The kernel log after offset ``since`` once ``pattern`` is in it (or at ``timeout``, without it)."""
    deadline = time.monotonic() + timeout
    while True:
        log = dmesg()[since:]
        if re.search(pattern, log) or time.monotonic() > deadline:
            return log
        time.sleep(0.1)


def scenario_1(bdf: str = BDF, ep: int = EP) -> None:
    """Map, DMA round trip, unmap, the blocked DMA and the guest's fault log; asserts each step.

    Through guest VFIO (type1 over the virtio-iommu driver): a 2-page
    mapping at :data:`BASE`, RAM → device → RAM through it; after the unmap
    the device's write does not land and its read and write are faults the
    guest's driver logs (our event queue delivered them).
    """
    from hostrelay.kernel import ioctl as _kernel

    before = len(dmesg())
    for c, edu, m in container(bdf):
        pattern = os.urandom(2048)
        m[:2048] = pattern
        c.map_dma(BASE, 2 * PAGE, _kernel.buffer_address(m))
        edu.to_device(BASE, 2048)  # RAM -> device through the guest's mapping
        edu.from_device(BASE + PAGE, 2048)  # device -> RAM
        assert m[PAGE:PAGE + 2048] == pattern, "the round trip through the mapping did not bring the pattern back"
        assert c.unmap_dma(BASE, 2 * PAGE) == 2 * PAGE
        m[PAGE:PAGE + 2048] = bytes(2048)
        edu.from_device(BASE + PAGE, 2048)  # the same DMA, now through an unmapped IOVA
        assert m[PAGE:PAGE + 2048] == bytes(2048), "a device write landed after the guest unmapped"
        m[:2048] = b"\xee" * 2048
        edu.to_device(BASE, 64)  # and a read of it
    # The event queue's interrupt and the printk come a little later.
    log = wait_for_log(FAULT_RE.format(ep=ep, addr=BASE, rw="R"), before)
    assert re.search(FAULT_RE.format(ep=ep, addr=BASE + PAGE, rw="W"), log), f"{log}\n--- served.log ---\n{served_log()}"
    assert re.search(FAULT_RE.format(ep=ep, addr=BASE, rw="R"), log), log
