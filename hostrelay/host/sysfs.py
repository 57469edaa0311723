"""The host's PCI/IOMMU view through sysfs, behind one small injectable interface.

Everything that reads or writes ``/sys``, ``/dev``, ``/proc`` or the state
directory goes through a :class:`Host`, so tests can point it at a fake tree
(and a fake kernel, via ``Host.writer``).  Reads are plain file I/O; writes use
``os.open``/``os.write`` so the kernel's errno surfaces on the write itself
(buffered ``open().write()`` reports sysfs errors only at ``close()``).

The module-level helpers at the bottom (:func:`find_pci`, :func:`driver_of`)
are the minimal API of tests and examples.  The conveniences built on higher
modules live with those modules, so this one imports nothing of hostrelay:
:func:`hostrelay.host.binding.bind_vfio` and
:func:`hostrelay.host.udev.wait_for_vfio_node`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_STATE_DIR",
    "Host",
    "PCI_DEVICES",
    "SysfsWrite",
    "bind_vfio",
    "driver_of",
    "find_pci",
    "wait_for_vfio_node",
    "write_file",
]

PCI_DEVICES = Path("bus/pci/devices")
DEFAULT_STATE_DIR = Path("/run/hostrelay")


@dataclass(frozen=True)
class SysfsWrite:
    """One planned sysfs write: ``value`` into ``path`` (what ``--dry-run`` prints)."""

    path: Path
    value: str
    why: str = ""

    def describe(self) -> str:
        """``echo``-style text a person can read or paste."""
        shown = "(clear)" if self.value == "\n" else repr(self.value)
        return f"write {shown} to {self.path}" + (f"  # {self.why}" if self.why else "")


def write_file(path: Path, value: str) -> None:
    """Write ``value`` to a sysfs file with one ``write(2)``; errors carry the path.

    Sysfs store handlers see exactly one write per call; a zero-byte write may
    never reach the handler, which is why clearing ``driver_override`` writes
    ``"\\n"`` (Linux >= 5.19 ``driver_set_override`` treats a leading newline as
    "clear").
    """
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror} (writing {value.strip() or 'newline'!r} to {path})") from exc
    finally:
        os.close(fd)


def _default_writer(path: Path, value: str) -> None:
    # Looked up at call time so tests can substitute a fake kernel for write_file.
    write_file(path, value)


@dataclass
class Host:
    """Where the host's kernel interfaces live (all injectable for tests).

    ``writer`` performs every sysfs write; tests replace it with a fake kernel.
    ``events`` says whether kernel/udev events can be received for this tree
    (only for the real ``/sys``); without events, waits check state directly.
    """

    sys: Path = Path("/sys")
    dev: Path = Path("/dev")
    proc: Path = Path("/proc")
    run: Path = Path("/run")
    boot: Path = Path("/boot")
    state_dir: Path = DEFAULT_STATE_DIR
    writer: Callable[[Path, str], None] = field(default=_default_writer)
    events: bool | None = None

    def __post_init__(self) -> None:
        if self.events is None:
            self.events = self.sys == Path("/sys")

    # -- paths ----------------------------------------------------------
    def pci(self, bdf: str) -> Path:
        """The sysfs directory of PCI function ``bdf``."""
        return self.sys / PCI_DEVICES / bdf

    @property
    def drivers_probe(self) -> Path:
        return self.sys / "bus/pci/drivers_probe"

    @property
    def iommu_groups(self) -> Path:
        return self.sys / "kernel/iommu_groups"

    @property
    def vfio_dir(self) -> Path:
        return self.dev / "vfio"

    # -- reads ----------------------------------------------------------
    @staticmethod
    def read(path: Path, default: str | None = None) -> str:
        """A sysfs attribute, stripped; ``default`` when it does not exist (else raise)."""
        try:
            return path.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            if default is None:
                raise
            return default

    @staticmethod
    def link_name(path: Path) -> str | None:
        """Basename of a symlink's target, or ``None`` when there is no link."""
        try:
            return os.path.basename(os.readlink(path))
        except (FileNotFoundError, NotADirectoryError, OSError):
            return None

    def pci_addresses(self) -> list[str]:
        """Every PCI function address, sorted."""
        base = self.sys / PCI_DEVICES
        return sorted(os.listdir(base)) if base.is_dir() else []

    def driver(self, bdf: str) -> str | None:
        """The driver bound to ``bdf``, or ``None``."""
        return self.link_name(self.pci(bdf) / "driver")

    def driver_override(self, bdf: str) -> str | None:
        """``driver_override`` of ``bdf``; reads back ``(null)`` when unset (Linux >= 3.16)."""
        value = self.read(self.pci(bdf) / "driver_override", "(null)")
        return None if value in ("(null)", "") else value

    def group(self, bdf: str) -> int | None:
        """The IOMMU group number of ``bdf``, or ``None`` (no IOMMU / not translated)."""
        name = self.link_name(self.pci(bdf) / "iommu_group")
        return int(name) if name is not None and name.isdigit() else None

    def group_members(self, group: int) -> list[str]:
        """Addresses in IOMMU group ``group``, sorted."""
        base = self.iommu_groups / str(group) / "devices"
        return sorted(os.listdir(base)) if base.is_dir() else []

    def is_bridge(self, bdf: str) -> bool:
        """True for bridges (config header type != 0, or class 0x0604xx).

        The kernel never counts bridges against group viability (pre-5.19
        ``vfio_dev_viable``; 5.19+ pcieport sets ``driver_managed_dma``), and
        vfio-pci refuses them (``vfio_pci_probe``: header type must be normal).
        """
        try:
            with open(self.pci(bdf) / "config", "rb") as f:
                head = f.read(0x10)
            if len(head) > 0x0E and head[0x0E] & 0x7F != 0:
                return True
        except OSError:
            pass
        cls = self.read(self.pci(bdf) / "class", "0x000000")
        return int(cls, 16) >> 8 == 0x0604

    def vfio_node(self, group: int) -> Path:
        """``/dev/vfio/<group>`` (the node that exists while a vfio driver holds a member)."""
        return self.vfio_dir / str(group)

    # -- iommufd --------------------------------------------------------
    @property
    def iommu_node(self) -> Path:
        """``/dev/iommu``: the iommufd misc device (Linux >= 6.2 with ``CONFIG_IOMMUFD``)."""
        return self.dev / "iommu"

    @property
    def cdev_dir(self) -> Path:
        """``/dev/vfio/devices``, where the VFIO device cdevs live (Linux >= 6.6)."""
        return self.vfio_dir / "devices"

    def vfio_dev_name(self, bdf: str) -> str | None:
        """The name (``vfioN``) of ``bdf``'s VFIO device in sysfs, or ``None``.

        Every device a vfio driver registers appears as
        ``<dev>/vfio-dev/vfioN`` (class ``vfio-dev``, Linux >= 6.1) whether
        or not the kernel has device cdevs; see :meth:`vfio_cdev`.
        """
        base = self.pci(bdf) / "vfio-dev"
        names = sorted(n for n in os.listdir(base) if n.startswith("vfio")) if base.is_dir() else []
        return names[0] if len(names) == 1 else None

    def vfio_cdev(self, bdf: str) -> str | None:
        """The name (``vfioN``) of ``bdf``'s VFIO device cdev, or ``None`` when it has none.

        With ``CONFIG_VFIO_DEVICE_CDEV`` (Linux >= 6.6) the ``vfio-dev``
        device gets a device number (``vfio_init_device_cdev``), so sysfs
        shows its ``dev`` attribute and devtmpfs creates
        ``/dev/vfio/devices/vfioN``; without it the sysfs device has no
        ``dev`` attribute and there is no node.
        """
        name = self.vfio_dev_name(bdf)
        if name is None or not (self.pci(bdf) / "vfio-dev" / name / "dev").exists():
            return None
        return name

    def cdev_node(self, name: str) -> Path:
        """``/dev/vfio/devices/<name>``."""
        return self.cdev_dir / name

    def kernel_release(self) -> str:
        """The running kernel's release (``uname -r``), from the injectable ``/proc``."""
        return self.read(self.proc / "sys/kernel/osrelease", os.uname().release)

    # -- writes ---------------------------------------------------------
    def write(self, op: SysfsWrite) -> None:
        """Perform one planned write through ``writer``."""
        self.writer(op.path, op.value)


# ---------------------------------------------------------------- legacy API
def find_pci(vendor: int, device: int | None = None, *, sysfs_root: Path = Path("/sys"),
             class_prefix: int | None = None) -> list[str]:  # fmt: skip
    """Addresses of PCI functions with ``vendor`` (and ``device``, class prefix), sorted."""
    host = Host(sys=sysfs_root)
    found = []
    for bdf in host.pci_addresses():
        dev = host.pci(bdf)
        if int(host.read(dev / "vendor"), 16) != vendor:
            continue
        if device is not None and int(host.read(dev / "device"), 16) != device:
            continue
        if class_prefix is not None and int(host.read(dev / "class"), 16) >> 8 != class_prefix:
            continue
        found.append(bdf)
    return found


def driver_of(bdf: str, *, sysfs_root: Path = Path("/sys")) -> str | None:
    """The name of the driver bound to ``bdf``, or ``None``."""
    return Host(sys=sysfs_root).driver(bdf)
