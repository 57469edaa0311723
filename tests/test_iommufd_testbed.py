"""The iommufd testbed: the kernel built with IOMMUFD boots and offers both VFIO uAPIs.

Runs in the testbed booted with ``--iommufd`` (the kernel of
hostrelay.testbed.build, built on first use).  On a VFIO host it runs
directly and skips unless the host kernel has iommufd.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

pytestmark = pytest.mark.vfio(iommufd=True, edu=2)


def _char_device(path: Path) -> bool:
    return path.exists() and stat.S_ISCHR(path.stat().st_mode)


def test_dev_iommu_and_a_cdev_per_bound_device(edu_bdfs: list[str]) -> None:
    if not _char_device(Path("/dev/iommu")):
        pytest.skip("this kernel has no iommufd (/dev/iommu); the --iommufd testbed has")
    for bdf in edu_bdfs:
        # Linux >= 6.6 (VFIO_DEVICE_CDEV): a vfio-pci device gets
        # /sys/bus/pci/devices/<bdf>/vfio-dev/vfioN and /dev/vfio/devices/vfioN.
        names = os.listdir(f"/sys/bus/pci/devices/{bdf}/vfio-dev")
        assert len(names) == 1 and names[0].startswith("vfio"), names
        assert _char_device(Path("/dev/vfio/devices") / names[0])
    fd = os.open("/dev/iommu", os.O_RDWR)
    os.close(fd)


def test_the_legacy_container_stays_beside_iommufd(edu_bdfs: list[str]) -> None:
    # IOMMUFD_VFIO_CONTAINER=n: /dev/vfio/vfio is still type1's own container,
    # so every type1 test can run in this boot too.
    from hostrelay.kernel.vfio import Container, Group, group_of

    with Container() as c:
        c.attach(Group(group_of(edu_bdfs[0])))
        assert c.iommu_info().iova_pgsizes & 0x1000


PAGE = 0x1000
BASE = 0x100000


def _need_iommufd() -> None:
    from hostrelay.kernel import iommufd

    if not iommufd.AVAILABLE:
        pytest.fail("this build of hostrelay has no iommufd wrappers: cext/uapi.py found no iommufd headers")
    if not _char_device(Path("/dev/iommu")):
        pytest.skip("this kernel has no iommufd (/dev/iommu); the --iommufd testbed has")


def test_one_ioas_two_devices_shared_page_table_dma_then_blocked(edu_bdfs: list[str]) -> None:
    import mmap

    from hostrelay.drivers.edu import Edu
    from hostrelay.kernel.ioctl import buffer_address
    from hostrelay.kernel.iommufd import Iommufd, IommufdDevice

    _need_iommufd()
    m = mmap.mmap(-1, 2 * PAGE)
    pattern = bytes((i * 5 + 1) & 0xFF for i in range(2048))
    m[:2048] = pattern
    with Iommufd() as fd:
        ioas = fd.ioas()
        devs = [IommufdDevice(bdf, fd) for bdf in edu_bdfs[:2]]
        try:
            pts = [d.attach(ioas.id) for d in devs]
            # intel-iommu: both devices share one hardware page table (the kernel's choice).
            assert pts[0] == pts[1], pts
            ranges, align = ioas.iova_ranges()
            assert align <= PAGE and any(r.contains(BASE, 2 * PAGE) for r in ranges)
            assert not any(r.contains(0xFEE00000, PAGE) for r in ranges), "the MSI window is a hole"
            ioas.map(BASE, 2 * PAGE, buffer_address(m))
            for d in devs:
                edu = Edu(d)
                m[PAGE : PAGE + 2048] = bytes(2048)
                edu.to_device(BASE, 2048)
                edu.from_device(BASE + PAGE, 2048)
                assert m[PAGE : PAGE + 2048] == pattern, f"{d.name}: DMA through the IOAS"
            assert ioas.unmap(BASE, 2 * PAGE) == 2 * PAGE
            m[PAGE : PAGE + 2048] = bytes(2048)
            Edu(devs[0]).from_device(BASE + PAGE, 2048)
            assert m[PAGE : PAGE + 2048] == bytes(2048), "device write landed after IOMMU_IOAS_UNMAP"
        finally:
            for d in devs:
                d.close()


def test_replace_moves_a_device_between_ioases(edu_bdfs: list[str]) -> None:
    import mmap

    from hostrelay.drivers.edu import Edu
    from hostrelay.kernel.ioctl import buffer_address
    from hostrelay.kernel.iommufd import Iommufd, IommufdDevice

    _need_iommufd()
    old, new = mmap.mmap(-1, 2 * PAGE), mmap.mmap(-1, 2 * PAGE)
    old[:8], new[:8] = b"old  old", b"new  new"
    with Iommufd() as fd:
        a, b = fd.ioas(), fd.ioas()
        a.map(BASE, 2 * PAGE, buffer_address(old))
        b.map(BASE, 2 * PAGE, buffer_address(new))
        dev = IommufdDevice(edu_bdfs[0], fd)
        try:
            edu = Edu(dev)
            dev.attach(a.id)
            dev.attach(b.id)  # attached already: a replace (Linux >= 6.9), no detach in between
            edu.to_device(BASE, 8)  # reads page 0 of the IOAS it is in now...
            edu.from_device(BASE + PAGE, 8)  # ...and writes page 1
            assert new[PAGE : PAGE + 8] == b"new  new" and old[PAGE : PAGE + 8] == bytes(8)
            dev.detach()
            new[PAGE : PAGE + 8] = bytes(8)
            edu.from_device(BASE + PAGE, 8)
            assert new[PAGE : PAGE + 8] == bytes(8) and old[PAGE : PAGE + 8] == bytes(8), "a detached device reaches nothing"
        finally:
            dev.close()


def test_hw_info_of_an_edu_under_intel_iommu_is_vtd(edu_bdfs: list[str]) -> None:
    from hostrelay._native import lib
    from hostrelay.kernel.iommufd import Iommufd, IommufdDevice

    _need_iommufd()
    with Iommufd() as fd:
        dev = IommufdDevice(edu_bdfs[0], fd)
        try:
            info = dev.hw_info()  # bound is enough, no attach needed (Linux >= 6.6)
        finally:
            dev.close()
    # QEMU's intel-iommu is a VT-d unit: the driver reports its registers
    # (6.12 drivers/iommu/intel/iommu.c intel_iommu_hw_info).
    assert info.out_data_type == lib.IOMMU_HW_INFO_TYPE_INTEL_VTD and info.vtd, info
    assert info.cap_reg and info.ecap_reg is not None, info
    # CAP_REG.SAGAW (bits 12:8, VT-d 11.4.2) is never 0 for a unit that translates.
    assert (info.cap_reg >> 8) & 0x1F, hex(info.cap_reg)


def test_rlimit_mode_and_huge_pages_options() -> None:
    from hostrelay.kernel.errors import VfioError
    from hostrelay.kernel.iommufd import Iommufd

    _need_iommufd()
    with Iommufd() as fd:
        assert fd.rlimit_mode() == 0, "per-user accounting is the default (Linux >= 6.2)"
        fd.set_rlimit_mode(True)  # root has CAP_SYS_RESOURCE
        assert fd.rlimit_mode() == 1
        fd.set_rlimit_mode(False)
        assert fd.rlimit_mode() == 0
        ioas = fd.ioas()
        # Only an iommufd with no object may change mode (ioas.c iommufd_option_rlimit_mode).
        with pytest.raises(VfioError) as info:
            fd.set_rlimit_mode(True)
        assert info.value.errno == errno.EBUSY and info.value.operation == "IOMMU_OPTION"
        assert fd.rlimit_mode() == 0
        assert ioas.huge_pages() is True, "on by default"
        ioas.set_huge_pages(False)
        assert ioas.huge_pages() is False
        ioas.set_huge_pages(True)
        assert ioas.huge_pages() is True
    with Iommufd() as other:
        assert other.rlimit_mode() == 0, "the mode is per iommufd fd"


# A process of its own: iommufd charges nothing to RLIMIT_MEMLOCK for a process
# with CAP_IPC_LOCK (6.12 drivers/iommu/iommufd/pages.c iopt_alloc_pages:
# IOPT_PAGES_ACCOUNT_NONE), and the testbed's root has it, so the child drops
# it (tests/exhaustion_child.py drop_cap_ipc_lock, as test_vfio_relay.py's
# memlock child does).  VmPin is mm->pinned_vm, which iommufd raises for every
# page it pins (pages.c do_update_pinned, whatever the accounting mode); in the
# default per-user mode the RLIMIT_MEMLOCK check is against user->locked_vm,
# where nothing but iommufd-like pinning counts (mlock() does not).
_COPY_CHILD = r"""
import json, mmap, resource, sys
from exhaustion_child import drop_cap_ipc_lock, status_kib  # tests/ is on PYTHONPATH
from hostrelay.backends.type1 import has_cap_ipc_lock
from hostrelay.drivers.edu import Edu
from hostrelay.kernel.errors import VfioError
from hostrelay.kernel.ioctl import buffer_address
from hostrelay.kernel.iommufd import Iommufd, IommufdDevice

