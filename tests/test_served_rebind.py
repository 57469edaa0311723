"""The guest lets go of hostrelay's virtio-iommu and takes it again: driver unbind/rebind, module unload/reload.

Its own boot (the marker's ``hostrelay.boot=rebind`` kernel argument, which
nothing reads, keeps it apart from tests/test_served_iommu.py's boot in case
it takes the guest down): hostrelay serve is the only IOMMU of a Linux 6.12
guest on QEMU 11.1 (hostrelay.testbed.served).

What Linux 6.12 allows (Debian's 6.12.95, ``virtio_iommu`` a module, vermagic
``mod_unload``), from drivers/iommu/virtio-iommu.c and drivers/iommu/iommu.c:

- ``virtio_iommu_drv`` sets no ``suppress_bind_attrs``, so the driver core
  gives ``/sys/bus/virtio/drivers/virtio_iommu/{unbind,bind}``.  Unbind runs
  ``viommu_remove``: ``iommu_device_sysfs_remove`` (the ``/sys/class/iommu``
  entry goes, and ``iommu->dev`` becomes NULL), ``iommu_device_unregister``
  (every endpoint still probed is released: ``remove_iommu_group`` →
  ``iommu_deinit_device`` → ``iommu_device_unlink``), then
  ``virtio_reset_device`` and ``del_vqs``, and logs "device removed".  Bind
  runs ``viommu_probe`` again ("input address: 64 bits").
- But the kernel allows the unbind only with no endpoint probed: with one
  (the edu in its group, with or without a driver) ``iommu_device_unlink``
  dereferences the ``iommu->dev`` that ``iommu_device_sysfs_remove`` has just
  cleared, and the guest oopses (seen here on 6.12.95: "BUG: kernel NULL
  pointer dereference, address: 0000000000000030", RIP
  ``sysfs_remove_link_from_group``, called from ``iommu_deinit_device`` ←
  ``remove_iommu_group`` ← ``iommu_device_unregister`` ← ``viommu_remove`` ←
  ``unbind_store``; the unbind never returns and the VM cannot power off).
  So the tests release the endpoint first, the way the kernel does it
  safely: PCI remove (``iommu_release_device`` while the IOMMU's sysfs
  device still exists), and a PCI rescan brings the edu back afterwards.
- There is no per-queue reset here: virtio 1.2's VIRTIO_F_RING_RESET is not
  offered (hostrelay.relay), so a queue reset is the device reset above.
  QEMU 11.1's vhost-user-base turns the guest's status write of 0 into
  ``vhost_dev_stop``: GET_VRING_BASE per ring (no RESET_DEVICE, which the log
  shows), which hostrelay's back end takes as a device reset
  (hostrelay.frontends.vhost_user); the next DRIVER_OK sends SET_MEM_TABLE
  and SET_VRING_* for both rings again.
- The module: ``iommu_init_device`` takes ``try_module_get(ops->owner)`` for
  each endpoint it probes and ``iommu_deinit_device`` drops it, so while an
  endpoint is probed ``delete_module`` fails with EWOULDBLOCK (EAGAIN,
  ``kernel/module/main.c`` ``try_stop_module``; what rmmod reports as "in
  use") -- also after the endpoint's own driver unbound, because the
  endpoint stays probed (in its group) until it is released.  That refusal
  is what keeps the module path clear of the oops above.  Once the endpoint
  is removed the count is 0; unloading runs ``viommu_remove`` (the device
  reset) and loading the same .ko probes the device again.

The guest has no kmod (its root is the host's over 9p), so the module is
unloaded and loaded with the delete_module and init_module system calls,
from the .ko the testbed unpacked into its cache (hostrelay.testbed.kernel).
On the host, after the boot, the server's recording of this boot (two
guest-driven resets among its requests) replays to the same replies.
"""

from __future__ import annotations

import ctypes
import errno
import lzma
import os
import re
import time
from pathlib import Path

import pytest

from served_guest import BDF, EP, IOMMU_BDF, bind_edu, dmesg, scenario_1, served_log, served_log_full, sysfs, wait_for_log

BOOT_ARG = "hostrelay.boot=rebind"  # a module parameter nothing reads: only to have this boot to itself
REBIND = pytest.mark.vfio(served_iommu=True, served_edu=1, kernel_args=(BOOT_ARG,))
DRIVER = sysfs("bus/virtio/drivers/virtio_iommu")
MODULE = sysfs("module/virtio_iommu")
# Linux 6.12 viommu_remove / viommu_probe's dev_info lines.
REMOVED_RE = r"virtio_iommu {v}: device removed"
PROBED_RE = r"virtio_iommu {v}: input address: 64 bits"
# hostrelay.frontends.vhost_user's serve -v lines.
RESET_RE = r"vhost-user: GET_VRING_BASE of ring \d: rings stopped, device reset"
STARTED_RE = r"vhost-user: ring {i} started: SET_VRING_NUM \d+, SET_VRING_BASE 0, SET_VRING_ADDR"
# x86_64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl).
SYS_INIT_MODULE, SYS_DELETE_MODULE = 175, 176


