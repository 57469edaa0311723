"""Unit tests of the testbed's pieces that need no VM: cpio, modules, config."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from hostrelay.testbed import initramfs, kernel, vm
from hostrelay.testbed.kernel import KernelImage, TestbedSetupError


def _fake_module(depends: str, name: str) -> bytes:
    # A .ko's .modinfo section is NUL-separated key=value strings.
    return b"\x7fELF....\0license=GPL\0depends=" + depends.encode() + b"\0name=" + name.encode() + b"\0vermagic=x\0"


@pytest.fixture
def fake_kernel(tmp_path: Path) -> KernelImage:
    mods = tmp_path / "lib/modules/9.9.9"
    (mods / "kernel/drivers").mkdir(parents=True)
    tree = {
        "vfio-pci.ko": _fake_module("vfio-pci-core,vfio", "vfio_pci"),
        "vfio-pci-core.ko": _fake_module("vfio,irqbypass", "vfio_pci_core"),
        "vfio.ko": _fake_module("", "vfio"),
        "irqbypass.ko": _fake_module("", "irqbypass"),
        "loopy.ko": _fake_module("loopy2", "loopy"),
        "loopy2.ko": _fake_module("loopy", "loopy2"),
    }
    for name, data in tree.items():
        (mods / "kernel/drivers" / name).write_bytes(data)
    (mods / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(b"kernel")
    return KernelImage(vmlinuz, mods, "9.9.9", "given")


def test_module_depends_parsed_from_modinfo() -> None:
    assert kernel.module_depends(_fake_module("a-b,c", "x")) == ["a_b", "c"]
    assert kernel.module_depends(_fake_module("", "x")) == []


def test_load_order_puts_dependencies_first_and_skips_builtins(fake_kernel: KernelImage) -> None:
    order = [name for name, _ in kernel.resolve_load_order(fake_kernel, ("virtio_pci", "vfio_pci", "vfio"))]
    assert order.index("vfio") < order.index("vfio_pci_core") < order.index("vfio_pci")
    assert order.index("irqbypass") < order.index("vfio_pci_core")
    assert "virtio_pci" not in order  # built in
    assert len(order) == len(set(order)) == 4


def test_missing_module_and_loops_are_clear_errors(fake_kernel: KernelImage) -> None:
    with pytest.raises(TestbedSetupError, match="no module 'nvme'"):
        kernel.resolve_load_order(fake_kernel, ("nvme",))
    with pytest.raises(TestbedSetupError, match="loop"):
        kernel.resolve_load_order(fake_kernel, ("loopy",))
    assert fake_kernel.has_modules(("vfio", "virtio_pci", "nvme")) == ["nvme"]


def test_compressed_modules_are_read(tmp_path: Path) -> None:
    import lzma

    data = _fake_module("", "m")
    (tmp_path / "m.ko.xz").write_bytes(lzma.compress(data))
    (tmp_path / "m.ko.gz").write_bytes(gzip.compress(data))
    assert kernel.read_module(tmp_path / "m.ko.xz") == data
    assert kernel.read_module(tmp_path / "m.ko.gz") == data


@pytest.mark.skipif(shutil.which("cpio") is None, reason="the cpio tool is needed to read the archive back")
def test_cpio_archive_reads_back_with_cpio(tmp_path: Path) -> None:
    c = initramfs._Cpio()
    c.dir("bin")
    c.file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    c.file("odd", b"x" * 5)
    out = subprocess.run(["cpio", "-idm", "--quiet"], input=c.finish(), cwd=tmp_path, capture_output=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "bin/tool").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "odd").read_bytes() == b"xxxxx"


def test_static_elf_detection(tmp_path: Path) -> None:
    assert not initramfs._is_static_elf(Path("/bin/sh"))  # dynamically linked on every distro
    script = tmp_path / "s"
    script.write_text("#!/bin/sh\n")
    assert not initramfs._is_static_elf(script)


def test_init_script_applies_module_params_from_cmdline() -> None:
    assert "params_for" in initramfs.INIT_SCRIPT and "/proc/cmdline" in initramfs.INIT_SCRIPT
    assert "XFER_MOUNT" not in initramfs.INIT_SCRIPT  # placeholder substituted
    assert initramfs.XFER_MOUNT.lstrip("/") in initramfs.INIT_SCRIPT


def test_qemu_arguments_follow_the_config(tmp_path: Path) -> None:
    (tmp_path / "xfer").mkdir()
    intel = vm._qemu_args(vm.TestbedConfig(edu=2, nvme=1, kernel_args=("a.b=1",)), Path("k"), Path("i"), tmp_path)
    joined = " ".join(intel)
    assert "intel-iommu,intremap=on,caching-mode=on" in joined and "intel_iommu=on" in joined
    assert intel.count("edu") == 2 and joined.count("nvme,drive=") == 1
    assert intel[intel.index("-append") + 1].endswith("a.b=1")
    assert (tmp_path / "nvme0.img").stat().st_size > 0
    virtio = vm._qemu_args(vm.TestbedConfig(iommu="virtio", edu=0), Path("k"), Path("i"), tmp_path)
    assert "virtio-iommu-pci" in virtio and "edu" not in virtio and "intel_iommu=on" not in " ".join(virtio)
    with pytest.raises(ValueError):
        vm.TestbedConfig(iommu="amd")


def test_command_script_quotes_and_carries_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTRELAY_X", "a b'c")
    monkeypatch.setenv("SECRET_TOKEN", "nope")
    script = vm._command_script(["python", "-c", "print('x y')"], Path("/work dir"), vm.TestbedConfig(nvme=2))
    assert "export HOSTRELAY_X='a b'\"'\"'c'" in script
    assert "SECRET_TOKEN" not in script
    assert "export HOSTRELAY_TESTBED=intel" in script and "HOSTRELAY_TESTBED_NVME=2" in script
    assert "cd '/work dir'" in script
    assert script.rstrip().endswith("exec python -c 'print('\"'\"'x y'\"'\"')'")


def test_missing_qemu_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vm.shutil, "which", lambda name: None)
    with pytest.raises(TestbedSetupError, match="qemu-system-x86"):
        vm.run(["true"])


def test_given_kernel_needs_modules_and_is_checked(fake_kernel: KernelImage) -> None:
    with pytest.raises(TestbedSetupError, match="--modules"):
        kernel.find_kernel("intel", kernel=fake_kernel.vmlinuz)
    with pytest.raises(TestbedSetupError, match="lacks"):
        kernel.find_kernel("intel", kernel=fake_kernel.vmlinuz, modules=fake_kernel.modules_dir)


# ------------------------------------------------ `hostrelay testbed run` CLI
class _Booted(Exception):
    """Raised by the stand-in for the VM so a test sees where a boot would start."""


@pytest.fixture
def no_boot(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[str, ...], vm.TestbedConfig]]:
    """The CLI's ``run`` replaced: each call is recorded, and nothing boots."""
    import hostrelay.testbed

    calls: list[tuple[tuple[str, ...], vm.TestbedConfig]] = []

    def fake_run(cmd: tuple[str, ...], config: vm.TestbedConfig, **kwargs: object) -> vm.TestbedResult:
        calls.append((tuple(cmd), config))
        return vm.TestbedResult(returncode=0, output="", timed_out=False, wall_seconds=0.0, boot_seconds=0.0,
                                guest_uptime_at_start=0.0)  # fmt: skip

    monkeypatch.setattr(hostrelay.testbed, "run", fake_run)
    return calls


