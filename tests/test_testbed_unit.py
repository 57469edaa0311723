"""Unit tests of the testbed's pieces that need no VM: cpio, modules, config."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

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
