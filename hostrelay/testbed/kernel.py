"""Finding a kernel for the testbed: given, the host's own, or a Debian package.

The testbed needs a kernel with VFIO (``vfio``, ``vfio_iommu_type1``,
``vfio-pci``), a 9p root (``9pnet_virtio``, ``9p``), ``overlay``, ``nvme`` and,
for ``--iommu virtio``, ``virtio_iommu``.  Each may be built in or a module.
Order of preference: ``--kernel``/``--modules`` as given; the host's ``/boot``
and ``/lib/modules`` when they have all of the above; else a Debian kernel
package fetched with ``apt-get download`` into ``~/.cache/hostrelay/`` and
unpacked (never installed).  Later boots reuse the cache without the network.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = [
    "KernelImage",
    "TestbedSetupError",
    "cache_dir",
    "find_kernel",
    "required_modules",
]


class TestbedSetupError(RuntimeError):
    """The testbed cannot be prepared; the message says what to install or pass."""

    __test__ = False  # not a pytest test class


# Modules the guest loads, by module name (``-`` and ``_`` are equivalent).
# Dependencies are found from each module's own ``depends=`` modinfo string.
BASE_MODULES = (
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "overlay",
    "vfio",
    "vfio_iommu_type1",
    "vfio_pci",
    "nvme",
)
VIRTIO_IOMMU_MODULES = ("virtio_iommu",)


def required_modules(iommu: str) -> tuple[str, ...]:
    """The module names the guest needs for an IOMMU flavour (before dependencies)."""
    return (VIRTIO_IOMMU_MODULES if iommu == "virtio" else ()) + BASE_MODULES


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/hostrelay`` (default ``~/.cache/hostrelay``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hostrelay"


def _norm(name: str) -> str:
    return name.replace("-", "_")


@dataclass(frozen=True)
class KernelImage:
    """A bootable kernel and the tree of modules built for it."""

    vmlinuz: Path
    modules_dir: Path  # the ``/lib/modules/<release>`` directory
    release: str
    origin: str  # "given", "host" or "debian:<package>=<version>"

    def builtin(self) -> set[str]:
        """Names of modules compiled into the kernel (``modules.builtin``)."""
        path = self.modules_dir / "modules.builtin"
        if not path.exists():
            return set()
        return {_norm(Path(line.strip()).name.split(".ko")[0]) for line in path.read_text().splitlines() if line.strip()}

    def module_files(self) -> dict[str, Path]:
        """Map module name → its file (``.ko``, ``.ko.xz``, ``.ko.gz`` or ``.ko.zst``)."""
        found: dict[str, Path] = {}
        for path in self.modules_dir.rglob("*.ko*"):
            name = path.name.split(".ko")[0]
            found.setdefault(_norm(name), path)
        return found

    def has_modules(self, names: tuple[str, ...]) -> list[str]:
        """Return the names among ``names`` that are neither built in nor present."""
        builtin = self.builtin()
        files = self.module_files() if self.modules_dir.is_dir() else {}
        return [n for n in names if _norm(n) not in builtin and _norm(n) not in files]


def read_module(path: Path) -> bytes:
    """The uncompressed bytes of a kernel module file."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise TestbedSetupError(f"{path} is zstd-compressed: install the 'zstd' package")
        return subprocess.run([zstd, "-dc", str(path)], check=True, capture_output=True).stdout
    return data


_DEPENDS = re.compile(rb"(?:^|\0)depends=([^\0]*)\0")


def module_depends(ko: bytes) -> list[str]:
    """The ``depends=`` list of a module's ``.modinfo`` (what depmod would read)."""
    match = _DEPENDS.search(ko)
    if match is None or not match.group(1):
        return []
    return [_norm(d) for d in match.group(1).decode().split(",") if d]