def _testbed_run(*argv: str) -> Any:
    from click.testing import CliRunner

    from hostrelay.cli import main

    return CliRunner().invoke(main, ["testbed", "run", "-q", *argv])


def test_unknown_option_is_a_usage_error_before_boot(no_boot: list[Any]) -> None:
    result = _testbed_run("--bogus-option", "true")
    assert result.exit_code == 2, result.output
    assert "--bogus-option" in result.output and "No such option" in result.output
    assert no_boot == []  # refused before anything booted
    result = _testbed_run("--edu", "2", "--bogus-option")
    assert result.exit_code == 2 and "--bogus-option" in result.output and no_boot == []


def test_options_stop_at_the_first_word_of_the_command(no_boot: list[Any]) -> None:
    result = _testbed_run("--edu", "2", "python", "-c", "x", "--foo", "--edu", "4", "-q")
    assert result.exit_code == 0, result.output
    [(cmd, config)] = no_boot
    assert cmd == ("python", "-c", "x", "--foo", "--edu", "4", "-q")  # CMD's own options, even ones the testbed has
    assert config.edu == 2


def test_double_dash_ends_the_options(no_boot: list[Any]) -> None:
    result = _testbed_run("--nvme", "1", "--", "--weird", "--icount")
    assert result.exit_code == 0, result.output
    [(cmd, config)] = no_boot
    assert cmd == ("--weird", "--icount") and config.nvme == 1 and not config.icount


