"""Device discovery: PCI functions, IOMMU groups, what the host is using.

Pure reads over a :class:`~hostrelay.host.sysfs.Host`; nothing here writes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hostrelay.host.sysfs import Host

__all__ = [
    "GroupInfo",
    "OpenBy",
    "PciFunction",
    "VFIO_FRIENDLY_DRIVERS",
    "cdev_path",
    "describe",
    "group_open_by",
    "list_functions",
    "list_groups",
    "normalize_address",
    "open_by",
    "saved_state",
    "usage",
]

# Drivers that leave a group usable by VFIO.  Linux >= 5.19 decides viability
# by DMA ownership: drivers with ``driver_managed_dma`` (vfio-pci and its
# variants, pci-stub, pcieport) do not claim it; driverless devices do not either.
VFIO_FRIENDLY_DRIVERS = frozenset({"vfio-pci", "pci-stub", "pcieport"})

_BDF = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")


def normalize_address(text: str) -> str:
    """``00:03.0`` or ``0000:00:03.0`` → ``0000:00:03.0``; :class:`ValueError` otherwise."""
    m = _BDF.match(text.strip())
    if not m:
        raise ValueError(f"not a PCI address: {text!r} (expected [DDDD:]BB:DD.F)")
    domain = m.group(1) or "0000"
    return f"{domain}:{m.group(2)}:{m.group(3)}.{m.group(4)}".lower()


@dataclass(frozen=True)
class OpenBy:
    """A process holding a device node open."""

    pid: int
    command: str
    path: str


@dataclass
class PciFunction:
    """One PCI function as ``hostrelay devices`` reports it."""

    address: str
    vendor: str
    device: str
    name: str
    class_code: str
    driver: str | None
    driver_override: str | None
    bridge: bool
    iommu_group: int | None
    group_members: list[str]
    vfio_ready: bool
    in_use: list[str] = field(default_factory=list)
    saved_driver: str | None = None
    saved: bool = False
    cdev: str | None = None  # /dev/vfio/devices/vfioN while a vfio driver holds it (Linux >= 6.6 device cdevs)

    def to_json(self) -> dict[str, Any]:
        """Stable keys for ``--json``."""
        return asdict(self)


@dataclass
class GroupInfo:
    """One IOMMU group as ``hostrelay groups`` reports it."""

    group: int
    type: str
    members: list[dict[str, Any]]
    viable: bool
    blockers: list[str]
    reserved_regions: list[dict[str, str]]
    vfio_node: str | None
    open_by: list[OpenBy]

    def to_json(self) -> dict[str, Any]:
        """Stable keys for ``--json``."""
        return asdict(self)


# --------------------------------------------------------------- names (hwdb)
_hwdb_cache: dict[str, str] = {}


def _hwdb_name(modalias: str) -> str:
    """``ID_VENDOR_FROM_DATABASE ID_MODEL_FROM_DATABASE`` from udev's hwdb, or ``""``.

    libudev's hwdb (``udev_hwdb_*``, systemd >= 196) reads ``hwdb.bin``
    directly, so this works without udevd running.  pyudev does not wrap it.
    """
    key = modalias.split("sv", 1)[0]  # vendor/device part: names do not depend on the rest
    if key in _hwdb_cache:
        return _hwdb_cache[key]
    name = ""
    try:
        import ctypes
        import ctypes.util

        lib = ctypes.CDLL(ctypes.util.find_library("udev") or "libudev.so.1")
        lib.udev_new.restype = ctypes.c_void_p
        lib.udev_hwdb_new.restype = ctypes.c_void_p
        lib.udev_hwdb_new.argtypes = [ctypes.c_void_p]
        lib.udev_hwdb_get_properties_list_entry.restype = ctypes.c_void_p
        lib.udev_hwdb_get_properties_list_entry.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint]
        for fn in ("udev_list_entry_get_next",):
            getattr(lib, fn).restype = ctypes.c_void_p
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        for fn in ("udev_list_entry_get_name", "udev_list_entry_get_value"):
            getattr(lib, fn).restype = ctypes.c_char_p
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        lib.udev_hwdb_unref.argtypes = [ctypes.c_void_p]
        lib.udev_unref.argtypes = [ctypes.c_void_p]
        udev = lib.udev_new()
        hwdb = lib.udev_hwdb_new(udev)
        props: dict[str, str] = {}
        if hwdb:
            entry = lib.udev_hwdb_get_properties_list_entry(hwdb, key.encode(), 0)
            while entry:
                props[lib.udev_list_entry_get_name(entry).decode()] = (lib.udev_list_entry_get_value(entry) or b"").decode()
                entry = lib.udev_list_entry_get_next(entry)
            lib.udev_hwdb_unref(hwdb)
        lib.udev_unref(udev)
        vendor = props.get("ID_VENDOR_FROM_DATABASE", "")
        model = props.get("ID_MODEL_FROM_DATABASE", "")
        name = f"{vendor} {model}".strip()
    except (OSError, AttributeError):
        name = ""
    _hwdb_cache[key] = name
    return name


# ------------------------------------------------------------------ in use
def _mounted_devs(host: Host) -> set[str]:
    """``major:minor`` of every mounted block device (``/proc/self/mountinfo`` field 3)."""
    try:
        text = (host.proc / "self" / "mountinfo").read_text()
    except OSError:
        return set()
    return {line.split()[2] for line in text.splitlines() if len(line.split()) > 2}


def _swaps(host: Host) -> set[str]:
    try:
        lines = (host.proc / "swaps").read_text().splitlines()[1:]
    except OSError:
        return set()
    return {os.path.basename(line.split()[0]) for line in lines if line.split()}


def usage(host: Host, bdf: str, mounted: set[str] | None = None) -> list[str]:
    """Why the host is using ``bdf`` (empty list: not in use).

    Walks the function's sysfs subtree and classifies each device by its
    ``subsystem`` link: block devices (disks and partitions, wherever they sit:
    ``virtio1/block/vda`` has a class glue directory, ``nvme/nvme0/nvme0n1``
    does not, as the parent is itself a class device) that are mounted, used
    for swap or held by another block device (``holders/``: LVM, md,
    dm-crypt); network interfaces that are administratively up (``flags`` bit
    IFF_UP).  Child PCI functions (behind a bridge) are reported on their own.
    """
    dev = host.pci(bdf)
    mounted = _mounted_devs(host) if mounted is None else mounted
    swaps = _swaps(host)
    reasons: list[str] = []
    if not dev.is_dir():
        return reasons
    for root, dirs, _files in os.walk(dev, followlinks=False):
        here = Path(root)
        subsystem = host.link_name(here / "subsystem")
        if subsystem == "pci" and os.path.realpath(here) != os.path.realpath(dev):
            dirs[:] = []
        elif subsystem == "block":
            majmin = host.read(here / "dev", "")
            if majmin and majmin in mounted:
                reasons.append(f"block device {here.name} is mounted")
            if here.name in swaps:
                reasons.append(f"block device {here.name} is used for swap")
            holders = sorted(os.listdir(here / "holders")) if (here / "holders").is_dir() else []
            if holders:
                reasons.append(f"block device {here.name} is held by {', '.join(holders)}")
        elif subsystem == "net":
            if int(host.read(here / "flags", "0x0"), 16) & 0x1:  # IFF_UP
                reasons.append(f"network interface {here.name} is up")
            dirs[:] = []
    return reasons


def open_by(host: Host, paths: set[str]) -> list[OpenBy]:
    """Processes with one of ``paths`` open (scans ``/proc/<pid>/fd``)."""
    found: list[OpenBy] = []
    try:
        pids = [p for p in os.listdir(host.proc) if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        fd_dir = host.proc / pid / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to look at
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if target in paths:
                comm = host.read(host.proc / pid / "comm", "?")
                found.append(OpenBy(int(pid), comm, target))
                break
    return found


def cdev_path(host: Host, bdf: str) -> str | None:
    """``/dev/vfio/devices/vfioN`` of ``bdf`` when the kernel gave it a cdev, else ``None``."""
    name = host.vfio_cdev(bdf)
    return str(host.cdev_node(name)) if name is not None else None


def _vfio_paths(host: Host, group: int) -> set[str]:
    paths = {str(Path("/dev/vfio") / str(group)), str(host.vfio_node(group))}
    for bdf in host.group_members(group):
        name = host.vfio_cdev(bdf)
        if name is not None:  # the function's VFIO device cdev (Linux >= 6.6)
            paths |= {f"/dev/vfio/devices/{name}", str(host.cdev_node(name))}
    return paths


def saved_state(host: Host, bdf: str) -> dict[str, Any] | None:
    """The state ``hostrelay bind`` saved for ``bdf``, or ``None``."""
    try:
        data: dict[str, Any] = json.loads((host.state_dir / f"{bdf}.json").read_text())
    except (OSError, ValueError):
        return None
    return data


# --------------------------------------------------------------------- build
def _viability(host: Host, group: int) -> tuple[bool, list[str]]:
    blockers = []
    for m in host.group_members(group):
        drv = host.driver(m)
        if drv is None or drv in VFIO_FRIENDLY_DRIVERS or host.is_bridge(m) or (host.pci(m) / "vfio-dev").is_dir():
            continue
        blockers.append(f"{m} ({drv})")
    return not blockers, blockers


def describe(host: Host, bdf: str, mounted: set[str] | None = None, *, names: bool = True) -> PciFunction:
    """Everything ``hostrelay devices`` shows about one function."""
    dev = host.pci(bdf)
    group = host.group(bdf)
    members = host.group_members(group) if group is not None else []
    driver = host.driver(bdf)
    viable = _viability(host, group)[0] if group is not None else False
    ready = driver == "vfio-pci" and group is not None and viable and host.vfio_node(group).exists()
    state = saved_state(host, bdf)
    modalias = host.read(dev / "modalias", "")
    return PciFunction(
        address=bdf,
        vendor=host.read(dev / "vendor", "0x0000")[2:],
        device=host.read(dev / "device", "0x0000")[2:],
        name=_hwdb_name(modalias) if names and modalias and host.events else "",
        class_code=host.read(dev / "class", "0x000000")[2:],
        driver=driver,
        driver_override=host.driver_override(bdf),
        bridge=host.is_bridge(bdf),
        iommu_group=group,
        group_members=members,
        vfio_ready=ready,
        in_use=usage(host, bdf, mounted),
        saved_driver=state.get("driver") if state else None,
        saved=state is not None,
        cdev=cdev_path(host, bdf),  # only while a vfio driver holds it (vfio-pci or a variant)
    )


def list_functions(host: Host, *, names: bool = True) -> list[PciFunction]:
    """Every PCI function, sorted by address."""
    mounted = _mounted_devs(host)
    return [describe(host, bdf, mounted, names=names) for bdf in host.pci_addresses()]


def _reserved(host: Host, group: int) -> list[dict[str, str]]:
    text = host.read(host.iommu_groups / str(group) / "reserved_regions", "")
    regions = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            regions.append({"start": parts[0], "end": parts[1], "type": parts[2]})
    return regions


def list_groups(host: Host) -> list[GroupInfo]:
    """Every IOMMU group (``/sys/kernel/iommu_groups``), sorted by number."""
    base = host.iommu_groups
    numbers = sorted(int(n) for n in os.listdir(base) if n.isdigit()) if base.is_dir() else []
    groups = []
    for n in numbers:
        viable, blockers = _viability(host, n)
        node = host.vfio_node(n)
        members = [
            {"address": m, "driver": host.driver(m), "bridge": host.is_bridge(m),
             "id": f"{host.read(host.pci(m) / 'vendor', '0x0000')[2:]}:{host.read(host.pci(m) / 'device', '0x0000')[2:]}",
             "cdev": cdev_path(host, m)}
            for m in host.group_members(n)
        ]  # fmt: skip
        groups.append(
            GroupInfo(
                group=n,
                type=host.read(base / str(n) / "type", ""),  # "DMA", "DMA-FQ", "identity" (Linux >= 5.11)
                members=members,
                viable=viable,
                blockers=blockers,
                reserved_regions=_reserved(host, n),
                vfio_node=str(node) if node.exists() else None,
                open_by=open_by(host, _vfio_paths(host, n)) if node.exists() else [],
            )
        )
    return groups


def group_open_by(host: Host, group: int) -> list[OpenBy]:
    """Processes holding ``/dev/vfio/<group>`` or a member's iommufd cdev open."""
    return open_by(host, _vfio_paths(host, group))
