"""Host tooling over a fake sysfs tree with a fake kernel behind the writes.

Fast and runnable anywhere; the same behaviour is shown against the real
kernel by tests/test_hosttools.py in the testbed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from hostrelay.host import sysfs
from hostrelay.host import check
from hostrelay.host.binding import BindError, bind, bind_vfio, plan_bind, result_text, unbind
from hostrelay.host.check import BuildSupport, Finding, iommufd_ready, parse_size, readiness, ready
from hostrelay.cli import main
from hostrelay.host.devices import list_functions, list_groups, normalize_address
from hostrelay.host.sysfs import Host
from hostrelay.host.udev import VfioNodeWaiter, access_rule, bind_rule, rules_text

REPO = Path(__file__).parents[1]


class FakeKernel:
    """Just enough of the PCI driver core for binding: override, unbind, probe."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sys = root / "sys"
        self.writes: list[tuple[str, str]] = []
        self.native: dict[str, str | None] = {}
        self.vfio_refuses = False
        # Like Linux >= 6.1, vfio-pci gives each device <dev>/vfio-dev/vfioN;
        # with cdevs (Linux >= 6.6, CONFIG_VFIO_DEVICE_CDEV) it has a dev
        # number and devtmpfs makes /dev/vfio/devices/vfioN.
        self.cdevs = False
        self.next_cdev = 0
        for d in ("sys/bus/pci/devices", "sys/kernel/iommu_groups", "sys/devices/pci0000:00", "dev/vfio",
                  "proc/self", "run", "sys/class/iommu/dmar0"):  # fmt: skip
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "dev/vfio/vfio").write_text("")
        (root / "proc/self/mountinfo").write_text("")
        for drv in ("vfio-pci", "nvme", "pcieport"):
            (self.sys / "bus/pci/drivers" / drv).mkdir(parents=True)
        self.host = Host(sys=self.sys, dev=root / "dev", proc=root / "proc", run=root / "run",
                         state_dir=root / "state", writer=self.write, events=False)  # fmt: skip

    def add(self, bdf: str, vid: int, did: int, group: int, *, native: str | None = None,
            bridge: bool = False, cls: int = 0xFF0000) -> Path:  # fmt: skip
        dev = self.sys / "devices/pci0000:00" / bdf
        dev.mkdir(parents=True)
        (dev / "vendor").write_text(f"{vid:#06x}\n")
        (dev / "device").write_text(f"{did:#06x}\n")
        (dev / "class").write_text(f"{(0x060400 if bridge else cls):#08x}\n")
        config = bytearray(64)
        config[0x0E] = 1 if bridge else 0
        (dev / "config").write_bytes(bytes(config))
        (dev / "driver_override").write_text("(null)\n")
        os.symlink(self.sys / "bus/pci", dev / "subsystem")
        os.symlink(dev, self.sys / "bus/pci/devices" / bdf)
        gdir = self.sys / "kernel/iommu_groups" / str(group)
        (gdir / "devices").mkdir(parents=True, exist_ok=True)
        (gdir / "type").write_text("DMA\n")
        (gdir / "reserved_regions").write_text("0x00000000fee00000 0x00000000feefffff msi\n")
        os.symlink(dev, gdir / "devices" / bdf)
        os.symlink(gdir, dev / "iommu_group")
        self.native[bdf] = native
        if native:
            self._bind(bdf, native)
        return dev

    def subsystem(self, path: Path, name: str) -> None:
        target = self.sys / "class" / name
        target.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path / "subsystem")

    def _dev(self, bdf: str) -> Path:
        return self.sys / "devices/pci0000:00" / bdf

    def _bind(self, bdf: str, drv: str) -> None:
        os.symlink(self.sys / "bus/pci/drivers" / drv, self._dev(bdf) / "driver")
        if drv == "vfio-pci":
            group = self.host.group(bdf)
            (self.root / "dev/vfio" / str(group)).write_text("")
            name = f"vfio{self.next_cdev}"
            self.next_cdev += 1
            (self._dev(bdf) / "vfio-dev" / name).mkdir(parents=True)
            if self.cdevs:
                (self._dev(bdf) / "vfio-dev" / name / "dev").write_text(f"246:{self.next_cdev - 1}\n")
                (self.root / "dev/vfio/devices").mkdir(exist_ok=True)
                (self.root / "dev/vfio/devices" / name).write_text("")

    def write(self, path: Path, value: str) -> None:
        self.writes.append((str(path.relative_to(self.root)), value))
        if path.name == "driver_override":
            path.write_text("(null)\n" if value == "\n" else value + "\n")
        elif path.name == "unbind":
            bdf = value.strip()
            link = self._dev(bdf) / "driver"
            assert link.is_symlink(), "unbind of an unbound device: the kernel answers ENODEV"
            was_vfio = os.path.basename(os.readlink(link)) == "vfio-pci"
            link.unlink()
            if was_vfio:
                for vdev in (self._dev(bdf) / "vfio-dev").iterdir():
                    (self.root / "dev/vfio/devices" / vdev.name).unlink(missing_ok=True)
                    (vdev / "dev").unlink(missing_ok=True)
                    vdev.rmdir()
                (self._dev(bdf) / "vfio-dev").rmdir()
            group = self.host.group(bdf)
            if was_vfio and not any(self.host.driver(m) == "vfio-pci" for m in self.host.group_members(group or 0)):
                (self.root / "dev/vfio" / str(group)).unlink()
        elif path.name == "drivers_probe":
            bdf = value.strip()
            if self.host.driver(bdf) is not None:
                return
            override = self.host.driver_override(bdf)
            target = override if override is not None else self.native[bdf]
            if target == "vfio-pci" and self.vfio_refuses:
                return  # drivers_probe reports success even when nothing binds
            if target is not None and (self.sys / "bus/pci/drivers" / target).is_dir():
                self._bind(bdf, target)
        else:
            raise AssertionError(f"unexpected write to {path}")


