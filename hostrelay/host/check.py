"""``hostrelay check``: is this host ready to pass devices through with VFIO?

Each check yields a :class:`Finding` with a status (ok / warn / fail), what was
seen, and the remedy.  The host is ready when nothing failed.
"""

from __future__ import annotations

import os
import re
import resource
from dataclasses import asdict, dataclass
from typing import Any

from hostrelay.host.sysfs import Host

__all__ = ["Finding", "parse_size", "readiness", "ready"]

CAP_IPC_LOCK = 14  # include/uapi/linux/capability.h


@dataclass(frozen=True)
class Finding:
    """One readiness check."""

    check: str
    status: str  # "ok", "warn" or "fail"
    detail: str
    remedy: str = ""

    def to_json(self) -> dict[str, Any]:
        """Stable keys for ``--json``."""
        return asdict(self)


def parse_size(text: str) -> int:
    """``4G``, ``512M``, ``1.5G``, ``2048`` (MiB, as QEMU's ``-m``) → bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 4G, 512M)")
    unit = m.group(2).upper() or "M"
    return int(float(m.group(1)) * (1 << {"K": 10, "M": 20, "G": 30, "T": 40}[unit]))


def _human(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


def _iommu(host: Host) -> list[Finding]:
    cls = host.sys / "class" / "iommu"
    units = sorted(os.listdir(cls)) if cls.is_dir() else []
    groups = sorted(os.listdir(host.iommu_groups)) if host.iommu_groups.is_dir() else []
    if not units or not groups:
        return [Finding("iommu", "fail", "no IOMMU is active (no /sys/class/iommu units or no IOMMU groups)",
                        "enable VT-d/AMD-Vi in firmware and boot with intel_iommu=on (Intel) or amd_iommu=on (AMD)")]  # fmt: skip
    kinds = set()
    for u in units:
        if u.startswith("dmar"):
            kinds.add("Intel VT-d")
        elif u.startswith("ivhd"):
            kinds.add("AMD-Vi")
        else:
            drv = host.link_name(cls / u / "device" / "driver")
            kinds.add(drv or u)  # e.g. virtio-iommu registers its unit under the virtio device
    # Default domain type per group, Linux >= 5.11: DMA / DMA-FQ translate, identity = passthrough (iommu=pt).
    types = sorted({host.read(host.iommu_groups / g / "type", "?") for g in groups})
    mode = "passthrough (iommu=pt) for host drivers" if types == ["identity"] else "translated (" + ", ".join(types) + ")"
    return [Finding("iommu", "ok", f"{', '.join(sorted(kinds))}: {len(units)} unit(s), {len(groups)} group(s), "
                    f"default domains {mode}; VFIO gives each container its own domain")]  # fmt: skip


def _interrupt_remapping(host: Host) -> list[Finding]:
    # x86 interrupt remapping shows as irq chips named "IR-IO-APIC" and
    # "IR-PCI-MSI*" in /proc/interrupts (arch/x86/kernel/apic, Linux >= 3.x;
    # Intel and AMD alike).  vfio_iommu_type1 (Linux 6.12,
    # iommu_group_has_isolated_msi) refuses VFIO_SET_IOMMU with EPERM without
    # it unless allow_unsafe_interrupts is set.
    try:
        text = (host.proc / "interrupts").read_text()
    except OSError:
        text = ""
    remapped = bool(re.search(r"\sIR-[A-Z]", text))
    unsafe = host.read(host.sys / "module/vfio_iommu_type1/parameters/allow_unsafe_interrupts", "N") in ("Y", "1")
    if remapped:
        return [Finding("interrupt-remapping", "ok", "interrupt remapping is enabled (IR- irq chips in /proc/interrupts)")]
    if unsafe:
        return [Finding("interrupt-remapping", "warn",
                        "no interrupt remapping; VFIO works only because vfio_iommu_type1.allow_unsafe_interrupts=Y "
                        "(a device can inject arbitrary interrupts into the host)",
                        "use an IOMMU with interrupt remapping (intremap=on / enable it in firmware) if devices are untrusted")]  # fmt: skip
    return [Finding("interrupt-remapping", "fail",
                    "no interrupt remapping: VFIO_SET_IOMMU will fail with EPERM (vfio_iommu_type1 requires isolated MSI)",
                    "enable interrupt remapping (firmware, intremap=on), or accept the risk: "
                    "modprobe vfio_iommu_type1 allow_unsafe_interrupts=1 (or kernel argument "
                    "vfio_iommu_type1.allow_unsafe_interrupts=1; at run time write 1 to "
                    "/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts)")]  # fmt: skip


def _modules(host: Host) -> list[Finding]:
    # Loaded or built-in modules both appear under /sys/module when they have
    # parameters or are loadable (Linux >= 2.6); vfio-pci also registers its driver.
    missing = [m for m in ("vfio", "vfio_iommu_type1") if not (host.sys / "module" / m).is_dir()]
    if not (host.sys / "bus/pci/drivers/vfio-pci").is_dir():
        missing.append("vfio_pci")
    if missing:
        return [Finding("vfio-modules", "fail", f"not loaded: {', '.join(missing)}",
                        f"modprobe {' '.join(missing)} (persist in /etc/modules-load.d/vfio.conf)")]  # fmt: skip
    return [Finding("vfio-modules", "ok", "vfio, vfio_iommu_type1 and vfio-pci are loaded")]


def _vfio_groups(host: Host) -> list[int]:
    vdir = host.vfio_dir
    return sorted(int(n) for n in os.listdir(vdir) if n.isdigit()) if vdir.is_dir() else []


def _permissions(host: Host) -> list[Finding]:
    user = f"uid {os.geteuid()}"
    container = host.vfio_dir / "vfio"
    out = []
    if not container.exists():
        out.append(Finding("vfio-permissions", "fail", f"{container} does not exist", "modprobe vfio"))
    elif not os.access(container, os.R_OK | os.W_OK):
        out.append(Finding("vfio-permissions", "fail", f"{user} cannot open {container} read/write",
                           f"chmod 0666 {container} (the kernel default; it grants nothing on its own)"))  # fmt: skip
    groups = _vfio_groups(host)
    if not groups:
        out.append(Finding("vfio-permissions", "warn", "no device is bound to vfio-pci yet (no /dev/vfio/<N>)",
                           "hostrelay bind ADDR"))  # fmt: skip
    denied = [str(host.vfio_node(g)) for g in groups if not os.access(host.vfio_node(g), os.R_OK | os.W_OK)]
    if denied:
        out.append(Finding("vfio-permissions", "fail", f"{user} cannot open {', '.join(denied)} read/write",
                           "install the group rule from 'hostrelay udev-rules --group GROUP', add the user to "
                           "GROUP, then 'udevadm trigger --subsystem-match=vfio'"))  # fmt: skip
    elif groups and container.exists() and os.access(container, os.R_OK | os.W_OK):
        out.append(Finding("vfio-permissions", "ok", f"{user} can open {container} and groups {', '.join(map(str, groups))}"))
    return out


def _has_cap_ipc_lock(host: Host) -> bool:
    try:
        for line in (host.proc / "self" / "status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _memlock(host: Host, guest_ram: int | None, containers: int | None) -> list[Finding]:
    # vfio_iommu_type1 charges every pinned page to the task's RLIMIT_MEMLOCK
    # unless it has CAP_IPC_LOCK (vfio_lock_acct / vfio_pin_pages_remote,
    # Linux >= 3.x), once per container, so a guest's RAM counts N times.
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    n = containers if containers is not None else max(1, len(_vfio_groups(host)))
    limit = "unlimited" if soft == resource.RLIM_INFINITY else _human(soft)
    if _has_cap_ipc_lock(host):
        return [Finding("memlock", "ok", f"CAP_IPC_LOCK: pinned memory is not limited (RLIMIT_MEMLOCK {limit})")]
    if guest_ram is None:
        return [Finding("memlock", "ok" if soft == resource.RLIM_INFINITY or soft >= 64 << 20 else "warn",
                        f"RLIMIT_MEMLOCK is {limit} (give --guest-ram to check it against a guest)",
                        "" if soft >= 64 << 20 else "raise it (ulimit -l, LimitMEMLOCK=, /etc/security/limits.d)")]  # fmt: skip
    need = guest_ram * n
    if soft != resource.RLIM_INFINITY and soft < need:
        return [Finding("memlock", "fail",
                        f"RLIMIT_MEMLOCK is {limit}; {_human(guest_ram)} of guest RAM x {n} container(s) needs {_human(need)}",
                        f"raise it to at least {need // 1024} KiB: ulimit -l {need // 1024}, systemd LimitMEMLOCK={need}, "
                        "or /etc/security/limits.d (or grant CAP_IPC_LOCK)")]  # fmt: skip
    return [Finding("memlock", "ok", f"RLIMIT_MEMLOCK {limit} covers {_human(guest_ram)} x {n} container(s)")]


def readiness(host: Host | None = None, *, guest_ram: int | None = None, containers: int | None = None) -> list[Finding]:
    """Every finding, in a stable order."""
    host = host or Host()
    return (_iommu(host) + _interrupt_remapping(host) + _modules(host) + _permissions(host)
            + _memlock(host, guest_ram, containers))  # fmt: skip


def ready(findings: list[Finding]) -> bool:
    """True when no finding failed."""
    return all(f.status != "fail" for f in findings)
