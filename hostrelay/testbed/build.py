"""Building the testbed's iommufd kernel: Debian's kernel source, configured for the testbed.

No Debian kernel enables ``CONFIG_IOMMUFD`` (checked up to 7.2 in sid), so the
iommufd testbed builds one, once per machine, from Debian's
``linux-source-6.12`` (bookworm-backports): ``x86_64_defconfig`` plus
:data:`FRAGMENT` (everything the testbed needs built in, ``CONFIG_MODULES=n``,
the real type1 container beside iommufd), ``make bzImage``.  The result goes to
``~/.cache/hostrelay/iommufd/<release>/``: the image, ``modules.builtin`` (the
testbed's module lookup then finds every driver built in and loads none) and
the ``.config``.  (The extension's iommufd headers come from a Debian package
instead, see ``cext/uapi.py``.)
The build's progress is printed as it goes: it takes about 11 minutes on two
cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hostrelay.testbed.kernel import KernelImage, TestbedSetupError, PrivateApt, apt_sources, cache_dir

__all__ = ["FRAGMENT", "SOURCE_PACKAGE", "BUILD_TOOLS", "build_iommufd_kernel", "cached_iommufd_kernel"]

# Debian's kernel source package; 6.12 is the first Debian kernel series whose
# iommufd has VFIO_DEVICE_ATTACH_IOMMUFD_PT replace (Linux >= 6.9) and
# IOMMU_IOAS_CHANGE_PROCESS (>= 6.12).
SOURCE_PACKAGE = "linux-source-6.12"
# What make needs beyond a C compiler (Debian package names).
BUILD_TOOLS = {"make": "make", "flex": "flex", "bison": "bison", "bc": "bc", "perl": "perl", "xz": "xz-utils"}

# Every line must survive ``make olddefconfig`` (checked after it runs: an "=y"
# that a missing dependency turned off fails the build, not the first boot).
FRAGMENT = """\
CONFIG_MODULES=n
CONFIG_PCI=y
CONFIG_PCI_MSI=y
CONFIG_VIRTIO=y
CONFIG_VIRTIO_PCI=y
CONFIG_NET_9P=y
CONFIG_NET_9P_VIRTIO=y
CONFIG_9P_FS=y
CONFIG_9P_FS_POSIX_ACL=y
CONFIG_OVERLAY_FS=y
CONFIG_TMPFS=y
CONFIG_DEVTMPFS=y
CONFIG_BLK_DEV_INITRD=y
CONFIG_RD_GZIP=y
CONFIG_BLK_DEV_NVME=y
CONFIG_IOMMU_SUPPORT=y
CONFIG_INTEL_IOMMU=y
CONFIG_INTEL_IOMMU_DEFAULT_ON=y
CONFIG_IRQ_REMAP=y
CONFIG_VIRTIO_IOMMU=y
CONFIG_IOMMUFD=y
CONFIG_IOMMUFD_VFIO_CONTAINER=n
CONFIG_VFIO=y
CONFIG_VFIO_GROUP=y
CONFIG_VFIO_CONTAINER=y
CONFIG_VFIO_IOMMU_TYPE1=y
CONFIG_VFIO_DEVICE_CDEV=y
CONFIG_VFIO_PCI=y
CONFIG_VFIO_PCI_CORE=y
CONFIG_DRM=n
CONFIG_SOUND=n
CONFIG_WIRELESS=n
CONFIG_WLAN=n
CONFIG_CFG80211=n
CONFIG_NFS_FS=n
CONFIG_NETFILTER=n
CONFIG_USB_SUPPORT=n
CONFIG_ETHERNET=n
CONFIG_FB=n
CONFIG_AGP=n
"""


def _stamp() -> str:
    """What a cached build was made from: a change to either means a rebuild."""
    return hashlib.sha256((SOURCE_PACKAGE + "\n" + FRAGMENT).encode()).hexdigest()[:16]


def cached_iommufd_kernel(cache: Path | None = None) -> KernelImage | None:
    """The iommufd kernel built earlier with today's fragment, if any."""
    root = (cache or cache_dir()) / "iommufd"
    for meta_file in sorted(root.glob("*/build.json")):
        meta = json.loads(meta_file.read_text())
        image = meta_file.parent / "bzImage"
        if meta.get("stamp") == _stamp() and image.exists():
            return KernelImage(image, meta_file.parent / "modules" / meta["release"], meta["release"],
                               f"built:{meta['package']}={meta['version']}+iommufd")  # fmt: skip
    return None


