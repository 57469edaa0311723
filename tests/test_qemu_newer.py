"""The newer-QEMU testbed tier (hostrelay.testbed.qemu_newer, ``testbed run --qemu newer``).

Three kinds of test: unit tests of the argv and the provisioning's bookkeeping
(no VM); host-side tests of the real provisioned root (QEMU 11.1 from Debian
trixie-backports when written; provisioned here on first use, about a minute); and VFIO
tests that boot on it and check, from inside the guest, that the guest runs on
that QEMU and that VFIO DMA works there.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hostrelay.testbed import TestbedSetupError, qemu_newer, vm
from hostrelay.testbed.qemu_newer import MODULE_DIR, NewerQemu

PAGE = 0x1000
IOVA = 0x100000

_as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the newer QEMU's mount namespace needs root")


def _must_run() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("HOSTRELAY_REQUIRE_VFIO") == "1"


def _fake_root(tmp_path: Path) -> Path:
    """A root shaped like the provisioned one whose "loader" is a shell script reporting what it sees."""
    root = tmp_path / "root"
    loader = root / qemu_newer.LOADER
    loader.parent.mkdir(parents=True)
    (root / MODULE_DIR.lstrip("/")).mkdir(parents=True)
    (root / MODULE_DIR.lstrip("/") / "marker").write_text("from the root\n")
    # What QEMU would see: its arguments and the module directory's content.
    loader.write_text(f'#!/bin/sh\necho "args: $*"\ncat {MODULE_DIR}/marker 2>/dev/null || echo "no marker"\n')
    loader.chmod(0o755)
    return root


def _stamp(root: Path, **overrides: Any) -> None:
    meta = {"qemu_version": "11.1.3", "package_version": "1:11.1.3+ds-2~bpo13+1", "recipe": qemu_newer._recipe()}
    (root / qemu_newer.STAMP).write_text(json.dumps(meta | overrides))


# ------------------------------------------------------------------ unit tier
def test_command_runs_the_roots_loader_binary_and_firmware(tmp_path: Path) -> None:
    root = tmp_path / "r"
    argv = qemu_newer.qemu_command(root)
    assert argv[:4] == ["unshare", "-m", "--propagation", "private"]
    after = argv[argv.index(str(root / qemu_newer.LOADER)) :]
    assert after[1] == "--library-path"
    assert after[2].split(":") == [str(root / "usr/lib/x86_64-linux-gnu"), str(root / "lib/x86_64-linux-gnu")]
    assert after[3] == str(root / "usr/bin/qemu-system-x86_64")
    assert after[4:] == ["-L", str(root / "usr/share/qemu"), "-L", str(root / "usr/share/seabios")]
    # The bind mount's source and target come before the loader.
    assert argv[argv.index(MODULE_DIR) - 1] == str(root / MODULE_DIR.lstrip("/"))


@_as_root
@pytest.mark.skipif(not Path(MODULE_DIR).is_dir(), reason=f"no host QEMU module directory {MODULE_DIR}")
def test_wrapper_shows_the_roots_modules_only_to_qemu(tmp_path: Path) -> None:
    # The real unshare + bind mount, with a loader that reports what it sees.
    root = _fake_root(tmp_path)
    out = subprocess.run([*qemu_newer.qemu_command(root), "-version"], capture_output=True, text=True, check=True).stdout
    assert "from the root" in out  # QEMU sees the root's modules at the host's path...
    assert f"args: --library-path {root}" in out and out.split("\n")[0].endswith(" -version")
    assert not (Path(MODULE_DIR) / "marker").exists()  # ...and the host never does
    assert qemu_newer._mounts_under(tmp_path) == []


def test_cached_root_needs_todays_recipe_and_its_loader(tmp_path: Path) -> None:
    root = _fake_root(tmp_path / "qemu-newer")
    assert qemu_newer.cached_newer_qemu(tmp_path) is None  # no stamp
    _stamp(root, recipe="older")
    assert qemu_newer.cached_newer_qemu(tmp_path) is None
    _stamp(root)
    found = qemu_newer.cached_newer_qemu(tmp_path)
    assert found == NewerQemu(root, "11.1.3", "1:11.1.3+ds-2~bpo13+1") and found.major == 11
    (root / qemu_newer.LOADER).unlink()
    assert qemu_newer.cached_newer_qemu(tmp_path) is None


def test_a_failing_step_names_itself_and_its_output_tail() -> None:
    with pytest.raises(TestbedSetupError) as err:
        qemu_newer._run_step("the step", ["sh", "-c", "echo early; echo 'E: the reason' >&2; exit 3"], None)
    text = str(err.value)
    assert "the step failed (exit 3)" in text and "E: the reason" in text and "early" in text


@_as_root
def test_failed_provisioning_leaves_no_root_and_no_build_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A debootstrap that fails as a real one does when the mirror lacks the suite.
    script = tmp_path / "debootstrap"
    script.write_text('#!/bin/sh\necho "I: Retrieving InRelease"\necho "E: Failed getting release file" >&2\nexit 1\n')
    script.chmod(0o755)
    monkeypatch.setattr(qemu_newer, "_fetch_debootstrap", lambda work, log: (script, tmp_path))
    monkeypatch.setattr(qemu_newer, "_debian_mirror", lambda: "http://mirror.invalid/debian")
    lines: list[str] = []
    with pytest.raises(TestbedSetupError, match=r"(?s)debootstrap failed \(exit 1\):\n.*E: Failed getting release file"):
        qemu_newer.provision_newer_qemu(tmp_path / "cache", log=lines.append)
    home = tmp_path / "cache" / "qemu-newer"
    assert sorted(p.name for p in home.iterdir()) == [".lock"]  # no root, no build-* left behind
    assert any("first run only" in line for line in lines)  # progress was shown


def test_qemu_arguments_for_newer_and_shared_memory(tmp_path: Path) -> None:
    (tmp_path / "xfer").mkdir()

    def args(**kw: Any) -> list[str]:
        return vm._qemu_args(vm.TestbedConfig(**kw), Path("k"), Path("i"), tmp_path)

    host, newer = args(), args(qemu="newer")
    # QEMU >= 9.2's intel-iommu default aw-bits is 48; newer pins 7.2's 39.
    assert newer[newer.index("-device") + 1] == "intel-iommu,intremap=on,caching-mode=on,aw-bits=39"
    assert host[host.index("-device") + 1] == "intel-iommu,intremap=on,caching-mode=on"
    assert [a.replace(",aw-bits=39", "") for a in newer] == host  # and nothing else differs
    for iommu, machine in (("intel", "q35,memory-backend=mem,kernel-irqchip=split"), ("virtio", "q35,memory-backend=mem")):
        shared = args(iommu=iommu, shared_memory=True, memory_mb=1024, extra_qemu_args=("-chardev", "socket,id=c0,path=/s"))
        assert shared[shared.index("-machine") + 1] == machine
        assert shared[shared.index("-object") + 1] == "memory-backend-memfd,id=mem,size=1024M,share=on"
        assert shared[shared.index("-m") + 1] == "1024"  # the backend's size must equal -m
        assert shared.index("-chardev") < shared.index("-kernel")
    assert "-object" not in host and "memory-backend" not in " ".join(host)
    with pytest.raises(ValueError, match="qemu must be one of"):
        vm.TestbedConfig(qemu="9.0")


def test_run_on_newer_starts_the_newer_argv_and_tells_the_guest(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The real vm.run up to the QEMU process (whose argv is captured), on a stand-in root.
    from hostrelay.testbed.kernel import KernelImage

    newer = NewerQemu(tmp_path / "root", "11.1.3", "1:11.1.3+ds-2~bpo13+1")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"")
    started: list[tuple[list[str], str]] = []

    class Started(Exception):
        pass

    def fake_popen(args: list[str], **kwargs: object) -> None:
        script = next(Path(a.split("=", 1)[1].split(",")[0]) for a in args if a.startswith("local,path=") and "xfer" in a)
        started.append((args, (script / "cmd.sh").read_text()))
        raise Started

    monkeypatch.setattr(qemu_newer, "provision_newer_qemu", lambda log=None: newer)
    monkeypatch.setattr(vm, "qemu_binary", lambda: pytest.fail("the host QEMU is not needed for --qemu newer"))
    monkeypatch.setattr(vm, "find_kernel", lambda *a, **k: KernelImage(tmp_path / "k", tmp_path, "9", "given"))
    monkeypatch.setattr(vm, "build_initramfs", lambda *a, **k: initrd)
    monkeypatch.setattr(subprocess, "Popen", fake_popen)
    with pytest.raises(Started):
        vm.run(["true"], vm.TestbedConfig(qemu="newer"))
    [(argv, script)] = started
    assert argv[: len(newer.command())] == newer.command()
    assert "export HOSTRELAY_TESTBED_QEMU=newer" in script and "HOSTRELAY_TESTBED_QEMU_VERSION=11.1.3" in script


def test_cli_qemu_option(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import hostrelay.testbed
    from hostrelay.cli import main

    configs: list[vm.TestbedConfig] = []

    def fake_run(cmd: tuple[str, ...], config: vm.TestbedConfig, **kwargs: object) -> vm.TestbedResult:
        configs.append(config)
        return vm.TestbedResult(0, "", False, 0.0, 0.0, 0.0)

    monkeypatch.setattr(hostrelay.testbed, "run", fake_run)
    for argv in (["--qemu", "newer", "true"], ["true"]):
        result = CliRunner().invoke(main, ["testbed", "run", "-q", *argv])
        assert result.exit_code == 0, result.output
    assert [c.qemu for c in configs] == ["newer", "host"]
    result = CliRunner().invoke(main, ["testbed", "run", "-q", "--qemu", "9.0", "true"])
    assert result.exit_code == 2 and "9.0" in result.output and len(configs) == 2


def test_marker_kwarg_selects_the_newer_boot() -> None:
    import testbed_plugin

    class Item:  # what group_key reads of a collected test
        def __init__(self, mark: pytest.MarkDecorator) -> None:
            self.mark = mark.mark

        def get_closest_marker(self, name: str) -> pytest.Mark:
            return self.mark

    newer = testbed_plugin.group_key(Item(pytest.mark.vfio(qemu="newer", edu=2)))  # type: ignore[arg-type]
    host = testbed_plugin.group_key(Item(pytest.mark.vfio(edu=2)))  # type: ignore[arg-type]
    assert newer != host  # a boot of its own
    assert newer.describe() == "--iommu intel --edu 2 --nvme 0 --qemu newer" and "--qemu" not in host.describe()
    assert newer.testbed_config().qemu == "newer" and host.testbed_config().qemu == "host"


# ---------------------------------------------------- the real provisioned root
@pytest.fixture(scope="module")
def provisioned(pytestconfig: pytest.Config) -> NewerQemu:
    """The real newer QEMU: provisioned now if this machine has none yet (progress shown)."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def log(line: str) -> None:
        # Past pytest's capture, as the testbed runner's progress is.
        with capture.global_and_fixture_disabled():
            print(f"[testbed] {line}", file=sys.stderr, flush=True)

    try:
        return qemu_newer.provision_newer_qemu(log=log)
    except TestbedSetupError as exc:
        if _must_run():
            raise
        pytest.skip(f"the newer QEMU cannot be provisioned here: {exc}")


