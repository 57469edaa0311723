"""``hostrelay check``: is this host ready to pass devices through with VFIO?

Each check yields a :class:`Finding` with a status (ok / warn / fail), what was
seen, and the remedy.  The host is ready when nothing failed.

The type1 checks (container and group nodes) decide readiness.  The iommufd
backend (``/dev/iommu`` and the VFIO device cdevs, Linux >= 6.6) is reported
beside them, as ``iommufd-*`` findings and one ``iommufd`` summary that says
"iommufd backend ready" or "iommufd backend unavailable: <why>"; those are
never failures, as the type1 path does not need iommufd.
"""

from __future__ import annotations

import gzip
import os
import re
import resource
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hostrelay.host.sysfs import Host

__all__ = ["BuildSupport", "Finding", "iommufd_ready", "parse_size", "readiness", "ready"]

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


@dataclass(frozen=True)
class BuildSupport:
    """What this hostrelay build offers, as the caller found it.

    Host tooling may not import the kernel seam, so the front end asks
    ``hostrelay.kernel.iommufd.AVAILABLE`` and passes the answer in.
    """

    iommufd: bool
    why: str = ""  # why not, when ``iommufd`` is False


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


# ------------------------------------------------------------------ iommufd
def _can_open(path: Path) -> bool:
    """May the caller open ``path`` read/write (its permissions; nothing is opened)?"""
    return os.access(path, os.R_OK | os.W_OK)


def _char_majors(host: Host) -> set[str]:
    """Names of the character device regions in ``/proc/devices`` (empty when unreadable)."""
    try:
        text = (host.proc / "devices").read_text()
    except OSError:
        return set()
    section = text.split("Block devices:", 1)[0]
    return {parts[1] for line in section.splitlines() if len(parts := line.split()) == 2 and parts[0].isdigit()}


def _kernel_config(host: Host) -> tuple[str, dict[str, str]] | None:
    """The running kernel's configuration: where it was read and its ``CONFIG_*`` values."""
    release = host.kernel_release()
    candidates = [(host.boot / f"config-{release}", False), (host.proc / "config.gz", True)]  # IKCONFIG_PROC for the latter
    for path, packed in candidates:
        try:
            raw = gzip.decompress(path.read_bytes()) if packed else path.read_bytes()
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        values: dict[str, str] = {}
        for line in raw.decode(errors="replace").splitlines():
            if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line.strip()):
                values[m.group(1)] = m.group(2)
            elif m := re.fullmatch(r"# (CONFIG_\w+) is not set", line.strip()):
                values[m.group(1)] = "n"
        return str(path), values
    return None


def _cdev_support(host: Host) -> tuple[bool | None, str]:
    """Does the kernel have ``CONFIG_VFIO_DEVICE_CDEV``: yes / no / unknown, and the evidence.

    vfio registers the char region ``vfio-dev`` (``vfio_cdev_init``, Linux
    >= 6.6) only when built with ``CONFIG_VFIO_DEVICE_CDEV``; the class
    ``/sys/class/vfio-dev`` exists from Linux 6.1 on either way (it holds
    every VFIO device), so it shows only that vfio is loaded, not that its
    devices have cdevs.  When vfio is not loaded the kernel's config, if
    shipped, answers.
    """
    majors = _char_majors(host)
    devices = host.proc / "devices"
    if "vfio-dev" in majors:
        return True, f"vfio registered the 'vfio-dev' char region ({devices})"
    with_cdev = [b for b in _vfio_bound(host) if host.vfio_cdev(b) is not None]
    if with_cdev:
        return True, f"{with_cdev[0]}'s vfio-dev device has a device number (sysfs)"
    # The group nodes' char region "vfio" (vfio_group_init, Linux >= 3.6) or
    # the vfio-dev class (Linux >= 6.1) says vfio is loaded.
    vfio_loaded = "vfio" in majors or (host.sys / "class/vfio-dev").is_dir()
    if vfio_loaded and majors:
        return False, f"vfio is loaded but registered no 'vfio-dev' char region ({devices})"
    config = _kernel_config(host)
    if config is not None:
        where, values = config
        value = values.get("CONFIG_VFIO_DEVICE_CDEV", "n")
        shown = "CONFIG_VFIO_DEVICE_CDEV is not set" if value == "n" else f"CONFIG_VFIO_DEVICE_CDEV={value}"
        return value == "y", f"{shown} in {where}"  # a bool option: y or not set
    return None, (f"vfio is not loaded and there is no kernel config ({host.boot}/config-{host.kernel_release()}, "
                  f"{host.proc}/config.gz)")  # fmt: skip


def _vfio_bound(host: Host) -> list[str]:
    return [b for b in host.pci_addresses() if host.driver(b) == "vfio-pci"]


