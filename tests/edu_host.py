"""The testbed's edu functions, bound for passthrough: shared by the ``edu_bdfs``
fixture (tests/conftest.py) and the benchmarks run inside the testbed."""

from __future__ import annotations

from hostrelay.drivers.edu import DEVICE_ID, VENDOR_ID
from hostrelay.host.binding import bind_vfio
from hostrelay.host.sysfs import find_pci
from hostrelay.host.udev import wait_for_vfio_node
from hostrelay.kernel.vfio import group_of

__all__ = ["bind_every_edu"]


def bind_every_edu() -> list[str]:
    """Every QEMU edu function (1234:11e8), each bound to vfio-pci with its
    group node present; empty where there is none."""
    found = find_pci(VENDOR_ID, DEVICE_ID)
    for bdf in found:
        bind_vfio(bdf)
        wait_for_vfio_node(group_of(bdf))
    return found
