"""udev: waiting for device events (pyudev) and the rules hostrelay ships.

Waits never sleep: a pyudev monitor is started *before* the sysfs writes that
cause the event, then polled until the event arrives or a deadline passes.
When udevd runs (``/run/udev/control`` exists) the monitor listens to udev's
events, which arrive after the rules ran, so ``/dev/vfio/N`` already has the
owner/group/mode the rules give it; without udevd it listens to the kernel's
own uevents (the node exists then: devtmpfs creates it in ``device_add``
before the ``add`` uevent is sent, Linux >= 2.6.32).  The same holds for a
device's VFIO cdev ``/dev/vfio/devices/vfioN`` (class ``vfio-dev``, Linux >= 6.6).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from hostrelay.host.sysfs import Host

__all__ = [
    "DeviceEvent",
    "PciWatcher",
    "VfioNodeWaiter",
    "access_rule",
    "bind_rule",
    "event_source",
    "rules_text",
    "udevd_running",
    "wait_for_vfio_cdev",
    "wait_for_vfio_node",
]


def udevd_running(host: Host) -> bool:
    """True when a udev daemon is serving this host (its control socket exists)."""
    return (host.run / "udev" / "control").exists()


def event_source(host: Host) -> str | None:
    """``"udev"``, ``"kernel"`` or ``None`` (no events for a fake tree or without libudev)."""
    if not host.events:
        return None
    try:
        import pyudev  # noqa: F401
    except ImportError:  # libudev missing (minimal containers): state checks only
        return None
    return "udev" if udevd_running(host) else "kernel"


class _Monitor:
    """A started pyudev monitor for some subsystems (or nothing when there is no source)."""

    def __init__(self, host: Host, subsystems: Sequence[str]) -> None:
        self.host = host
        self.source = event_source(host)
        self.monitor: Any = None
        if self.source is not None:
            import pyudev

            self.monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=self.source)
            for subsystem in subsystems:
                self.monitor.filter_by(subsystem)
            self.monitor.start()  # before any write: events sent earlier are lost

    def poll(self, deadline: float) -> Any:
        """The next event before ``deadline`` (monotonic), or ``None``."""
        remaining = deadline - time.monotonic()
        if self.monitor is None or remaining <= 0:
            return None
        return self.monitor.poll(timeout=remaining)

    def close(self) -> None:
        # pyudev closes the netlink socket when the monitor is collected.
        self.monitor = None


class VfioNodeWaiter:
    """Start listening, do the writes, then :meth:`wait` for ``/dev/vfio/<N>``
    (and :meth:`wait_cdev` for ``/dev/vfio/devices/vfioN``).

    Use as a context manager around the binding writes.  It listens to both
    classes the nodes belong to: ``vfio`` (group nodes) and ``vfio-dev``
    (device cdevs, Linux >= 6.6).  Every add event it receives is kept, so
    waiting for one node never loses the event of another that came first.
    """

    def __init__(self, host: Host) -> None:
        self.host = host
        self._mon: _Monitor | None = None
        self._before: set[str] = set()
        self._cdevs_before: set[str] = set()
        self._added: set[tuple[str, str]] = set()
        self.events_seen: list[tuple[str, str]] = []

    def __enter__(self) -> VfioNodeWaiter:
        self._mon = _Monitor(self.host, ["vfio", "vfio-dev"])
        vdir, cdir = self.host.vfio_dir, self.host.cdev_dir
        self._before = {p.name for p in vdir.iterdir()} if vdir.is_dir() else set()
        self._cdevs_before = {p.name for p in cdir.iterdir()} if cdir.is_dir() else set()
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        if self._mon is not None:
            self._mon.close()

    @property
    def source(self) -> str | None:
        """Where events come from: ``"udev"``, ``"kernel"`` or ``None`` (state checks only)."""
        return self._mon.source if self._mon else None

    def wait(self, group: int, *, timeout: float = 10.0) -> Path:
        """``/dev/vfio/<group>`` once it is ready; :class:`TimeoutError` after ``timeout`` s."""
        node = self.host.vfio_node(group)
        # A node that existed before we started listening gets no new add event
        # (another member of its group was bound already): it is ready now.
        return self._wait(node, "vfio", {str(group), f"noiommu-{group}"}, node.name in self._before, timeout)

    def wait_cdev(self, name: str, *, timeout: float = 10.0) -> Path:
        """``/dev/vfio/devices/<name>`` once it is ready; :class:`TimeoutError` after ``timeout`` s.

        The kernel adds the cdev (``cdev_device_add`` in
        ``vfio_register_group_dev``, Linux >= 6.6) while vfio-pci probes, so
        by the time the ``driver`` link shows vfio-pci its sysfs device and
        its events exist; with udevd, its ``add`` event comes after the rules
        gave the node its group and mode.
        """
        node = self.host.cdev_node(name)
        return self._wait(node, "vfio-dev", {name}, name in self._cdevs_before, timeout)

    def _wait(self, node: Path, subsystem: str, names: set[str], existed: bool, timeout: float) -> Path:
        assert self._mon is not None, "use VfioNodeWaiter as a context manager"
        if existed and node.exists():
            return node
        # With kernel events (or no events) existence is all there is to wait for.
        if self._mon.source != "udev" and node.exists():
            return node
        if any((subsystem, n) in self._added for n in names):
            return node
        deadline = time.monotonic() + timeout
        while True:
            dev = self._mon.poll(deadline)
            if dev is None:
                break
            self.events_seen.append((dev.action, dev.sys_name))
            if dev.action == "add":
                self._added.add((dev.subsystem, dev.sys_name))
                if dev.subsystem == subsystem and dev.sys_name in names:
                    return node
        if self._mon.source is None and node.exists():
            return node
        raise TimeoutError(f"{node} did not appear within {timeout:g} s (source: {self._mon.source or 'none'})")


@dataclass(frozen=True)
class DeviceEvent:
    """A PCI device event as ``hostrelay devices --watch`` reports it."""

    action: str
    address: str
    source: str


class PciWatcher:
    """Listen for PCI add/remove/bind/unbind events (start it before causing them)."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._mon: _Monitor | None = None

    def __enter__(self) -> PciWatcher:
        self._mon = _Monitor(self.host, ["pci"])
        if self._mon.source is None:
            raise RuntimeError("no device events here (pyudev/libudev missing, or not the real /sys)")
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        if self._mon is not None:
            self._mon.close()

    @property
    def source(self) -> str:
        assert self._mon is not None and self._mon.source is not None
        return self._mon.source

    def events(self, *, timeout: float, actions: Sequence[str] = ("add", "remove")) -> Iterator[DeviceEvent]:
        """Events with one of ``actions`` until ``timeout`` seconds from now pass."""
        assert self._mon is not None
        deadline = time.monotonic() + timeout
        while True:
            dev = self._mon.poll(deadline)
            if dev is None:
                return
            if dev.action in actions:
                yield DeviceEvent(dev.action, dev.sys_name, self.source)


