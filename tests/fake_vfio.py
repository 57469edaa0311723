"""A fake VFIO host for the unit tier: /dev and /sys trees, and the kernel seam patched to a stateful fake.

The C data plane issues its ioctls itself, past the Python seam this
patches, so the containers are treated as Python-driven backends
(``is_native`` false): every MAP/UNMAP then goes through the seam (the path
a VMM's own backends take), which is what the unit tests pin.  The C path
is proven against the real kernel in the testbed tier.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from hostrelay.kernel import ioctl as k


def fake_vfio_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bdfs: Mapping[str, int], kernel: object,
                   ops: Iterable[str], *, reserved: str = "") -> tuple[Path, Path]:  # fmt: skip
    """``(dev_root, sysfs_root)`` with ``bdfs`` (address -> IOMMU group), ``ops`` of the seam served by ``kernel``."""
    import hostrelay.dataplane.handle as handle

    monkeypatch.setattr(handle, "is_native", lambda b: False)
    dev = tmp_path / "dev"
    sysfs = tmp_path / "sys"
    dev.mkdir()
    (dev / "vfio").touch()
    for bdf, group in bdfs.items():
        (dev / str(group)).touch()
        g = sysfs / "kernel" / "iommu_groups" / str(group)
        g.mkdir(parents=True, exist_ok=True)
        (g / "reserved_regions").write_text(reserved)
        d = sysfs / "bus" / "pci" / "devices" / bdf
        d.mkdir(parents=True)
        os.symlink(g, d / "iommu_group")
    monkeypatch.setattr(k, "get_api_version", lambda fd, path=None: k.const("VFIO_API_VERSION"))
    monkeypatch.setattr(k, "check_extension", lambda fd, ext, path=None: 1)
    monkeypatch.setattr(k, "group_get_status", lambda fd, path=None: k.const("VFIO_GROUP_FLAGS_VIABLE"))
    monkeypatch.setattr(k, "group_set_container", lambda g, c, path=None: None)
    monkeypatch.setattr(k, "set_iommu", lambda fd, t, path=None: None)
    monkeypatch.setattr(k, "group_get_device_fd", lambda g, name, path=None: os.open(dev / "vfio", os.O_RDWR))
    monkeypatch.setattr(k, "device_get_info", lambda fd, path=None: (0, 9, 5))
    for name in ops:
        monkeypatch.setattr(k, name, getattr(kernel, name))
    return dev, sysfs