@pytest.fixture
def fk(tmp_path: Path) -> FakeKernel:
    k = FakeKernel(tmp_path)
    k.add("0000:00:01.0", 0x8086, 0x1234, 0, bridge=True, native="pcieport")
    k.add("0000:00:03.0", 0x1234, 0x11E8, 3)  # edu, no native driver
    k.add("0000:00:04.0", 0x1B36, 0x0010, 4, native="nvme", cls=0x010802)
    k.add("0000:02:01.0", 0x1234, 0x11E8, 7)  # two edu behind a bridge share group 7
    k.add("0000:02:02.0", 0x1234, 0x11E8, 7)
    return k


def test_bind_sequence_and_restore_to_saved_driver(fk: FakeKernel) -> None:
    nvme = "0000:00:04.0"
    result = bind([nvme], fk.host)
    assert fk.writes == [
        (f"sys/bus/pci/devices/{nvme}/driver_override", "vfio-pci"),
        (f"sys/bus/pci/devices/{nvme}/driver/unbind", nvme),
        ("sys/bus/pci/drivers_probe", nvme),
    ]
    assert fk.host.driver(nvme) == "vfio-pci" and (fk.root / "dev/vfio/4").exists()
    assert result.devices[0]["from"] == "nvme"
    state = json.loads((fk.host.state_dir / f"{nvme}.json").read_text())
    assert state["driver"] == "nvme" and state["iommu_group"] == 4
    bind([nvme], fk.host)  # a second bind changes nothing and keeps the original in the state
    assert json.loads((fk.host.state_dir / f"{nvme}.json").read_text())["driver"] == "nvme"
    fk.writes.clear()
    unbind([nvme], fk.host, restore=True)
    assert fk.writes[0] == (f"sys/bus/pci/devices/{nvme}/driver_override", "\n")
    assert fk.host.driver(nvme) == "nvme" and fk.host.driver_override(nvme) is None
    assert not (fk.host.state_dir / f"{nvme}.json").exists()
    assert not (fk.root / "dev/vfio/4").exists()


def test_driverless_device_restored_to_no_driver(fk: FakeKernel) -> None:
    edu = "0000:00:03.0"
    bind([edu], fk.host)
    assert [w[0].rsplit("/", 1)[1] for w in fk.writes] == ["driver_override", "drivers_probe"]
    unbind([edu], fk.host, restore=True)
    assert fk.host.driver(edu) is None
    assert fk.writes[-1][0].endswith("driver/unbind"), "no probe: it had no driver"


def test_unbind_without_restore_keeps_state_for_a_later_restore(fk: FakeKernel) -> None:
    nvme = "0000:00:04.0"
    bind([nvme], fk.host)
    unbind([nvme], fk.host)
    assert fk.host.driver(nvme) is None and (fk.host.state_dir / f"{nvme}.json").exists()
    unbind([nvme], fk.host, restore=True)
    assert fk.host.driver(nvme) == "nvme"