# --------------------------------------------------------------------- rules
RULES_DIR = Path("/etc/udev/rules.d")
ACCESS_RULE_NAME = "70-hostrelay-vfio.rules"
BIND_RULE_NAME = "60-hostrelay-vfio-bind.rules"


def _check_token(value: str, what: str) -> str:
    # Rule values are double-quoted; a quote or newline would end the rule.
    if not value or any(c in value for c in '"\n\\%$'):
        raise ValueError(f"invalid {what} for a udev rule: {value!r}")
    return value


def access_rule(group: str, mode: str = "0660") -> str:
    """Rule text giving ``group`` read/write access to every VFIO node the backends open.

    ``/dev/vfio/<N>`` nodes are class ``vfio`` devices (type1); the VFIO
    device cdevs ``/dev/vfio/devices/vfioN`` are class ``vfio-dev`` (Linux >=
    6.6, ``CONFIG_VFIO_DEVICE_CDEV``; the kernel creates them 0600 root);
    ``/dev/iommu`` is the misc device ``iommu`` that iommufd registers 0660
    root:root (Linux >= 6.2, ``CONFIG_IOMMUFD``).  Opening ``/dev/iommu``
    reaches no device by itself: a cdev must be opened and bound to it, and
    what it pins is charged to the user's RLIMIT_MEMLOCK.  The container
    ``/dev/vfio/vfio`` is a misc device the kernel itself creates 0666 (it
    grants nothing on its own), so it needs no rule.
    """
    group = _check_token(group, "group")
    if len(mode) != 4 or not mode.isdigit() or any(c > "7" for c in mode):
        raise ValueError(f"invalid mode {mode!r}")
    return (
        f"# hostrelay: give group '{group}' access to VFIO group nodes, device cdevs and /dev/iommu "
        f"(install as {RULES_DIR / ACCESS_RULE_NAME})\n"
        f'SUBSYSTEM=="vfio", GROUP="{group}", MODE="{mode}"\n'
        f'SUBSYSTEM=="vfio-dev", GROUP="{group}", MODE="{mode}"\n'
        f'SUBSYSTEM=="misc", KERNEL=="iommu", GROUP="{group}", MODE="{mode}"\n'
    )


