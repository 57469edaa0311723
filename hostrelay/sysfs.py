"""Minimal PCI sysfs access (injectable root): find functions, bind to vfio-pci.

The full operator tooling (group awareness, restore, udev waits) builds on this.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["PCI_DEVICES", "bind_vfio", "driver_of", "find_pci", "wait_for_vfio_node"]

PCI_DEVICES = Path("bus/pci/devices")


def _read(path: Path) -> str:
    return path.read_text().strip()


def find_pci(vendor: int, device: int | None = None, *, sysfs_root: Path = Path("/sys"),
             class_prefix: int | None = None) -> list[str]:  # fmt: skip
    """Addresses of PCI functions with ``vendor`` (and ``device``), sorted."""
    found = []
    base = sysfs_root / PCI_DEVICES
    for entry in sorted(os.listdir(base)) if base.is_dir() else []:
        dev = base / entry
        if int(_read(dev / "vendor"), 16) != vendor:
            continue
        if device is not None and int(_read(dev / "device"), 16) != device:
            continue
        if class_prefix is not None and int(_read(dev / "class"), 16) >> 8 != class_prefix:
            continue
        found.append(entry)
    return found


def driver_of(bdf: str, *, sysfs_root: Path = Path("/sys")) -> str | None:
    """The name of the driver bound to ``bdf``, or ``None``."""
    link = sysfs_root / PCI_DEVICES / bdf / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def wait_for_vfio_node(group: int, *, dev_root: Path = Path("/dev/vfio"), timeout: float = 10.0) -> Path:
    """Wait until ``/dev/vfio/<group>`` exists (devtmpfs creates it on bind)."""
    node = dev_root / str(group)
    deadline = time.monotonic() + timeout
    while not node.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{node} did not appear within {timeout} s")
        time.sleep(0.01)
    return node


def bind_vfio(bdf: str, *, sysfs_root: Path = Path("/sys")) -> None:
    """Hand ``bdf`` to vfio-pci: driver_override, unbind, drivers_probe.

    driver_override (Linux >= 3.16) binds only this function, unlike new_id,
    which would grab every device with the same IDs.
    """
    dev = sysfs_root / PCI_DEVICES / bdf
    if driver_of(bdf, sysfs_root=sysfs_root) == "vfio-pci":
        return
    (dev / "driver_override").write_text("vfio-pci")
    if (dev / "driver").is_symlink():
        (dev / "driver" / "unbind").write_text(bdf)
    (sysfs_root / "bus/pci/drivers_probe").write_text(bdf)
    if driver_of(bdf, sysfs_root=sysfs_root) != "vfio-pci":
        raise OSError(f"{bdf}: vfio-pci did not bind (is the vfio-pci module loaded?)")
