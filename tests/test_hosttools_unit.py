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
from hostrelay.host.binding import BindError, bind, bind_vfio, plan_bind, unbind
from hostrelay.host.check import parse_size, readiness, ready
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
    assert rules_text("kvm", []) == access_rule("kvm")


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