def virtio_dev() -> str:
    """The virtio device (``virtioN``) on our virtio-iommu function."""
    (v,) = [p.name for p in sysfs(f"bus/pci/devices/{IOMMU_BDF}").iterdir() if re.fullmatch(r"virtio\d+", p.name)]
    return v


def iommus() -> list[str]:
    return sorted(p.name for p in sysfs("class/iommu").iterdir())


def refcnt() -> int:
    return int((MODULE / "refcnt").read_text())


def wait_for_server(pattern: str, since: int, count: int = 1, timeout: float = 5.0) -> str:
    """The server's log after offset ``since`` once ``pattern`` occurs ``count`` times (or at ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        text = served_log_full()[since:]
        if len(re.findall(pattern, text)) >= count or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def unbind_edu() -> None:
    """The edu off vfio-pci (driver_override stays, so bind_edu gives it back to vfio-pci)."""
    if sysfs(f"bus/pci/devices/{BDF}/driver").exists():
        (sysfs(f"bus/pci/devices/{BDF}/driver") / "unbind").write_text(BDF)
    assert not sysfs(f"bus/pci/devices/{BDF}/driver").exists()


def release_edu() -> None:
    """The edu's driver unbound and the function removed: the IOMMU releases it (iommu_release_device)."""
    unbind_edu()
    (sysfs(f"bus/pci/devices/{BDF}") / "remove").write_text("1")
    assert not sysfs(f"bus/pci/devices/{BDF}").exists()
    assert list(sysfs(f"class/iommu/{IOMMU_BDF}/devices").iterdir()) == [], "no endpoint left on the IOMMU"
    assert refcnt() == 0, "the released endpoint's module reference was dropped"


def rescan_edu() -> None:
    """A PCI rescan brings the removed edu back (QEMU still has the vfio-user function)."""
    sysfs("bus/pci/rescan").write_text("1")
    assert sysfs(f"bus/pci/devices/{BDF}").exists(), f"the rescan did not bring the edu back\n{served_log()}"


def _syscall(number: int, *args: object) -> int:
    """A system call through libc; 0, or the errno it failed with."""
    libc = ctypes.CDLL(None, use_errno=True)
    return 0 if libc.syscall(number, *args) == 0 else ctypes.get_errno()


def delete_module(name: str) -> int:
    """delete_module(2) with O_NONBLOCK (what rmmod does): 0 or the errno."""
    return _syscall(SYS_DELETE_MODULE, name.encode(), os.O_NONBLOCK)


def init_module(image: bytes) -> int:
    """init_module(2) with no parameters: 0 or the errno."""
    return _syscall(SYS_INIT_MODULE, image, ctypes.c_ulong(len(image)), b"")


def module_image() -> bytes | None:
    """The running kernel's virtio-iommu.ko (decompressed), from the testbed's kernel cache; None if absent."""
    from hostrelay.testbed.kernel import cache_dir

    pattern = f"kernels/*/lib/modules/{os.uname().release}/kernel/drivers/iommu/virtio-iommu.ko*"
    for path in sorted(cache_dir().glob(pattern)):
        data = path.read_bytes()
        return lzma.decompress(data) if path.suffix == ".xz" else data
    return None


def assert_probed_again(v: str, dmesg_at: int, log_at: int) -> None:
    """The driver probed ``v`` again (guest) and both rings were set up again (server)."""
    log = wait_for_log(PROBED_RE.format(v=v), dmesg_at)
    assert re.search(PROBED_RE.format(v=v), log), log
    assert iommus() == [IOMMU_BDF]
    assert (sysfs(f"bus/virtio/devices/{v}") / "driver").resolve().name == "virtio_iommu"
    text = wait_for_server(r"ring 1 started", log_at)
    for i in (0, 1):
        assert re.search(STARTED_RE.format(i=i), text), f"ring {i} was not set up again:\n{text}"
    assert "SET_MEM_TABLE: the same" in text, text  # QEMU re-sent the table; the mapping was kept


def assert_device_works_again() -> None:
    """The edu on vfio-pci gets a group of our IOMMU again, with the PROBE reserved regions, and scenario 1 passes."""
    from hostrelay.model.reality import DEFAULT_MSI_WINDOW

    group = bind_edu(BDF)
    assert os.readlink(sysfs(f"bus/pci/devices/{BDF}/iommu")).endswith(f"{IOMMU_BDF}/{virtio_dev()}/iommu/{IOMMU_BDF}")
    lo, hi = DEFAULT_MSI_WINDOW
    assert sysfs(f"kernel/iommu_groups/{group}/reserved_regions").read_text().splitlines() == [f"{lo:#018x} {hi:#018x} msi"]
    scenario_1(BDF, EP)