def _need_tools() -> None:
    missing = [pkg for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool) is None]
    if shutil.which("gcc") is None:
        missing.append("gcc")
    if missing:
        raise TestbedSetupError(f"building the iommufd kernel needs {', '.join(missing)}: apt-get install {' '.join(missing)}")


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise TestbedSetupError(f"{what} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")


def _check_config(config: Path) -> None:
    lines = set(config.read_text().splitlines())
    lost = []
    for line in FRAGMENT.splitlines():
        name, value = line.split("=", 1)
        if value == "n":
            if f"{name}=y" in lines or f"{name}=m" in lines:
                lost.append(line)
        elif line not in lines:
            lost.append(line)
    if lost:
        raise TestbedSetupError(f"the kernel config dropped {', '.join(lost)} (a dependency is missing)")


def _make_with_progress(tree: Path, jobs: int, log: Callable[[str], None] | None) -> None:
    """``make bzImage``, printing how far it is every 30 s (about 3000 objects in all)."""
    started = time.monotonic()
    proc = subprocess.Popen(["make", f"-j{jobs}", "bzImage"], cwd=tree, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    assert proc.stdout is not None
    tail: list[str] = []
    objects, last = 0, started
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        if line.lstrip().startswith(("CC ", "AS ", "LD ")):
            objects += 1
        now = time.monotonic()
        if log and now - last >= 30:
            log(f"testbed: building the iommufd kernel: {objects} objects, {int(now - started)} s")
            last = now
    if proc.wait() != 0:
        raise TestbedSetupError("make bzImage failed:\n" + "".join(tail))
    if log:
        log(f"testbed: iommufd kernel built in {int(time.monotonic() - started)} s ({objects} objects)")


def build_iommufd_kernel(cache: Path | None = None, *, log: Callable[[str], None] | None = None,
                         jobs: int | None = None) -> KernelImage:  # fmt: skip
    """The iommufd kernel: cached, or fetched and built now (first run only, progress on ``log``)."""
    cache = cache or cache_dir()
    found = cached_iommufd_kernel(cache)
    if found is not None:
        return found
    _need_tools()
    suites = [s for s in (apt_sources("-backports"),) if s]
    if not suites:
        raise TestbedSetupError("cannot find a Debian mirror in /etc/apt to fetch the kernel source from")
    root = cache / "iommufd"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=root) as tmp:
        work = Path(tmp)
        if log:
            log(f"testbed: fetching {SOURCE_PACKAGE} to build the iommufd kernel (first run only, ~11 min)")
        apt = PrivateApt(work, suites[0])
        apt.run("apt-get", "update")
        apt.run("apt-get", "download", SOURCE_PACKAGE)
        debs = sorted(work.glob(f"{SOURCE_PACKAGE}_*.deb"))
        if not debs:
            raise TestbedSetupError(f"apt-get download {SOURCE_PACKAGE} produced no .deb")
        version = debs[0].name.split("_")[1]
        _run(["dpkg-deb", "-x", str(debs[0]), str(work / "deb")], work, "dpkg-deb -x")
        tarballs = sorted((work / "deb" / "usr" / "src").glob("linux-source-*.tar.*"))
        if not tarballs:
            raise TestbedSetupError(f"{SOURCE_PACKAGE} holds no source tarball")
        _run(["tar", "xf", str(tarballs[0]), "-C", str(work)], work, "unpacking the kernel source")
        tree = next(p for p in work.iterdir() if p.is_dir() and p.name.startswith("linux-source-"))
        (work / "fragment.config").write_text(FRAGMENT)
        _run(["make", "x86_64_defconfig"], tree, "make x86_64_defconfig")
        _run(["scripts/kconfig/merge_config.sh", "-m", ".config", str(work / "fragment.config")], tree,
             "merge_config.sh")  # fmt: skip
        _run(["make", "olddefconfig"], tree, "make olddefconfig")
        _check_config(tree / ".config")
        _make_with_progress(tree, jobs or (os.cpu_count() or 1) + 1, log)
        release = (tree / "include" / "config" / "kernel.release").read_text().strip()
        target = root / release
        if target.exists():
            shutil.rmtree(target)
        (target / "modules" / release).mkdir(parents=True)
        shutil.copy2(tree / "arch" / "x86" / "boot" / "bzImage", target / "bzImage")
        shutil.copy2(tree / "modules.builtin", target / "modules" / release / "modules.builtin")
        shutil.copy2(tree / ".config", target / "config")
        (target / "build.json").write_text(json.dumps({"package": SOURCE_PACKAGE, "version": version,
                                                       "release": release, "stamp": _stamp()}))  # fmt: skip
    built = cached_iommufd_kernel(cache)
    assert built is not None
    return built