def test_icount_reaches_the_qemu_command_line(monkeypatch: pytest.MonkeyPatch, fake_kernel: KernelImage, tmp_path: Path) -> None:
    # The real vm.run up to the QEMU process: the argv it would start is captured instead.
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"")
    argvs: list[list[str]] = []

    def fake_popen(args: list[str], **kwargs: object) -> None:
        argvs.append(args)
        raise _Booted

    monkeypatch.setattr(vm, "qemu_binary", lambda: "qemu-system-x86_64")
    monkeypatch.setattr(vm, "find_kernel", lambda *a, **k: fake_kernel)
    monkeypatch.setattr(vm, "build_initramfs", lambda *a, **k: initrd)
    monkeypatch.setattr(subprocess, "Popen", fake_popen)  # vm calls subprocess.Popen
    for argv in (["--icount"], []):
        result = _testbed_run(*argv, "true")
        assert isinstance(result.exception, _Booted), result.output
    with_icount, without = argvs
    assert with_icount[0] == "qemu-system-x86_64"
    at = with_icount.index("-icount")
    assert with_icount[at + 1] == "shift=0,sleep=off"
    # icount forbids multi-threaded TCG: the accelerator must never ask for it.
    assert "thread=multi" not in with_icount[with_icount.index("-accel") + 1]
    assert "-icount" not in without
    smp = vm._qemu_args(vm.TestbedConfig(icount=True, cpus=2), Path("k"), Path("i"), _xfer(tmp_path))
    assert smp[smp.index("-accel") + 1] == "tcg,thread=single" and "-icount" in smp


def _xfer(tmp_path: Path) -> Path:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "xfer").mkdir()
    return tmp_path / "run"


def test_a_guest_that_does_not_power_off_after_its_command_is_killed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A stand-in for QEMU whose guest ran the command (started, output, rc
    # written) and then hangs instead of powering off, as a wedged guest kernel does.
    run_dir = _xfer(tmp_path)
    xfer = run_dir / "xfer"
    script = f"echo 1.5 > {xfer}/started; printf hi > {xfer}/output; echo 7 > {xfer}/rc; exec sleep 600"
    monkeypatch.setattr(vm, "POWEROFF_GRACE", 1.0)
    said: list[str] = []
    t = time.monotonic()
    result = vm._boot(["true"], vm.TestbedConfig(), ["sh", "-c", script], run_dir, "test kernel", "host", 60.0,
                      None, said.append, None)  # fmt: skip
    assert time.monotonic() - t < 30  # not the 60 s timeout, nor the 600 s sleep
    assert result.returncode == 7 and result.output == "hi" and not result.timed_out
    assert any("did not power off" in line for line in said)