def test_restore_binds_saved_driver_when_probe_picks_another(fk: FakeKernel) -> None:
    nvme = "0000:00:04.0"
    bind([nvme], fk.host)
    fk.native[nvme] = None  # e.g. the native module was unloaded meanwhile: probing binds nothing
    unbind([nvme], fk.host, restore=True)
    assert fk.host.driver(nvme) == "nvme"
    assert (f"sys/bus/pci/devices/{nvme}/driver_override", "nvme") in fk.writes
    assert fk.host.driver_override(nvme) is None


def test_failed_bind_rolls_back_to_original_driver(fk: FakeKernel) -> None:
    nvme = "0000:00:04.0"
    fk.vfio_refuses = True
    with pytest.raises(BindError, match="vfio-pci did not bind"):
        bind([nvme], fk.host)
    assert fk.host.driver(nvme) == "nvme", "left driverless"
    assert fk.host.driver_override(nvme) is None


def test_shared_group_refused_then_group_bind(fk: FakeKernel) -> None:
    with pytest.raises(BindError, match=r"group 7 also holds 0000:02:02.0 \(no driver\).*--group"):
        bind(["0000:02:01.0"], fk.host)
    assert fk.writes == []
    dry = bind(["0000:02:01.0"], fk.host, whole_group=True, dry_run=True)
    assert [w.path.name for w in dry.writes] == ["driver_override", "drivers_probe"] * 2
    assert fk.writes == [] and not fk.host.state_dir.exists()
    bind(["0000:02:01.0"], fk.host, whole_group=True)
    assert fk.host.driver("0000:02:01.0") == fk.host.driver("0000:02:02.0") == "vfio-pci"
    groups = {g.group: g for g in list_groups(fk.host)}
    assert groups[7].viable and groups[7].vfio_node is not None


def test_bridge_is_refused_and_ignored_for_viability(fk: FakeKernel) -> None:
    with pytest.raises(BindError, match="bridge"):
        plan_bind(["0000:00:01.0"], fk.host)
    groups = {g.group: g for g in list_groups(fk.host)}
    assert groups[0].viable  # a bridge on pcieport does not block its group
    assert not groups[4].viable and groups[4].blockers == ["0000:00:04.0 (nvme)"]


def test_mounted_block_device_refused_unless_forced(fk: FakeKernel) -> None:
    nvme = "0000:00:04.0"
    # nvme's disk sits directly below its controller (no "block" glue directory).
    disk = fk._dev(nvme) / "nvme/nvme0/nvme0n1"
    (disk / "holders").mkdir(parents=True)
    (disk / "dev").write_text("259:0\n")
    fk.subsystem(disk, "block")
    fk.subsystem(disk.parent, "nvme")
    (fk.root / "proc/self/mountinfo").write_text("36 25 259:0 / /mnt rw,relatime shared:1 - ext4 /dev/nvme0n1 rw\n")
    funcs = {f.address: f for f in list_functions(fk.host, names=False)}
    assert funcs[nvme].in_use == ["block device nvme0n1 is mounted"]
    with pytest.raises(BindError, match="nvme0n1 is mounted.*--force"):
        bind([nvme], fk.host)
    assert fk.writes == []
    bind([nvme], fk.host, force=True)
    assert fk.host.driver(nvme) == "vfio-pci"


def test_swap_and_holders_are_in_use(fk: FakeKernel) -> None:
    dev = fk.add("0000:00:02.0", 0x1AF4, 0x1042, 2, cls=0x018000)
    disk = dev / "virtio1/block/vda"  # virtio-blk: a "block" class glue directory
    (disk / "vda1/holders").mkdir(parents=True)
    (disk / "holders").mkdir()
    fk.subsystem(disk, "block")
    fk.subsystem(disk / "vda1", "block")
    os.symlink("../../dm-0", disk / "vda1/holders/dm-0")
    (fk.root / "proc/swaps").write_text("Filename Type Size Used Priority\n/dev/vda partition 1 0 -2\n")
    assert fk.host.pci("0000:00:02.0").is_dir()
    from hostrelay.host.devices import usage

    assert usage(fk.host, "0000:00:02.0") == ["block device vda is used for swap", "block device vda1 is held by dm-0"]