def _match_for(selector: str) -> str:
    """udev match keys for a BDF (``0000:00:03.0``) or an ID (``1234:11e8``)."""
    parts = selector.split(":")
    if len(parts) == 2 and all(len(p) == 4 for p in parts):
        vendor, device = (int(p, 16) for p in parts)
        return f'ATTR{{vendor}}=="0x{vendor:04x}", ATTR{{device}}=="0x{device:04x}"'
    from hostrelay.host.devices import normalize_address

    return f'KERNEL=="{normalize_address(selector)}"'


def bind_rule(selectors: Sequence[str]) -> str:
    """Rule text binding the listed functions (BDFs or ``vvvv:dddd`` IDs) to vfio-pci at add.

    Setting ``driver_override`` on ``add`` keeps any driver loaded later (udev's
    own modalias ``kmod load`` in 80-drivers.rules runs after this 60- rule)
    off the device.  A driver already loaded may have probed it before udev ran
    (the kernel probes in ``device_add`` right after the uevent), so the RUN
    step unbinds it and re-probes, which then honours the override (Linux >= 3.16).
    """
    lines = [f"# hostrelay: bind listed PCI functions to vfio-pci when they appear (install as {RULES_DIR / BIND_RULE_NAME})"]
    probe = (
        "/bin/sh -c 'test -e /sys/bus/pci/drivers/vfio-pci/%k || "
        "{ echo %k > /sys%p/driver/unbind; echo %k > /sys/bus/pci/drivers_probe; } 2>/dev/null'"
    )
    for sel in selectors:
        lines.append(f'ACTION=="add", SUBSYSTEM=="pci", {_match_for(sel)}, ATTR{{driver_override}}="vfio-pci", RUN+="{probe}"')
    return "\n".join(lines) + "\n"


def rules_text(group: str | None, selectors: Sequence[str], mode: str = "0660") -> str:
    """Both rules as ``hostrelay udev-rules`` prints them."""
    parts = []
    if group is not None:
        parts.append(access_rule(group, mode))
    if selectors:
        parts.append(bind_rule(selectors))
    return "\n".join(parts)


def wait_for_vfio_node(group: int, *, dev_root: Path = Path("/dev/vfio"), timeout: float = 10.0) -> Path:
    """Return ``<dev_root>/<group>`` once it exists (udev/kernel event with a deadline)."""
    host = Host(dev=dev_root.parent)
    with VfioNodeWaiter(host) as waiter:
        return waiter.wait(group, timeout=timeout)


def wait_for_vfio_cdev(name: str, *, dev_root: Path = Path("/dev/vfio"), timeout: float = 10.0) -> Path:
    """Return ``<dev_root>/devices/<name>`` once it exists (udev/kernel event with a deadline)."""
    host = Host(dev=dev_root.parent)
    with VfioNodeWaiter(host) as waiter:
        return waiter.wait_cdev(name, timeout=timeout)
