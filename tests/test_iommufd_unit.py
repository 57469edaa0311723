"""The iommufd kernel seam without a kernel that has it: build, lookups, errors."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from hostrelay.kernel import iommufd
from hostrelay.kernel.errors import VfioError


def test_the_extension_has_the_iommufd_wrappers_where_the_headers_had_them() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cext"))
    from uapi import find

    assert iommufd.AVAILABLE == (find() is not None)


def test_cdev_of_reads_the_vfio_dev_directory(tmp_path: Path) -> None:
    d = tmp_path / "bus" / "pci" / "devices" / "0000:00:03.0" / "vfio-dev" / "vfio2"
    d.mkdir(parents=True)
    assert iommufd.cdev_of("0000:00:03.0", tmp_path) == "vfio2"
    with pytest.raises(VfioError) as info:
        iommufd.cdev_of("0000:00:04.0", tmp_path)
    assert info.value.errno == errno.ENODEV and "vfio-dev" in str(info.value)


def test_opening_a_missing_dev_iommu_is_a_typed_error(tmp_path: Path) -> None:
    if not iommufd.AVAILABLE:
        pytest.skip("this build has no iommufd wrappers (no iommufd headers when it was built)")
    with pytest.raises(VfioError) as info:
        iommufd.Iommufd(tmp_path / "iommu")
    assert info.value.errno == errno.ENOENT and info.value.operation == "open"


def test_unavailable_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iommufd, "AVAILABLE", False)
    with pytest.raises(VfioError) as info:
        iommufd.Iommufd()
    assert info.value.errno == errno.ENOSYS and "cext/uapi.py" in str(info.value)