@REBIND
def test_unbinding_the_driver_resets_the_device_and_a_rebind_serves_the_guest_again() -> None:
    assert BOOT_ARG in Path("/proc/cmdline").read_text()
    v = virtio_dev()
    # Linux 6.12 gives the bind attributes (virtio_iommu_drv has no suppress_bind_attrs).
    assert (DRIVER / "unbind").exists() and (DRIVER / "bind").exists()
    assert (DRIVER / v).exists()
    bind_edu(BDF)
    scenario_1(BDF, EP)  # it works before
    unbind_edu()
    assert sysfs(f"bus/pci/devices/{BDF}/iommu_group").exists(), "an endpoint stays probed without its driver"
    assert refcnt() == 1
    # Unbinding the IOMMU now would oops the guest (module docstring): release the edu first.
    release_edu()

    dmesg_at, log_at = len(dmesg()), len(served_log_full())
    (DRIVER / "unbind").write_text(v)
    # The guest: viommu_remove ran, the IOMMU is gone from sysfs and released the edu.
    assert not (DRIVER / v).exists() and not (sysfs(f"bus/virtio/devices/{v}") / "driver").exists()
    assert iommus() == []
    log = wait_for_log(REMOVED_RE.format(v=v), dmesg_at)
    assert re.search(REMOVED_RE.format(v=v), log), log
    # The host: the virtio reset reached the back end as GET_VRING_BASE (QEMU 11.1's
    # vhost_dev_stop), not RESET_DEVICE; hostrelay reset the device once.
    text = wait_for_server(RESET_RE, log_at)
    assert len(re.findall(RESET_RE, text)) == 1, text
    assert "RESET_DEVICE" not in text and "disconnect" not in text, text

    dmesg_at, log_at = len(dmesg()), len(served_log_full())
    (DRIVER / "bind").write_text(v)
    assert_probed_again(v, dmesg_at, log_at)
    rescan_edu()
    assert_device_works_again()


@REBIND
def test_the_module_is_held_by_a_probed_endpoint_then_unloads_and_reloads() -> None:
    assert (MODULE / "initstate").read_text().strip() == "live", "virtio_iommu is a module in this kernel"
    if os.uname().machine != "x86_64":
        pytest.skip("the system call numbers here are x86_64's")
    image = module_image()
    if image is None:
        pytest.skip("no virtio-iommu.ko for this kernel in the testbed's cache: it could not be loaded again")
    v = virtio_dev()
    bind_edu(BDF)
    # One reference per probed endpoint (iommu_init_device's try_module_get): refused.
    assert refcnt() == 1
    assert delete_module("virtio_iommu") == errno.EWOULDBLOCK
    unbind_edu()
    assert refcnt() == 1 and delete_module("virtio_iommu") == errno.EWOULDBLOCK, "the endpoint is still probed"
    assert MODULE.exists() and iommus() == [IOMMU_BDF]
    assert_device_works_again()  # the refusals changed nothing

    release_edu()
    dmesg_at, log_at = len(dmesg()), len(served_log_full())
    assert delete_module("virtio_iommu") == 0
    assert not MODULE.exists() and iommus() == []
    log = wait_for_log(REMOVED_RE.format(v=v), dmesg_at)
    assert re.search(REMOVED_RE.format(v=v), log), log
    text = wait_for_server(RESET_RE, log_at)
    assert len(re.findall(RESET_RE, text)) == 1 and "RESET_DEVICE" not in text, text

    dmesg_at, log_at = len(dmesg()), len(served_log_full())
    assert init_module(image) == 0
    assert MODULE.exists()
    assert_probed_again(v, dmesg_at, log_at)
    rescan_edu()
    assert_device_works_again()


# --- on the host, after the boot: the recording of this boot replays -------------------------------


@pytest.mark.skipif(bool(os.environ.get("HOSTRELAY_TESTBED")), reason="reads the boot's recording on the host")
def test_the_recording_with_the_guest_driven_resets_replays(request: pytest.FixtureRequest) -> None:
    from hostrelay.frontends.record import read_records, replay
    from hostrelay.testbed.served import RECORD_NAME

    runner = request.config.pluginmanager.get_plugin("hostrelay-testbed-runner")
    if runner is None:
        pytest.skip("no testbed runner here (a VFIO host runs the guest tests itself)")
    keys = [k for k, items in runner.groups.items() if k.served_iommu and BOOT_ARG in k.kernel_args]
    if not keys:
        pytest.skip("select this module's guest tests too: the recording is of their boot")
    files = runner.files_for(keys[0])
    lines = files.get(RECORD_NAME, b"").decode().splitlines()
    assert lines, f"the boot returned no recording; files: {sorted(files)}\n{files.get('served.log', b'').decode()[-3000:]}"
    log = files.get("served.log", b"").decode()
    # Two guest-driven resets (unbind, module unload) and the poweroff's (the disconnect after it logs none).
    assert len(re.findall(RESET_RE, log)) == 3, log[-3000:]
    assert len(re.findall(STARTED_RE.format(i=0), log)) == 3, "the rings started at boot, after the rebind and after the reload"
    objs = list(read_records(lines))
    attaches = sum(1 for o in objs if o["kind"] == "request" and o["request"][:2] == "01")  # VIRTIO_IOMMU_T_ATTACH
    result = replay(lines)
    print(f"FIGURE replayed {result.requests} live requests ({attaches} ATTACH), {result.resets} resets")
    assert result.resets >= 3
    assert not result.mismatches, result.mismatches[:5]
    assert not result.table_mismatches, result.table_mismatches[:2]
    assert result.ok and result.replayed_table == result.final_table