def resolve_load_order(kernel: KernelImage, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """Modules to insmod, dependencies first, as (name, uncompressed bytes).

    Built-in modules are skipped; a wanted module that exists nowhere is an error.
    """
    builtin = kernel.builtin()
    files = kernel.module_files()
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = _norm(name)
        if name in seen or name in builtin:
            return
        if name in chain:
            raise TestbedSetupError(f"module dependency loop: {' -> '.join(chain + (name,))}")
        path = files.get(name)
        if path is None:
            raise TestbedSetupError(
                f"kernel {kernel.release} ({kernel.origin}) has no module {name!r}"
                + (f" (needed by {chain[-1]})" if chain else "")
            )
        data = read_module(path)
        for dep in module_depends(data):
            visit(dep, chain + (name,))
        seen.add(name)
        order.append((name, data))

    for want in wanted:
        visit(want, ())
    return order


def _host_kernel() -> KernelImage | None:
    release = platform.release()
    vmlinuz = Path("/boot") / f"vmlinuz-{release}"
    modules = Path("/lib/modules") / release
    if not vmlinuz.is_file() or not os.access(vmlinuz, os.R_OK) or not modules.is_dir():
        return None
    return KernelImage(vmlinuz, modules, release, "host")


def _kernel_from_tree(root: Path, origin: str) -> KernelImage | None:
    """A kernel unpacked from a ``linux-image-*`` package under ``root``."""
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if not images:
        return None
    release = images[-1].name[len("vmlinuz-") :]
    for mods in (root / "lib" / "modules" / release, root / "usr" / "lib" / "modules" / release):
        if mods.is_dir():
            return KernelImage(images[-1], mods, release, origin)
    return None


def apt_sources(suite_suffix: str) -> list[str]:
    """One-line apt sources for ``<codename><suite_suffix>`` on the system's own mirrors.

    The mirror URIs come from the system's apt configuration so this works
    behind whatever mirror the machine is set up with.
    """
    codename = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                codename = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    if not codename:
        return []
    uris: list[str] = []
    sources_dir = Path("/etc/apt/sources.list.d")
    candidates = [Path("/etc/apt/sources.list")] + (sorted(sources_dir.glob("*.sources")) + sorted(sources_dir.glob("*.list")) if sources_dir.is_dir() else [])
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("URIs:"):
                uris += line.split()[1:]
            elif line.startswith("deb "):
                parts = [p for p in line.split() if not p.startswith("[")]
                if len(parts) >= 2:
                    uris.append(parts[1])
    debian = [u for u in dict.fromkeys(uris) if u.rstrip("/").endswith("/debian")]
    return [f"deb {u} {codename}{suite_suffix} main" for u in debian]


class PrivateApt:
    """apt-get with a private sources list and state, so nothing on the host changes."""

    def __init__(self, workdir: Path, sources: list[str]) -> None:
        self.workdir = workdir
        (workdir / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (workdir / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        (workdir / "sources.list").write_text("\n".join(sources) + "\n")
        self.options = [
            "-o", f"Dir::Etc::SourceList={workdir / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={workdir / 'lists'}",
            "-o", f"Dir::Cache={workdir / 'cache'}",
            "-o", "Debug::NoLocking=1",
            "-o", "APT::Sandbox::User=root" if os.geteuid() == 0 else "APT::Sandbox::User=",
        ]  # fmt: skip

    def run(self, tool: str, *args: str) -> str:
        exe = shutil.which(tool)
        if exe is None:
            raise TestbedSetupError(f"{tool} not found: a Debian/Ubuntu host with apt is needed to fetch a kernel, or pass --kernel/--modules")
        proc = subprocess.run([exe, "-q", *self.options, *args], cwd=self.workdir, capture_output=True, text=True)
        if proc.returncode != 0:
            raise TestbedSetupError(f"{tool} {' '.join(args)} failed:\n{proc.stderr.strip()}")
        return proc.stdout


def fetch_debian_kernel(cache: Path | None = None, *, log: Callable[[str], None] | None = None) -> KernelImage:
    """Download and unpack the newest backports ``linux-image`` into the cache.

    Backports first: its 6.x kernels have ``virtio_iommu`` as a module, which the
    stable 6.1 kernel lacks.  Falls back to the stable suite.
    """
    cache = cache or cache_dir()
    kernels = cache / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    suites = [s for s in (apt_sources("-backports"), apt_sources("")) if s]
    if not suites:
        raise TestbedSetupError(
            "cannot find a Debian mirror in /etc/apt to fetch a kernel from; pass --kernel and --modules"
        )
    if log:
        log("testbed: fetching a Debian kernel package (first run only)")
    with tempfile.TemporaryDirectory(prefix="apt-", dir=cache) as tmp:
        # One suite at a time: with both listed, apt's pinning would prefer the
        # stable suite's 6.1 kernel, which has no virtio-iommu driver.
        error: TestbedSetupError | None = None
        for sources in suites:
            apt = PrivateApt(Path(tmp), sources)
            try:
                apt.run("apt-get", "update")
                depends = apt.run("apt-cache", "depends", "linux-image-amd64")
                break
            except TestbedSetupError as exc:
                error = exc
        else:
            assert error is not None
            raise error
        match = re.search(r"Depends:\s*(linux-image-[^\s<>]+)", depends)
        if match is None:
            raise TestbedSetupError(f"linux-image-amd64 has no linux-image dependency:\n{depends}")
        package = match.group(1)
        apt.run("apt-get", "download", package)
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not debs:
            raise TestbedSetupError(f"apt-get download {package} produced no .deb")
        version = debs[0].name.split("_")[1]
        target = kernels / f"{package}_{version}"
        unpack = Path(tmp) / "unpack"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpack)], check=True)
        if target.exists():
            shutil.rmtree(target)
        # Keep only what boots: the image and the module tree (drop firmware, docs).
        (target / "boot").mkdir(parents=True)
        for img in (unpack / "boot").glob("vmlinuz-*"):
            shutil.copy2(img, target / "boot" / img.name)
        for sub in ("lib/modules", "usr/lib/modules"):
            if (unpack / sub).is_dir():
                shutil.copytree(unpack / sub, target / sub, symlinks=True)
        (target / "origin.json").write_text(json.dumps({"package": package, "version": version}))
    kernel = _kernel_from_tree(target, f"debian:{package}={version}")
    if kernel is None:
        raise TestbedSetupError(f"{package} has no vmlinuz")
    return kernel