PAGE, BASE = 0x1000, 0x100000
drop_cap_ipc_lock()
assert not has_cap_ipc_lock()
m = mmap.mmap(-1, PAGE)
m[:8] = b"pinned!!"
va = buffer_address(m)
out = {}
with Iommufd() as fd:
    a, b = fd.ioas(), fd.ioas()
    devs = [IommufdDevice(bdf, fd) for bdf in sys.argv[1:3]]
    try:
        # Pages are pinned when an IOAS has a page table to fill: one device each.
        devs[0].attach(a.id)
        devs[1].attach(b.id)
        pin0 = status_kib("VmPin")
        a.map(BASE, PAGE, va)
        b.map(BASE, PAGE, va)
        out["map_map"] = status_kib("VmPin") - pin0
        out["unmap_mm"] = [a.unmap(BASE, PAGE), b.unmap(BASE, PAGE)]
        out["after_unmap"] = status_kib("VmPin") - pin0
        a.map(BASE, PAGE, va)
        b.copy_from(a, BASE, BASE + 0x10000, PAGE)
        out["map_copy"] = status_kib("VmPin") - pin0
        edu = Edu(devs[1])
        edu.to_device(BASE + 0x10000, 8)  # through the copy: the same page...
        m[:8] = bytes(8)
        edu.from_device(BASE + 0x10000, 8)  # ...both ways
        out["copy_dma"] = m[:8] == b"pinned!!"
        out["unmap_mc"] = [b.unmap(BASE + 0x10000, PAGE), a.unmap(BASE, PAGE)]
        # One page of RLIMIT_MEMLOCK: the first map uses it up, a second map of
        # the same page is refused, the copy is not charged.
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (PAGE, PAGE))
        a.map(BASE, PAGE, va)
        try:
            b.map(BASE, PAGE, va)
            out["second_map"] = "mapped"
        except VfioError as exc:
            out["second_map"] = exc.errno
            out["second_map_op"] = exc.operation
        b.copy_from(a, BASE, BASE, PAGE)
        out["copy_limited"] = "copied"
        out["pin_limited"] = status_kib("VmPin") - pin0
        out["unmap_limited"] = [b.unmap(BASE, PAGE), a.unmap(BASE, PAGE)]
    finally:
        for d in devs:
            d.close()
