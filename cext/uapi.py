"""Kernel uapi headers with iommufd, from a Debian package, for the extension's build.

Debian 12's ``linux-libc-dev`` (6.1) has no ``<linux/iommufd.h>`` and its
``<linux/vfio.h>`` lacks the VFIO device-cdev ioctls (``VFIO_DEVICE_BIND_IOMMUFD``,
Linux >= 6.6).  bookworm-backports' ``linux-libc-dev`` (6.12) has both: this
script downloads it with a private apt state (nothing on the host changes) and
unpacks it under ``~/.cache/hostrelay/uapi/``, where ``cext/build_native.py``
looks.  ``./dev`` runs it before building; without network or on another
distribution it says so and the build goes on with the type1 backend alone.

    python3 cext/uapi.py      # prints the include directory, or why there is none
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def has_iommufd(include: Path) -> bool:
    """True if ``include`` holds the iommufd uapi and the VFIO cdev ioctls."""
    vfio = include / "linux" / "vfio.h"
    return (include / "linux" / "iommufd.h").exists() and vfio.exists() and "VFIO_DEVICE_BIND_IOMMUFD" in vfio.read_text()


def cache_root() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hostrelay" / "uapi"


def find() -> Path | None:
    """The include directory a build should use for iommufd, or ``None``."""
    if has_iommufd(Path("/usr/include")):
        return Path("/usr/include")
    for include in sorted(cache_root().glob("*/usr/include"), reverse=True):
        if has_iommufd(include):
            return include
    return None


def fetch() -> Path:
    """Download and unpack bookworm-backports' linux-libc-dev into the cache."""
    sys.path.insert(0, str(ROOT))
    from hostrelay.testbed.kernel import PrivateApt, apt_sources

    sources = apt_sources("-backports")
    if not sources:
        raise RuntimeError("no Debian mirror in /etc/apt to fetch linux-libc-dev from")
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="apt-", dir=root) as tmp:
        apt = PrivateApt(Path(tmp), sources)
        apt.run("apt-get", "update")
        apt.run("apt-get", "download", "linux-libc-dev")
        debs = sorted(Path(tmp).glob("linux-libc-dev_*.deb"))
        if not debs:
            raise RuntimeError("apt-get download linux-libc-dev produced no .deb")
        target = root / debs[0].name.removesuffix(".deb")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(target)], check=True)
    include = target / "usr" / "include"
    if not has_iommufd(include):
        raise RuntimeError(f"{debs[0].name} has no iommufd uapi")
    return include


def main() -> int:
    found = find()
    if found is None:
        try:
            found = fetch()
        except Exception as exc:  # any failure: the build goes on without iommufd
            print(f"uapi: no iommufd headers ({exc}); the build has the type1 backend only", file=sys.stderr)
            return 0
    print(found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
