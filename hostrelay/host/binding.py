"""Hand PCI functions to vfio-pci and give them back, group-aware and restorable.

Bind, per function (the order libvirt and vfio-pci-bind use):
 1. save the original driver and override to ``<state_dir>/<bdf>.json``;
 2. start a udev/kernel event monitor (before any write);
 3. ``driver_override`` ← ``vfio-pci`` — from here no other driver can take the
    function, even if a module loads or someone probes (Linux >= 3.16);
 4. ``<dev>/driver/unbind`` ← BDF when a driver holds it;
 5. ``/sys/bus/pci/drivers_probe`` ← BDF (honours the override; returns success
    even when nothing binds, so step 6 is required);
 6. verify the ``driver`` link, rolling back every function touched on failure;
 7. wait for ``/dev/vfio/<N>`` through the monitor, with a deadline, and for
    the function's VFIO device cdev ``/dev/vfio/devices/vfioN`` when the kernel
    gives it one (Linux >= 6.6 with ``CONFIG_VFIO_DEVICE_CDEV``; without it
    there is no cdev to wait for, which is not an error).
The override stays set while hostrelay owns the device so rescans and module
reloads cannot steal it back.

Unbind: refuse while the group (or a member's cdev) is open; clear the
override with ``"\\n"``; unbind; with ``restore``, re-probe so the kernel picks the
native driver, and if that is not the saved one, bind the saved one explicitly.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostrelay.host.devices import cdev_path, group_open_by, saved_state, usage
from hostrelay.host.sysfs import Host, SysfsWrite

__all__ = ["BindError", "BindResult", "bind", "plan_bind", "plan_unbind", "result_text", "unbind"]

VFIO_DRIVER = "vfio-pci"


class BindError(Exception):
    """A bind/unbind was refused or failed; the message says why and what to do."""


@dataclass
class Step:
    """The writes for one function, and what it held before."""

    address: str
    group: int | None
    before: str | None
    writes: list[SysfsWrite] = field(default_factory=list)


@dataclass
class BindResult:
    """What ``bind``/``unbind`` did (or, with ``dry_run``, would do)."""

    action: str
    dry_run: bool
    devices: list[dict[str, Any]]
    writes: list[SysfsWrite]

    def to_json(self) -> dict[str, Any]:
        """Stable keys for ``--json``."""
        return {
            "action": self.action,
            "dry_run": self.dry_run,
            "devices": self.devices,
            "writes": [{"path": str(w.path), "value": w.value, "why": w.why} for w in self.writes],
        }


def _bind_writes(host: Host, bdf: str) -> list[SysfsWrite]:
    dev = host.pci(bdf)
    writes = [SysfsWrite(dev / "driver_override", VFIO_DRIVER, "only vfio-pci may bind from now on")]
    if host.driver(bdf) is not None:
        writes.append(SysfsWrite(dev / "driver" / "unbind", bdf, f"release it from {host.driver(bdf)}"))
    writes.append(SysfsWrite(host.drivers_probe, bdf, "probe: the override makes vfio-pci take it"))
    return writes


def plan_bind(addresses: Sequence[str], host: Host, *, whole_group: bool = False, force: bool = False,
              allow_partial_group: bool = False) -> list[Step]:  # fmt: skip
    """The ordered writes binding ``addresses`` (and, with ``whole_group``, their siblings).

    Raises :class:`BindError` for refusals, before anything is written.
    """
    if not (host.sys / "bus/pci/drivers" / VFIO_DRIVER).is_dir():
        raise BindError("the vfio-pci driver is not loaded: run 'modprobe vfio-pci'")
    wanted: list[str] = []
    for bdf in addresses:
        if not host.pci(bdf).is_dir():
            raise BindError(f"{bdf}: no such PCI function")
        if host.is_bridge(bdf):
            raise BindError(f"{bdf}: is a bridge; vfio-pci binds only endpoints (bridges stay on their driver)")
        if host.group(bdf) is None and not (host.sys / "class/iommu").is_dir():
            raise BindError(f"{bdf}: has no IOMMU group and there is no IOMMU; enable it (intel_iommu=on / amd_iommu=on)")
        if bdf not in wanted:
            wanted.append(bdf)
    # Group awareness: every endpoint sharing a group must end up with vfio-pci
    # (or no driver) for the group to be usable; binding half a group is refused.
    for bdf in list(wanted):
        group = host.group(bdf)
        if group is None:
            # A device may join its IOMMU group only when a driver first
            # probes it (iommu_probe_device from dma_configure; seen on Linux
            # 6.12 with virtio-iommu): no siblings can be known before binding.
            continue
        siblings = [m for m in host.group_members(group)
                    if m not in wanted and not host.is_bridge(m) and host.driver(m) != VFIO_DRIVER]  # fmt: skip
        if siblings and whole_group:
            wanted += siblings
        elif siblings and not allow_partial_group:
            names = ", ".join(f"{m} ({host.driver(m) or 'no driver'})" for m in siblings)
            raise BindError(f"{bdf}: IOMMU group {group} also holds {names}; "
                            "bind them together (name them all, or use --group)")  # fmt: skip
    if not force:
        busy = {bdf: usage(host, bdf) for bdf in wanted}
        busy = {k: v for k, v in busy.items() if v}
        if busy:
            text = "; ".join(f"{k}: {', '.join(v)}" for k, v in busy.items())
            raise BindError(f"the host is using {text}; stop using it first or pass --force")
    return [Step(bdf, host.group(bdf), host.driver(bdf),
                 [] if host.driver(bdf) == VFIO_DRIVER else _bind_writes(host, bdf)) for bdf in wanted]  # fmt: skip


def _save_state(host: Host, step: Step) -> None:
    path = host.state_dir / f"{step.address}.json"
    if path.exists():  # a re-bind must not overwrite the original driver with vfio-pci
        return
    host.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    state = {"address": step.address, "driver": step.before, "driver_override": host.driver_override(step.address),
             "iommu_group": step.group, "saved_at": time.time()}  # fmt: skip
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, path)


def _give_back(host: Host, bdf: str, driver: str | None) -> list[SysfsWrite]:
    """Writes returning ``bdf`` to ``driver`` (``None``: leave it driverless)."""
    dev = host.pci(bdf)
    writes = [SysfsWrite(dev / "driver_override", "\n", "clear the override")]
    if host.driver(bdf) is not None:
        writes.append(SysfsWrite(dev / "driver" / "unbind", bdf, f"release it from {host.driver(bdf)}"))
    if driver is not None:
        writes.append(SysfsWrite(host.drivers_probe, bdf, f"probe: the kernel picks its driver (expect {driver})"))
    return writes


def _rollback(host: Host, steps: Sequence[Step]) -> list[str]:
    problems = []
    for step in steps:
        try:
            for w in _give_back(host, step.address, step.before):
                host.write(w)
            if step.before is not None and host.driver(step.address) != step.before:
                _force_driver(host, step.address, step.before)
        except OSError as exc:
            problems.append(f"{step.address}: rollback failed: {exc}")
    return problems


def _force_driver(host: Host, bdf: str, driver: str) -> None:
    """Bind ``driver`` explicitly (override + probe + clear) when probing picked another."""
    dev = host.pci(bdf)
    if host.driver(bdf) is not None:
        host.write(SysfsWrite(dev / "driver" / "unbind", bdf))
    host.write(SysfsWrite(dev / "driver_override", driver))
    host.write(SysfsWrite(host.drivers_probe, bdf))
    host.write(SysfsWrite(dev / "driver_override", "\n"))


def bind(addresses: Sequence[str], host: Host | None = None, *, whole_group: bool = False, force: bool = False,
         dry_run: bool = False, save_state: bool = True, wait_node: bool = True, timeout: float = 10.0,
         allow_partial_group: bool = False) -> BindResult:  # fmt: skip
    """Bind ``addresses`` to vfio-pci; see the module docstring for the sequence.

    Returns when every function is on vfio-pci and its ``/dev/vfio/<N>`` is
    ready; raises :class:`BindError` (after rolling back) otherwise.
    """
    from hostrelay.host.udev import VfioNodeWaiter

    host = host or Host()
    steps = plan_bind(addresses, host, whole_group=whole_group, force=force, allow_partial_group=allow_partial_group)
    writes = [w for s in steps for w in s.writes]
    devices = [{"address": s.address, "iommu_group": s.group, "from": s.before, "to": VFIO_DRIVER,
                "changed": bool(s.writes), "vfio_node": str(host.vfio_node(s.group)) if s.group is not None else None,
                "cdev": cdev_path(host, s.address)}
               for s in steps]  # fmt: skip
    if dry_run:
        return BindResult("bind", True, devices, writes)
    if save_state:
        for s in steps:
            if s.writes:
                _save_state(host, s)
    done: list[Step] = []
    with VfioNodeWaiter(host) as waiter:
        for s in steps:
            if not s.writes:
                continue
            done.append(s)
            try:
                for w in s.writes:
                    host.write(w)
            except OSError as exc:
                problems = _rollback(host, done)
                raise BindError(f"{s.address}: {exc}" + "".join(f"; {p}" for p in problems)) from exc
            if host.driver(s.address) != VFIO_DRIVER:
                problems = _rollback(host, done)
                raise BindError(f"{s.address}: vfio-pci did not bind (driver now {host.driver(s.address) or 'none'}); "
                                "rolled back" + "".join(f"; {p}" for p in problems))  # fmt: skip
            s.group = host.group(s.address)  # may be known only now (see plan_bind)
        # vfio-pci's probe registered the device before the driver link
        # appeared, so its sysfs vfio-dev device (and cdev number) is known now.
        cdevs = [name for s in steps if (name := host.vfio_cdev(s.address)) is not None]
        if wait_node:
            try:
                for group in sorted({s.group for s in steps if s.group is not None}):
                    waiter.wait(group, timeout=timeout)
                for name in cdevs:
                    waiter.wait_cdev(name, timeout=timeout)
            except TimeoutError as exc:
                raise BindError(str(exc)) from exc
    for s, info in zip(steps, devices, strict=True):
        info["iommu_group"] = s.group
        info["vfio_node"] = str(host.vfio_node(s.group)) if s.group is not None else None
        info["cdev"] = cdev_path(host, s.address)
    return BindResult("bind", False, devices, writes)


def plan_unbind(addresses: Sequence[str], host: Host, *, restore: bool) -> list[Step]:
    """The ordered writes giving ``addresses`` back; refuses while a group is open."""
    steps = []
    for bdf in dict.fromkeys(addresses):
        if not host.pci(bdf).is_dir():
            raise BindError(f"{bdf}: no such PCI function")
        group = host.group(bdf)
        if group is not None:
            holders = group_open_by(host, group)
            if holders:
                who = ", ".join(f"pid {h.pid} ({h.command}) has {h.path} open" for h in holders)
                raise BindError(f"{bdf}: IOMMU group {group} is in use: {who}; close it first")
        state = saved_state(host, bdf)
        current = host.driver(bdf)
        if current not in (None, VFIO_DRIVER) and host.driver_override(bdf) != VFIO_DRIVER:
            raise BindError(f"{bdf}: is on {current}, not vfio-pci; nothing to give back")
        # Without saved state the kernel's own choice (probe by ID table) is the target.
        target = state.get("driver") if state else "(kernel's choice)"
        if not restore:
            target = None
        step = Step(bdf, group, current, _give_back(host, bdf, target))
        steps.append(step)
    return steps


def unbind(addresses: Sequence[str], host: Host | None = None, *, restore: bool = False,
           dry_run: bool = False) -> BindResult:  # fmt: skip
    """Take ``addresses`` off vfio-pci; with ``restore``, back onto their saved driver."""
    host = host or Host()
    steps = plan_unbind(addresses, host, restore=restore)
    writes = [w for s in steps for w in s.writes]
    devices = []
    for s in steps:
        state = saved_state(host, s.address)
        wanted = (state.get("driver") if state else None) if restore else None
        devices.append({"address": s.address, "iommu_group": s.group, "from": s.before, "saved_driver": wanted,
                        "restore": restore, "had_state": state is not None,
                        "cdev": cdev_path(host, s.address)})  # fmt: skip
    if dry_run:
        return BindResult("unbind", True, devices, writes)
    for s, info in zip(steps, devices, strict=True):
        try:
            for w in s.writes:
                host.write(w)
            wanted = info["saved_driver"]
            if restore and isinstance(wanted, str) and host.driver(s.address) != wanted:
                _force_driver(host, s.address, wanted)
        except OSError as exc:
            raise BindError(f"{s.address}: {exc}") from exc
        now = host.driver(s.address)
        info["to"] = now
        if restore and info["had_state"] and now != info["saved_driver"]:
            raise BindError(f"{s.address}: could not restore {info['saved_driver'] or 'no driver'} (now {now or 'none'}); "
                            f"is its module loaded? (modprobe {info['saved_driver']})")  # fmt: skip
        if restore:
            (host.state_dir / f"{s.address}.json").unlink(missing_ok=True)
    return BindResult("unbind", False, devices, writes)


def result_text(result: BindResult) -> list[str]:
    """Human lines for a bind/unbind result (the CLI prints them)."""
    lines = []
    if result.dry_run:
        lines.append(f"dry run: {result.action} would perform these writes, in order:")
        lines += [f"  {w.describe()}" for w in result.writes] or ["  (nothing to write)"]
        return lines
    for d in result.devices:
        if result.action == "bind":
            what = f"{d['from'] or 'no driver'} -> {d['to']}" if d["changed"] else "already on vfio-pci"
            cdev = f", cdev {d['cdev']}" if d.get("cdev") else ""
            lines.append(f"{d['address']}: {what} (group {d['iommu_group']}, {d['vfio_node']}{cdev})")
        else:
            gone = f" (cdev {d['cdev']} removed)" if d.get("cdev") else ""
            lines.append(f"{d['address']}: {d['from'] or 'no driver'} -> {d.get('to') or 'no driver'}{gone}")
    return lines


def bind_vfio(bdf: str, *, sysfs_root: Path = Path("/sys")) -> None:
    """Hand ``bdf`` to vfio-pci (group-unaware; tests and examples).

    Uses the same sequence as ``hostrelay bind`` (driver_override, unbind,
    drivers_probe, verify) but does not save state, refuse busy devices or
    insist on binding whole groups.  Raises :class:`OSError` when it fails.
    """
    try:
        bind([bdf], Host(sys=sysfs_root), force=True, save_state=False, wait_node=False, allow_partial_group=True)
    except BindError as exc:
        raise OSError(f"{bdf}: {exc}") from exc