def test_interface_up_is_in_use(fk: FakeKernel) -> None:
    dev = fk.add("0000:00:05.0", 0x8086, 0x10D3, 5, cls=0x020000)
    (dev / "net/eth0").mkdir(parents=True)
    fk.subsystem(dev / "net/eth0", "net")
    (dev / "net/eth0/flags").write_text("0x1003\n")
    with pytest.raises(BindError, match="eth0 is up"):
        bind(["0000:00:05.0"], fk.host)
    (dev / "net/eth0/flags").write_text("0x1002\n")
    bind(["0000:00:05.0"], fk.host)


def test_unbind_refused_while_group_open_naming_the_process(fk: FakeKernel) -> None:
    edu = "0000:00:03.0"
    bind([edu], fk.host)
    (fk.root / "proc/4242/fd").mkdir(parents=True)
    (fk.root / "proc/4242/comm").write_text("qemu-system-x86\n")
    os.symlink("/dev/vfio/3", fk.root / "proc/4242/fd/17")
    with pytest.raises(BindError, match=r"pid 4242 \(qemu-system-x86\) has /dev/vfio/3 open"):
        unbind([edu], fk.host, restore=True)
    assert fk.host.driver(edu) == "vfio-pci"


def test_node_waiter_without_events_checks_state(fk: FakeKernel) -> None:
    with VfioNodeWaiter(fk.host) as waiter, pytest.raises(TimeoutError):
        waiter.wait(3, timeout=0.01)
    bind(["0000:00:03.0"], fk.host)
    with VfioNodeWaiter(fk.host) as waiter:
        assert waiter.wait(3) == fk.root / "dev/vfio/3"


def test_legacy_bind_vfio_binds_one_member(fk: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sysfs, "write_file", fk.write)
    bind_vfio("0000:02:01.0", sysfs_root=fk.sys)  # group-unaware on purpose (test fixtures)
    assert sysfs.driver_of("0000:02:01.0", sysfs_root=fk.sys) == "vfio-pci"
    assert sysfs.find_pci(0x1234, 0x11E8, sysfs_root=fk.sys) == ["0000:00:03.0", "0000:02:01.0", "0000:02:02.0"]
    assert not fk.host.state_dir.exists()


# -------------------------------------------------------------------- check
def _iommu_ready(fk: FakeKernel, *, remap: bool, unsafe: str = "N") -> None:
    (fk.root / "proc/interrupts").write_text(
        "           CPU0\n  0:   10   IR-IO-APIC    2-edge      timer\n" if remap else "  0:   10   IO-APIC    2-edge   timer\n"
    )
    params = fk.sys / "module/vfio_iommu_type1/parameters"
    params.mkdir(parents=True, exist_ok=True)
    (params / "allow_unsafe_interrupts").write_text(unsafe + "\n")
    (fk.sys / "module/vfio").mkdir(parents=True, exist_ok=True)


def test_check_findings(fk: FakeKernel) -> None:
    _iommu_ready(fk, remap=True)
    found = {f.check: f for f in readiness(fk.host)}
    assert found["iommu"].status == "ok" and "Intel VT-d" in found["iommu"].detail
    assert found["interrupt-remapping"].status == "ok"
    assert found["vfio-modules"].status == "ok"
    _iommu_ready(fk, remap=False, unsafe="Y")
    found = {f.check: f for f in readiness(fk.host)}
    assert found["interrupt-remapping"].status == "warn"
    _iommu_ready(fk, remap=False, unsafe="N")
    findings = readiness(fk.host)
    remap = next(f for f in findings if f.check == "interrupt-remapping")
    assert remap.status == "fail" and "allow_unsafe_interrupts=1" in remap.remedy
    assert not ready(findings)
    (fk.sys / "module/vfio").rmdir()
    assert any(f.check == "vfio-modules" and f.status == "fail" and "vfio" in f.detail for f in readiness(fk.host))