@pytest.mark.host_boot
def test_provisioned_qemu_is_newer_and_has_the_front_ends_devices(provisioned: NewerQemu) -> None:
    assert qemu_newer.query_version(provisioned.command()) == provisioned.version
    assert provisioned.major >= 11 and provisioned.package_version.startswith(f"1:{provisioned.version}")
    devices = subprocess.run([*provisioned.command(), "-device", "help"], capture_output=True, text=True, check=True).stdout
    # What the socket front ends need and QEMU 7.2 lacks (vfio-user-pci: QEMU 10.1).
    for name in ("vhost-user-test-device-pci", "vfio-user-pci", "virtio-iommu-pci", "edu", "intel-iommu"):
        assert f'name "{name}"' in devices, name
    # -device help loads every hw-* module: virtio-gpu-pci comes from the root's
    # hw-display-virtio-gpu-pci.so.  With the host's 7.2 modules in the way (no
    # bind mount) QEMU 11.1 says "Only modules from the same build can be
    # loaded" and asserts in util/module.c instead.
    assert 'name "virtio-gpu-pci"' in devices
    # The host's own QEMU is untouched.
    host = shutil.which("qemu-system-x86_64")
    if host is not None:
        assert qemu_newer.query_version([host]) != provisioned.version
    assert (provisioned.root / "var/lib/apt/lists").is_dir() and not any((provisioned.root / "var/lib/apt/lists").iterdir())


