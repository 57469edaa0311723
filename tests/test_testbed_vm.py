"""The testbed itself, booted for real from the host (not inside it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from hostrelay.testbed import TIMEOUT_STATUS, TestbedConfig, TestbedSetupError, kernel, run

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("HOSTRELAY_TESTBED")), reason="boots the testbed; not nested inside it"
)


def _need_qemu() -> None:
    if shutil.which("qemu-system-x86_64") is None:
        if os.environ.get("CI") == "true" or os.environ.get("HOSTRELAY_REQUIRE_VFIO") == "1":
            pytest.fail("qemu-system-x86_64 missing on CI: .ci/run must install qemu-system-x86")
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")


def test_runs_command_returns_status_output_and_applies_module_params() -> None:
    _need_qemu()
    script = (
        "cat /sys/module/vfio_iommu_type1/parameters/dma_entry_limit; "
        "for d in /sys/bus/pci/devices/*; do cat $d/vendor $d/device | tr '\\n' ' '; echo; done; "
        "id -u; touch /usr/hostrelay-overlay-probe && echo writable; exit 7"
    )
    result = run(["sh", "-c", script], TestbedConfig(edu=2, nvme=1, kernel_args=("vfio_iommu_type1.dma_entry_limit=77",)),
                 timeout=300)  # fmt: skip
    assert result.returncode == 7 and not result.timed_out
    lines = result.output.splitlines()
    assert lines[0] == "77"  # module.param= reached the module loaded by the testbed
    assert sum("0x1234 0x11e8" in line for line in lines) == 2  # two edu
    assert sum("0x1b36 0x0010" in line for line in lines) == 1  # one nvme
    assert "0" in lines and "writable" in lines  # root, writable overlay
    assert not os.path.exists("/usr/hostrelay-overlay-probe")  # ...that never reaches the host
    assert result.boot_seconds is not None and result.boot_seconds < 120


def test_timeout_is_enforced() -> None:
    _need_qemu()
    result = run(["sleep", "3600"], TestbedConfig(edu=0), timeout=40)
    assert result.timed_out and result.returncode == TIMEOUT_STATUS
    assert result.wall_seconds < 90


def test_cli_exit_status_and_second_boot_needs_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    _need_qemu()
    # After a boot the kernel is cached (or the host's own is used): resolving it
    # again must not touch apt at all.
    def no_network(*args: object, **kwargs: object) -> str:
        raise AssertionError("apt was called on a cached boot")

    monkeypatch.setattr(kernel.PrivateApt, "run", no_network)
    image = kernel.find_kernel("virtio")
    assert image.origin == "host" or image.origin.startswith("debian:")
    proc = subprocess.run(
        [sys.executable, "-m", "hostrelay.cli", "testbed", "run", "--iommu", "virtio", "--edu", "0", "--timeout", "200",
         "--", "sh", "-c", "ls /sys/bus/virtio/drivers/virtio_iommu | grep -c virtio; exit 3"],
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.strip() == "1"  # the virtio-iommu driver bound its device
    assert "booted in" in proc.stderr


def test_setup_error_is_reported_by_cli(tmp_path: pytest.TempPathFactory) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hostrelay.cli", "testbed", "run", "--kernel", "/etc/hostname", "--", "true"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "--modules" in proc.stderr
    with pytest.raises(TestbedSetupError):
        run(["true"], TestbedConfig(kernel=__import__("pathlib").Path("/etc/hostname")))