def _iommufd(host: Host, build: BuildSupport | None) -> list[Finding]:
    user = f"uid {os.geteuid()}"
    out: list[Finding] = []
    why: list[str] = []  # what keeps the iommufd backend from working, in the order found
    remedies: list[str] = []
    rules = "install the rule from 'hostrelay udev-rules --group GROUP', add the user to GROUP"

    # /dev/iommu: the iommufd misc device, 0660 root:root (Linux >= 6.2, CONFIG_IOMMUFD).
    node = host.iommu_node
    if not node.exists():
        why.append(f"{node} does not exist (the kernel has no CONFIG_IOMMUFD, or iommufd is not loaded)")
        remedies.append("modprobe iommufd, or boot a kernel with CONFIG_IOMMUFD=y (Linux >= 6.2; no Debian kernel "
                        "enables it; 'hostrelay testbed run --iommufd' boots one)")  # fmt: skip
        out.append(Finding("iommufd-dev", "warn", why[-1], remedies[-1]))
    elif not _can_open(node):
        why.append(f"{user} cannot open {node} read/write")
        remedies.append(f"{rules}, then 'udevadm trigger --subsystem-match=misc --sysname-match=iommu'")
        out.append(Finding("iommufd-dev", "warn", why[-1], remedies[-1]))
    else:
        out.append(Finding("iommufd-dev", "ok", f"{user} can open {node} read/write"))

    # CONFIG_VFIO_DEVICE_CDEV: /dev/vfio/devices/vfioN per VFIO device (Linux >= 6.6).
    cdevs, evidence = _cdev_support(host)
    if cdevs:
        out.append(Finding("iommufd-cdev", "ok", f"VFIO device cdevs (CONFIG_VFIO_DEVICE_CDEV): yes; evidence: {evidence}"))
    else:
        state = "no" if cdevs is False else "unknown"
        why.append(f"VFIO device cdevs (CONFIG_VFIO_DEVICE_CDEV): {state}; evidence: {evidence}")
        remedies.append("modprobe vfio-pci and check again" if cdevs is None
                        else "boot a kernel with CONFIG_VFIO_DEVICE_CDEV=y (Linux >= 6.6; it needs CONFIG_IOMMUFD)")  # fmt: skip
        out.append(Finding("iommufd-cdev", "warn", why[-1], remedies[-1]))

    # Per bound device: its cdev's node and whether the caller may open it.
    bound = _vfio_bound(host)
    if cdevs is not False:
        if not bound:
            out.append(Finding("iommufd-devices", "warn", "no device is bound to vfio-pci yet (no cdev to check)",
                               "hostrelay bind ADDR"))  # fmt: skip
        for bdf in bound:
            name = host.vfio_cdev(bdf)
            if name is None:
                detail = f"{bdf}: its vfio-dev device has no device number (no cdev)"
                out.append(Finding("iommufd-devices", "warn", detail, "rebind it: hostrelay unbind ADDR; hostrelay bind ADDR"))
                why.append(detail)
                continue
            cdev = host.cdev_node(name)
            if not cdev.exists():
                detail = f"{bdf}: {cdev} does not exist (is devtmpfs mounted on {host.dev}?)"
                out.append(Finding("iommufd-devices", "warn", detail, "mount -t devtmpfs devtmpfs /dev"))
            elif not _can_open(cdev):
                detail = f"{bdf}: {user} cannot open {cdev} read/write"
                out.append(Finding("iommufd-devices", "warn", detail,
                                   f"{rules}, then 'udevadm trigger --subsystem-match=vfio-dev'"))  # fmt: skip
            else:
                out.append(Finding("iommufd-devices", "ok", f"{bdf}: {cdev}, {user} can open it read/write"))
                continue
            why.append(detail)

    # This build: the extension's iommufd wrappers (cext/uapi.py found the headers).
    if build is None:
        why.append("this hostrelay build was not asked about iommufd")
        out.append(Finding("iommufd-build", "warn", why[-1]))
    elif not build.iommufd:
        why.append(f"this hostrelay build has no iommufd: {build.why or 'its extension lacks the wrappers'}")
        remedies.append("python3 cext/uapi.py (fetches headers with the iommufd uapi), then rebuild the extension")
        out.append(Finding("iommufd-build", "warn", why[-1], remedies[-1]))
    else:
        out.append(Finding("iommufd-build", "ok", "this hostrelay build has the iommufd wrappers"))

    if why:
        out.append(Finding("iommufd", "warn", "iommufd backend unavailable: " + "; ".join(why)
                           + " (the type1 backend does not need it)", "; ".join(dict.fromkeys(remedies))))  # fmt: skip
    else:
        with_cdev = sum(1 for b in bound if host.vfio_cdev(b) is not None)
        out.append(Finding("iommufd", "ok", f"iommufd backend ready: {node}, device cdevs, this build"
                           + (f"; {with_cdev} bound device(s) with an openable cdev" if with_cdev else "")))  # fmt: skip
    return out


def iommufd_ready(findings: list[Finding]) -> bool:
    """True when the ``iommufd`` summary finding says the iommufd backend is ready."""
    return any(f.check == "iommufd" and f.status == "ok" for f in findings)


def readiness(host: Host | None = None, *, guest_ram: int | None = None, containers: int | None = None,
              build: BuildSupport | None = None) -> list[Finding]:  # fmt: skip
    """Every finding, in a stable order: the type1 ones, then the iommufd ones.

    ``build`` says whether this hostrelay build has iommufd (the front end
    reads ``hostrelay.kernel.iommufd.AVAILABLE``); without it the iommufd
    backend is reported unavailable for want of an answer.
    """
    host = host or Host()
    return (_iommu(host) + _interrupt_remapping(host) + _modules(host) + _permissions(host)
            + _memlock(host, guest_ram, containers) + _iommufd(host, build))  # fmt: skip


def ready(findings: list[Finding]) -> bool:
    """True when no finding failed."""
    return all(f.status != "fail" for f in findings)