print(json.dumps(out))
"""


def test_ioas_copy_pins_and_charges_once_where_a_second_map_pins_again(edu_bdfs: list[str], tmp_path: Path) -> None:
    import json
    import subprocess
    import sys
    import textwrap

    _need_iommufd()
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(_COPY_CHILD))
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{root}:{root / 'tests'}")
    proc = subprocess.run([sys.executable, str(script), *edu_bdfs[:2]], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["map_map"] == 8, out  # KiB: the page pinned once per IOAS
    assert out["unmap_mm"] == [PAGE, PAGE] and out["after_unmap"] == 0, out
    assert out["map_copy"] == 4, out  # the copy shares the first IOAS's pin
    assert out["copy_dma"] and out["unmap_mc"] == [PAGE, PAGE], out
    assert out["second_map"] == errno.ENOMEM and out["second_map_op"] == "IOMMU_IOAS_MAP", out
    assert out["copy_limited"] == "copied" and out["pin_limited"] == 4, out
    assert out["unmap_limited"] == [PAGE, PAGE], out


def test_an_injected_map_failure_maps_nothing(edu_bdfs: list[str]) -> None:
    import mmap

    from hostrelay.drivers.edu import Edu
    from hostrelay.kernel.errors import VfioError
    from hostrelay.kernel.ioctl import Op, buffer_address, call_counts, counting, inject_failure
    from hostrelay.kernel.iommufd import Iommufd, IommufdDevice

    _need_iommufd()
    m = mmap.mmap(-1, 2 * PAGE)
    m[:8] = b"from mem"
    with Iommufd() as fd:
        ioas = fd.ioas()
        dev = IommufdDevice(edu_bdfs[0], fd)
        try:
            dev.attach(ioas.id)
            edu = Edu(dev)
            with counting(), inject_failure(Op.IOAS_MAP, err=errno.ENOMEM) as inj:
                with pytest.raises(VfioError) as info:
                    ioas.map(BASE, 2 * PAGE, buffer_address(m))
            assert inj.fired and inj.fd == fd.fd and call_counts()[Op.IOAS_MAP] == 1
            e = info.value
            assert e.errno == errno.ENOMEM and e.operation == "IOMMU_IOAS_MAP" and (e.iova, e.size) == (BASE, 2 * PAGE)
            edu.from_device(BASE + PAGE, 8)
            assert m[PAGE : PAGE + 8] == bytes(8), "a device write landed: the failed map mapped something"
            # The range is free (a FIXED_IOVA map over a mapping would be EEXIST)...
            ioas.map(BASE, 2 * PAGE, buffer_address(m))
            edu.to_device(BASE, 8)
            edu.from_device(BASE + PAGE, 8)
            assert m[PAGE : PAGE + 8] == b"from mem"
            # ...and holds exactly the real map.
            assert ioas.unmap(BASE, 2 * PAGE) == 2 * PAGE
        finally:
            dev.close()


def test_an_injected_attach_failure_leaves_the_device_detached_and_the_ioas_as_it_was(edu_bdfs: list[str]) -> None:
    import mmap

    from hostrelay.drivers.edu import Edu
    from hostrelay.kernel.errors import VfioError
    from hostrelay.kernel.ioctl import Op, buffer_address, inject_failure
    from hostrelay.kernel.iommufd import Iommufd, IommufdDevice

    _need_iommufd()
    m = mmap.mmap(-1, 2 * PAGE)
    m[:8] = b"attached"
    with Iommufd() as fd:
        ioas = fd.ioas()
        ioas.map(BASE, 2 * PAGE, buffer_address(m))
        dev = IommufdDevice(edu_bdfs[0], fd)
        try:
            edu = Edu(dev)
            ranges = ioas.iova_ranges()
            with inject_failure(Op.DEVICE_ATTACH, err=errno.EBUSY) as inj:
                with pytest.raises(VfioError) as info:
                    dev.attach(ioas.id)
            assert inj.fired and inj.fd == dev.fd
            assert info.value.errno == errno.EBUSY and info.value.operation == "VFIO_DEVICE_ATTACH_IOMMUFD_PT"
            assert dev.pt_id is None
            # No device narrowed the IOAS (an attach cuts out the MSI window)...
            assert ioas.iova_ranges() == ranges
            # ...and a bound, unattached device reaches nothing (blocked since bind).
            edu.from_device(BASE + PAGE, 8)
            assert m[PAGE : PAGE + 8] == bytes(8)
            dev.attach(ioas.id)
            assert ioas.iova_ranges() != ranges, "the real attach narrows the ranges"
            edu.to_device(BASE, 8)
            edu.from_device(BASE + PAGE, 8)
            assert m[PAGE : PAGE + 8] == b"attached"
            dev.detach()
        finally:
            dev.close()
        assert ioas.unmap(BASE, 2 * PAGE) == 2 * PAGE