# ------------------------------------------------------------------ VFIO tier
def _dmi_machine_version() -> str:
    """The machine type's version as the guest's firmware tables give it ("pc-q35-11.1" -> "11.1").

    QEMU writes the machine type's name (pc-q35-<major>.<minor> of the QEMU
    that runs it) into SMBIOS type 1's version string; the guest kernel reads
    it back as /sys/class/dmi/id/product_version.
    """
    text = Path("/sys/class/dmi/id/product_version").read_text().strip()
    match = re.fullmatch(r"pc-q35-(\d+\.\d+)", text)
    assert match is not None, f"unexpected SMBIOS product version {text!r}"
    return match.group(1)


@pytest.mark.vfio(qemu="newer")
def test_guest_runs_on_the_newer_qemu() -> None:
    expected = os.environ["HOSTRELAY_TESTBED_QEMU_VERSION"]
    seen = _dmi_machine_version()
    assert seen == ".".join(expected.split(".")[:2]), (seen, expected)
    assert int(seen.split(".")[0]) >= 11  # a QEMU 7.2 guest sees pc-q35-7.2


@pytest.mark.vfio()
def test_guest_on_the_host_qemu_sees_the_host_version() -> None:
    # The contrast to the test above, from the host QEMU's boot: DMI follows the QEMU.
    host = shutil.which("qemu-system-x86_64")  # the host's binary, through the 9p root
    if host is None:
        pytest.skip("the host has no qemu-system-x86_64 (a real VFIO host, not the testbed)")
    version = qemu_newer.query_version([host])
    if os.environ.get("HOSTRELAY_TESTBED_QEMU", "host") != "host":
        pytest.skip("booted on the newer QEMU")
    assert _dmi_machine_version() == ".".join(version.split(".")[:2])