def test_check_memlock_against_guest_ram(fk: FakeKernel) -> None:
    _iommu_ready(fk, remap=True)
    (fk.root / "proc/self/status").write_text("CapEff:\t0000000000000000\n")
    import resource

    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    if soft == resource.RLIM_INFINITY:
        pytest.skip("RLIMIT_MEMLOCK is unlimited here")
    mem = {f.check: f for f in readiness(fk.host, guest_ram=soft // 2, containers=3)}["memlock"]
    assert mem.status == "fail" and "3 container(s)" in mem.detail and "ulimit -l" in mem.remedy
    mem = {f.check: f for f in readiness(fk.host, guest_ram=soft // 2, containers=1)}["memlock"]
    assert mem.status == "ok"
    (fk.root / "proc/self/status").write_text(f"CapEff:\t{1 << 14:016x}\n")
    mem = {f.check: f for f in readiness(fk.host, guest_ram=soft * 4)}["memlock"]
    assert mem.status == "ok" and "CAP_IPC_LOCK" in mem.detail


def test_parse_size_and_addresses() -> None:
    assert parse_size("4G") == 4 << 30 and parse_size("512M") == 512 << 20 and parse_size("2048") == 2 << 30
    assert parse_size("1.5GiB") == 3 << 29
    with pytest.raises(ValueError):
        parse_size("lots")
    assert normalize_address("00:03.0") == "0000:00:03.0"
    assert normalize_address("0000:0A:1f.7") == "0000:0a:1f.7"
    with pytest.raises(ValueError):
        normalize_address("00:03")


# --------------------------------------------------------------------- rules
def test_rules() -> None:
    assert (REPO / "udev/70-hostrelay-vfio.rules").read_text() == access_rule("vfio")
    assert 'SUBSYSTEM=="vfio", GROUP="kvm", MODE="0660"' in access_rule("kvm")
    line = bind_rule(["1234:11e8", "00:03.0"]).splitlines()
    assert 'ATTR{vendor}=="0x1234", ATTR{device}=="0x11e8", ATTR{driver_override}="vfio-pci"' in line[1]
    assert 'KERNEL=="0000:00:03.0"' in line[2]
    with pytest.raises(ValueError):
        access_rule('kvm", MODE="0666')
    with pytest.raises(ValueError):
        access_rule("kvm", "0680")
    assert rules_text("kvm", []) == access_rule("kvm")


def test_rules_cover_the_iommufd_nodes() -> None:
    # Same group and mode for the group nodes, the device cdevs (class vfio-dev)
    # and /dev/iommu (misc device "iommu"), in the file shipped and as printed.
    rules = access_rule("kvm", "0640").splitlines()
    assert rules[1:] == ['SUBSYSTEM=="vfio", GROUP="kvm", MODE="0640"',
                         'SUBSYSTEM=="vfio-dev", GROUP="kvm", MODE="0640"',
                         'SUBSYSTEM=="misc", KERNEL=="iommu", GROUP="kvm", MODE="0640"']  # fmt: skip
    shipped = (REPO / "udev/70-hostrelay-vfio.rules").read_text()
    assert 'SUBSYSTEM=="misc", KERNEL=="iommu", GROUP="vfio", MODE="0660"' in shipped
    assert 'SUBSYSTEM=="vfio-dev", GROUP="vfio", MODE="0660"' in shipped
    printed = CliRunner().invoke(main, ["udev-rules", "--group", "kvm", "--mode", "0640"])
    assert printed.exit_code == 0 and printed.output == access_rule("kvm", "0640")


# ----------------------------------------------------------------------- CLI
@pytest.fixture
def cli_env(fk: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setattr(sysfs, "write_file", fk.write)
    return {"HOSTRELAY_SYSFS_ROOT": str(fk.sys), "HOSTRELAY_DEV_ROOT": str(fk.root / "dev"),
            "HOSTRELAY_PROC_ROOT": str(fk.root / "proc"), "HOSTRELAY_STATE_DIR": str(fk.root / "state")}  # fmt: skip


def test_cli_exit_codes_and_outputs(fk: FakeKernel, cli_env: dict[str, str]) -> None:
    run = CliRunner().invoke
    assert run(main, ["bind", "zz:03.0"], env=cli_env).exit_code == 2
    assert run(main, ["udev-rules"], env=cli_env).exit_code == 2
    refused = run(main, ["bind", "02:01.0"], env=cli_env)
    assert refused.exit_code == 1 and "0000:02:02.0" in refused.output
    dry = run(main, ["bind", "02:01.0", "--group", "--dry-run"], env=cli_env)
    assert dry.exit_code == 0 and fk.writes == []
    assert dry.output.count("write ") == 4 and "0000:02:02.0/driver_override" in dry.output
    done = run(main, ["bind", "0000:00:04.0", "--json"], env=cli_env)
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["devices"][0]["from"] == "nvme"
    listed = {d["address"]: d for d in json.loads(run(main, ["devices", "--json"], env=cli_env).output)}
    assert listed["0000:00:04.0"]["driver"] == "vfio-pci" and listed["0000:00:04.0"]["saved_driver"] == "nvme"
    assert listed["0000:00:04.0"]["vfio_ready"] is True and listed["0000:00:03.0"]["vfio_ready"] is False
    assert listed["0000:02:01.0"]["group_members"] == ["0000:02:01.0", "0000:02:02.0"]
    table = run(main, ["devices"], env=cli_env).output
    assert table.splitlines()[0].split()[:3] == ["ADDRESS", "ID", "CLASS"] and "1b36:0010" in table
    groups = run(main, ["groups"], env=cli_env).output
    assert "group 7 (DMA, viable)" in groups and "reserved 0x00000000fee00000" in groups
    back = run(main, ["unbind", "--restore", "00:04.0"], env=cli_env)
    assert back.exit_code == 0 and "vfio-pci -> nvme" in back.output
    _iommu_ready(fk, remap=False)
    checked = run(main, ["check", "--json"], env=cli_env)
    assert checked.exit_code == 1 and json.loads(checked.output)["ready"] is False


# ------------------------------------------------------------------ iommufd
EDU = "0000:00:03.0"


def _iommufd_kernel(fk: FakeKernel) -> None:
    """What a Linux >= 6.6 kernel with CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV shows."""
    fk.cdevs = True
    (fk.root / "dev/iommu").write_text("")
    (fk.root / "proc/devices").write_text("Character devices:\n  1 mem\n 10 misc\n246 vfio-dev\n247 vfio\n\n"
                                          "Block devices:\n259 blkext\n")  # fmt: skip
    (fk.sys / "class/vfio-dev").mkdir(parents=True, exist_ok=True)


def _type1_kernel(fk: FakeKernel) -> None:
    """A kernel without iommufd (Debian's): vfio-dev class (Linux >= 6.1) but no cdev region, no /dev/iommu."""
    (fk.root / "proc/devices").write_text("Character devices:\n  1 mem\n 10 misc\n245 vfio\n\nBlock devices:\n")
    (fk.sys / "class/vfio-dev").mkdir(parents=True, exist_ok=True)


def _by_check(findings: list[Finding]) -> dict[str, list[Finding]]:
    out: dict[str, list[Finding]] = {}
    for f in findings:
        out.setdefault(f.check, []).append(f)
    return out


def test_check_reports_iommufd_ready_with_evidence_and_cdevs(fk: FakeKernel) -> None:
    _iommu_ready(fk, remap=True)
    _iommufd_kernel(fk)
    found = _by_check(readiness(fk.host, build=BuildSupport(True)))
    assert found["iommufd-devices"][0].status == "warn" and "no device is bound" in found["iommufd-devices"][0].detail
    bind([EDU], fk.host)
    findings = readiness(fk.host, build=BuildSupport(True))
    found = _by_check(findings)
    assert found["iommufd-dev"][0].status == "ok" and str(fk.root / "dev/iommu") in found["iommufd-dev"][0].detail
    cdev = found["iommufd-cdev"][0]
    assert cdev.status == "ok" and "evidence: vfio registered the 'vfio-dev' char region" in cdev.detail
    assert str(fk.root / "proc/devices") in cdev.detail
    (dev,) = found["iommufd-devices"]
    assert dev.status == "ok" and dev.detail.startswith(f"{EDU}: {fk.root / 'dev/vfio/devices/vfio0'}")
    assert found["iommufd-build"][0].status == "ok"
    assert found["iommufd"][0].status == "ok" and found["iommufd"][0].detail.startswith("iommufd backend ready")
    assert iommufd_ready(findings) and ready(findings)
    assert [f.check for f in findings][-5:] == ["iommufd-dev", "iommufd-cdev", "iommufd-devices", "iommufd-build", "iommufd"]


def test_check_iommufd_unavailable_is_not_a_type1_failure(fk: FakeKernel) -> None:
    _iommu_ready(fk, remap=True)
    _type1_kernel(fk)
    bind([EDU], fk.host)
    assert (fk._dev(EDU) / "vfio-dev/vfio0").is_dir() and fk.host.vfio_cdev(EDU) is None
    findings = readiness(fk.host, build=BuildSupport(False, "no <linux/iommufd.h>"))
    found = _by_check(findings)
    assert all(f.status != "fail" for f in findings if f.check.startswith("iommufd"))
    assert ready(findings) and not iommufd_ready(findings), "the type1 checks decide"
    summary = found["iommufd"][0]
    assert summary.status == "warn"
    assert summary.detail.startswith(f"iommufd backend unavailable: {fk.root / 'dev/iommu'} does not exist")
    assert "CONFIG_VFIO_DEVICE_CDEV): no" in summary.detail and "no <linux/iommufd.h>" in summary.detail
    cdev = found["iommufd-cdev"][0]
    assert "evidence: vfio is loaded but registered no 'vfio-dev' char region" in cdev.detail
    assert "iommufd-devices" not in found, "no cdevs at all: nothing to report per device"
    assert "CONFIG_IOMMUFD" in found["iommufd-dev"][0].remedy and "cext/uapi.py" in found["iommufd-build"][0].remedy


def test_check_cdev_evidence_from_the_kernel_config(fk: FakeKernel) -> None:
    # vfio not loaded: no /proc/devices entry to go by, so the shipped config answers.
    (fk.root / "proc/sys/kernel").mkdir(parents=True)
    (fk.root / "proc/sys/kernel/osrelease").write_text("6.12.0-test\n")
    (fk.root / "proc/devices").write_text("Character devices:\n  1 mem\n\nBlock devices:\n")

    def cdev() -> Finding:
        return _by_check(readiness(fk.host, build=BuildSupport(True)))["iommufd-cdev"][0]

    assert cdev().status == "warn" and "unknown" in cdev().detail and "config-6.12.0-test" in cdev().detail
    import gzip

    (fk.root / "proc/config.gz").write_bytes(gzip.compress(b"CONFIG_IOMMUFD=y\n# CONFIG_VFIO_DEVICE_CDEV is not set\n"))
    assert "no; evidence: CONFIG_VFIO_DEVICE_CDEV is not set in " + str(fk.root / "proc/config.gz") in cdev().detail
    boot = fk.root / "boot"
    boot.mkdir()
    (boot / "config-6.12.0-test").write_text("CONFIG_IOMMUFD=y\nCONFIG_VFIO_DEVICE_CDEV=y\n")
    fk.host.boot = boot
    assert cdev().status == "ok" and f"evidence: CONFIG_VFIO_DEVICE_CDEV=y in {boot / 'config-6.12.0-test'}" in cdev().detail


def test_check_iommufd_permissions(fk: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    _iommu_ready(fk, remap=True)
    _iommufd_kernel(fk)
    bind([EDU], fk.host)
    denied = {fk.root / "dev/iommu", fk.root / "dev/vfio/devices/vfio0"}
    monkeypatch.setattr(check, "_can_open", lambda path: path not in denied)
    findings = readiness(fk.host, build=BuildSupport(True))
    found = _by_check(findings)
    assert found["iommufd-dev"][0].status == "warn" and "cannot open" in found["iommufd-dev"][0].detail
    assert "hostrelay udev-rules --group GROUP" in found["iommufd-dev"][0].remedy
    dev = found["iommufd-devices"][0]
    assert dev.status == "warn" and f"cannot open {fk.root / 'dev/vfio/devices/vfio0'}" in dev.detail
    assert "--subsystem-match=vfio-dev" in dev.remedy
    assert found["iommufd"][0].detail.startswith("iommufd backend unavailable: uid")
    assert ready(findings)
    (fk.root / "dev/vfio/devices/vfio0").unlink()  # sysfs has the cdev, /dev does not
    dev = _by_check(readiness(fk.host, build=BuildSupport(True)))["iommufd-devices"][0]
    assert dev.status == "warn" and "does not exist" in dev.detail


def test_bind_waits_for_and_reports_the_cdev(fk: FakeKernel) -> None:
    _iommufd_kernel(fk)
    result = bind([EDU], fk.host)
    node = fk.root / "dev/vfio/devices/vfio0"
    assert result.devices[0]["cdev"] == str(node) and node.exists()
    assert result_text(result) == [f"{EDU}: no driver -> vfio-pci (group 3, {fk.root / 'dev/vfio/3'}, cdev {node})"]
    again = bind([EDU], fk.host)  # already bound: the existing cdev is ready at once
    assert again.devices[0]["cdev"] == str(node) and "already on vfio-pci" in result_text(again)[0]
    assert bind([EDU], fk.host, dry_run=True).devices[0]["cdev"] == str(node)
    back = unbind([EDU], fk.host, restore=True)
    assert back.devices[0]["cdev"] == str(node) and result_text(back) == [f"{EDU}: vfio-pci -> no driver (cdev {node} removed)"]
    assert not node.exists()


def test_bind_without_cdev_support_is_not_an_error(fk: FakeKernel) -> None:
    _type1_kernel(fk)
    result = bind([EDU], fk.host)
    assert result.devices[0]["cdev"] is None and ", cdev " not in result_text(result)[0]


def test_cdev_waiter_without_events_checks_state(fk: FakeKernel) -> None:
    with VfioNodeWaiter(fk.host) as waiter, pytest.raises(TimeoutError, match="vfio0"):
        waiter.wait_cdev("vfio0", timeout=0.01)
    _iommufd_kernel(fk)
    bind([EDU], fk.host)
    with VfioNodeWaiter(fk.host) as waiter:
        assert waiter.wait_cdev("vfio0") == fk.root / "dev/vfio/devices/vfio0"


def test_devices_and_groups_show_the_cdev(fk: FakeKernel, cli_env: dict[str, str]) -> None:
    _iommufd_kernel(fk)
    bind([EDU], fk.host)
    bind(["0000:00:04.0"], fk.host)
    node = str(fk.root / "dev/vfio/devices/vfio0")
    funcs = {f.address: f for f in list_functions(fk.host, names=False)}
    assert funcs[EDU].cdev == node and funcs["0000:02:01.0"].cdev is None
    run = CliRunner().invoke
    listed = {d["address"]: d for d in json.loads(run(main, ["devices", "--json"], env=cli_env).output)}
    assert listed[EDU]["cdev"] == node and listed["0000:00:04.0"]["cdev"].endswith("/vfio1")
    table = run(main, ["devices"], env=cli_env).output.splitlines()
    header = table[0].split()
    assert header[:8] == ["ADDRESS", "ID", "CLASS", "DRIVER", "GROUP", "VFIO", "CDEV", "IN"]
    row = next(line.split() for line in table if line.startswith(EDU))
    assert row[header.index("CDEV")] == "vfio0"
    groups = {g.group: g for g in list_groups(fk.host)}
    assert groups[3].members[0]["cdev"] == node and groups[7].members[0]["cdev"] is None
    text = run(main, ["groups"], env=cli_env).output
    assert f"  {EDU}  1234:11e8  vfio-pci  cdev vfio0" in text
    listed_groups = {g["group"]: g for g in json.loads(run(main, ["groups", "--json"], env=cli_env).output)}
    assert listed_groups[3]["members"][0]["cdev"] == node
    # A process holding the cdev open keeps unbind from giving the device back.
    (fk.root / "proc/4243/fd").mkdir(parents=True)
    (fk.root / "proc/4243/comm").write_text("vmm\n")
    os.symlink(node, fk.root / "proc/4243/fd/9")
    with pytest.raises(BindError, match=rf"pid 4243 \(vmm\) has {node} open"):
        unbind([EDU], fk.host)


def test_cli_check_reports_iommufd_and_type1_decides(fk: FakeKernel, cli_env: dict[str, str]) -> None:
    _iommu_ready(fk, remap=True)
    _type1_kernel(fk)
    (fk.root / "proc/self/status").write_text(f"CapEff:\t{1 << 14:016x}\n")
    bind([EDU], fk.host)
    run = CliRunner().invoke
    text = run(main, ["check"], env=cli_env)
    assert text.exit_code == 0, text.output
    assert "[WARN] iommufd: iommufd backend unavailable: " in text.output and text.output.rstrip().endswith("ready")
    report = json.loads(run(main, ["check", "--json"], env=cli_env).output)
    assert report["ready"] is True and report["iommufd"]["ready"] is False
    assert report["iommufd"]["detail"].startswith("iommufd backend unavailable:")
    _iommufd_kernel(fk)
    unbind([EDU], fk.host)
    bind([EDU], fk.host)  # rebound under a kernel with cdevs
    report = json.loads(run(main, ["check", "--json"], env=cli_env).output)
    from hostrelay.kernel import iommufd

    assert report["iommufd"]["ready"] is iommufd.AVAILABLE, report["iommufd"]