def _cached_kernels(cache: Path) -> list[KernelImage]:
    out = []
    for origin_file in sorted((cache / "kernels").glob("*/origin.json")):
        meta = json.loads(origin_file.read_text())
        kernel = _kernel_from_tree(origin_file.parent, f"debian:{meta['package']}={meta['version']}")
        if kernel is not None:
            out.append(kernel)
    return out


def find_kernel(
    iommu: str,
    *,
    kernel: Path | None = None,
    modules: Path | None = None,
    cache: Path | None = None,
    iommufd: bool = False,
    log: Callable[[str], None] | None = None,
) -> KernelImage:
    """Pick the kernel for a testbed boot (see the module docstring for the order).

    ``iommufd`` picks the kernel built with IOMMUFD (:mod:`hostrelay.testbed.build`),
    building it on first use, unless ``kernel`` is given.
    """
    wanted = required_modules(iommu)
    if kernel is not None:
        if modules is None:
            raise TestbedSetupError("--kernel needs --modules (the /lib/modules/<release> tree built with it)")
        image = KernelImage(Path(kernel), Path(modules), Path(modules).name, "given")
        missing = image.has_modules(wanted)
        if missing:
            raise TestbedSetupError(f"the given kernel lacks {', '.join(missing)}")
        return image
    if iommufd:
        from hostrelay.testbed.build import build_iommufd_kernel

        built = build_iommufd_kernel(cache, log=log)
        missing = built.has_modules(wanted)
        if missing:
            raise TestbedSetupError(f"{built.origin} lacks {', '.join(missing)}")
        return built
    host = _host_kernel()
    if host is not None and not host.has_modules(wanted):
        return host
    cache = cache or cache_dir()
    for cached in reversed(_cached_kernels(cache)):
        if not cached.has_modules(wanted):
            return cached
    fetched = fetch_debian_kernel(cache, log=log)
    missing = fetched.has_modules(wanted)
    if missing:
        raise TestbedSetupError(f"{fetched.origin} lacks {', '.join(missing)}; pass --kernel/--modules")
    return fetched