@pytest.mark.vfio(qemu="newer")
def test_edu_dma_through_vfio_on_the_newer_qemu(edu_bdfs: list[str]) -> None:
    """Type1 VFIO and the emulated VT-d on QEMU 11: DMA lands while mapped, faults after UNMAP."""
    from hostrelay.drivers.edu import Edu
    from hostrelay.kernel import ioctl as _kernel
    from hostrelay.kernel.vfio import Container, Group

    bdf = edu_bdfs[0]
    m = mmap.mmap(-1, 2 * PAGE)
    pattern = bytes((i * 5 + 1) & 0xFF for i in range(2048))
    m[:2048] = pattern
    with Container() as c:
        group = Group.for_device(bdf)
        c.attach(group)
        edu = Edu(group.device(bdf))
        c.map_dma(IOVA, 2 * PAGE, _kernel.buffer_address(m))
        edu.to_device(IOVA, 2048)  # edu reads the buffer through the IOMMU...
        edu.from_device(IOVA + PAGE, 2048)
        assert m[PAGE : PAGE + 2048] == pattern  # ...and writes it back a page on
        assert c.unmap_dma(IOVA, 2 * PAGE) == 2 * PAGE
        before = len(subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.splitlines())
        m[PAGE : PAGE + 2048] = bytes(2048)
        edu.from_device(IOVA + PAGE, 2048)
        assert m[PAGE : PAGE + 2048] == bytes(2048), "device write landed after UNMAP"
        new = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.splitlines()[before:]
        assert any("DMAR" in line for line in new), f"no VT-d fault logged: {new}"
    m.close()
