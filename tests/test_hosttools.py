"""Host tooling against the real kernel, run in the testbed.

One testbed configuration for the Intel tests (edu, nvme, two bridged edu,
two hot-plug ports), the default virtio one, and the iommufd kernel (one edu)
for the iommufd backend's nodes.  Every test leaves devices as it found them
(driverless edu, nvme on nvme), so the order does not matter.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostrelay.host.sysfs import Host, driver_of, find_pci

INTEL = {"iommu": "intel", "edu": 1, "nvme": 1, "bridged_edu": 2, "hotplug_ports": 2}
IOMMUFD = {"edu": 1, "iommufd": True}  # the kernel built with IOMMUFD and VFIO device cdevs (hostrelay.testbed.build)
EDU = (0x1234, 0x11E8)
NVME = (0x1B36, 0x0010)
UDEVD_ENV = {**os.environ, "SYSTEMD_IGNORE_CHROOT": "1"}  # the testbed runs its command in a chroot


def hostrelay(*args: str, state_dir: Path, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the CLI as an operator would (a separate process)."""
    env = {**os.environ, "HOSTRELAY_STATE_DIR": str(state_dir)}
    proc = subprocess.run([sys.executable, "-m", "hostrelay.cli", *args], capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert proc.returncode == 0, f"hostrelay {' '.join(args)} exited {proc.returncode}: {proc.stderr}"
    return proc


def lone_edu() -> str:
    """The first edu alone in its IOMMU group (on the root bus)."""
    host = Host()
    for bdf in find_pci(*EDU):
        group = host.group(bdf)
        if group is not None and host.group_members(group) == [bdf]:
            return bdf
    pytest.fail("no edu in a group of its own")


def bridged_edus() -> list[str]:
    host = Host()
    shared = [b for b in find_pci(*EDU) if (g := host.group(b)) is not None and len(host.group_members(g)) > 1]
    assert len(shared) == 2, shared
    return shared


def nvme_block_dir(bdf: str) -> list[str]:
    return sorted(p.name for p in Path(f"/sys/bus/pci/devices/{bdf}").glob("nvme/nvme*/nvme*n*"))


def node_ready(bdf: str) -> Path:
    node = Host().vfio_node(Host().group(bdf) or -1)
    assert node.exists(), f"{node} missing right after bind returned"
    return node


def reload_udev_rules() -> None:
    """``udevadm control --reload``, then wait until udevd really runs the rules now on disk.

    ``udevadm control --reload`` exiting 0 does not mean udevd reloaded: udevd
    drops a control message whose SCM_CREDENTIALS do not say uid 0, logging
    only "Invalid sender uid 65534, ignoring message", and the client never
    learns (seen in the testbed on the reload sent soon after udevd started).
    udevd also re-checks the rule files by itself, but only on an event and at
    most every 3 s, so an event right after a dropped reload runs the old rules.
    So: add a probe rule (after the caller's rule files) that tags a ``change``
    event of one PCI device with a fresh token, send that event, and wait for
    udev's copy of it; without the token udevd still has an older rule set:
    reload and probe again.  A rule set that has the probe has every file
    written before it.
    """
    import uuid

    import pyudev

    bdf = sorted(p.name for p in Path("/sys/bus/pci/devices").iterdir())[0]
    token = uuid.uuid4().hex
    probe = Path("/etc/udev/rules.d/99-hostrelay-test-probe.rules")
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text(f'ACTION=="change", SUBSYSTEM=="pci", KERNEL=="{bdf}", ENV{{HOSTRELAY_TEST_PROBE}}="{token}"\n')
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
    monitor.filter_by("pci")
    monitor.start()  # before the change event is sent
    deadline = time.monotonic() + 60
    try:
        while True:
            subprocess.run(["udevadm", "control", "--reload"], check=True, env=UDEVD_ENV)
            Path(f"/sys/bus/pci/devices/{bdf}/uevent").write_text("change")
            while True:  # udev's copy of our change event (others may come first)
                dev = monitor.poll(timeout=max(0.0, deadline - time.monotonic()))
                assert dev is not None, "udevd did not process a change event within 60 s"
                if dev.action == "change" and dev.sys_name == bdf:
                    break
            if dev.properties.get("HOSTRELAY_TEST_PROBE") == token:
                return
            assert time.monotonic() < deadline, "udevd did not load the new rules within 60 s"
    finally:
        probe.unlink()  # udevd keeps it until its next reload; it only tags that one change event


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def udevd() -> Iterator[None]:
    """A udev daemon in the guest (the testbed boots without one); left running."""
    if not Path("/run/udev/control").exists():
        exe = next((p for p in ("/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd") if Path(p).exists()), None)
        if exe is None:
            pytest.fail("systemd-udevd is not installed on the host (the 'udev' package; ./dev installs it)")
        subprocess.run([exe, "--daemon"], check=True, env=UDEVD_ENV)
        # udevd creates its control socket before daemonizing returns to us.
        assert Path("/run/udev/control").exists()
    yield


# ------------------------------------------------------------ bind / restore
@pytest.mark.vfio(**INTEL)
def test_bind_edu_and_nvme_then_restore(state_dir: Path) -> None:
    import pyudev

    from hostrelay.host.udev import event_source

    edu, nvme = lone_edu(), find_pci(*NVME)[0]
    assert driver_of(nvme) == "nvme" and driver_of(edu) is None
    disks = nvme_block_dir(nvme)
    assert disks and all(Path(f"/dev/{d}").exists() for d in disks), disks

    out = hostrelay("bind", edu, nvme, "--json", state_dir=state_dir, check=True)
    result = json.loads(out.stdout)
    assert {d["address"]: d["from"] for d in result["devices"]} == {edu: None, nvme: "nvme"}
    assert driver_of(edu) == driver_of(nvme) == "vfio-pci"
    node_ready(edu), node_ready(nvme)
    assert not any(Path(f"/dev/{d}").exists() for d in disks), "nvme block device still there on vfio-pci"
    assert json.loads((state_dir / f"{nvme}.json").read_text())["driver"] == "nvme"
    assert Path(f"/sys/bus/pci/devices/{nvme}/driver_override").read_text().strip() == "vfio-pci"

    source = event_source(Host())
    assert source is not None
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
    monitor.filter_by("block")
    monitor.start()  # before the unbind, so the disk's add event cannot be missed
    hostrelay("unbind", "--restore", edu, nvme, state_dir=state_dir, check=True)
    assert driver_of(nvme) == "nvme"
    assert driver_of(edu) is None
    for bdf in (edu, nvme):
        assert Path(f"/sys/bus/pci/devices/{bdf}/driver_override").read_text().strip() == "(null)"
        assert not (state_dir / f"{bdf}.json").exists()
    # nvme scans namespaces asynchronously after probe: wait for the disk's add event.
    deadline = time.monotonic() + 30
    seen = set()
    while not all(d in seen or Path(f"/dev/{d}").exists() for d in disks):
        dev = monitor.poll(timeout=max(0.0, deadline - time.monotonic()))
        assert dev is not None, f"block device {disks} did not come back"
        if dev.action == "add":
            seen.add(dev.sys_name)
    assert all(Path(f"/dev/{d}").exists() for d in disks)


@pytest.mark.vfio(**INTEL)
def test_bind_refuses_nvme_in_use_unless_forced(state_dir: Path) -> None:
    # Swap on the disk: the testbed kernel has no block filesystem built in
    # (ext4 is a module it does not load), swap is always built in.
    nvme = find_pci(*NVME)[0]
    disk = f"/dev/{nvme_block_dir(nvme)[0]}"
    subprocess.run(["mkswap", "-q", disk], check=True)
    subprocess.run(["swapon", disk], check=True)
    try:
        listed = {d["address"]: d for d in json.loads(hostrelay("devices", "--json", state_dir=state_dir, check=True).stdout)}
        assert any("swap" in r for r in listed[nvme]["in_use"]), listed[nvme]
        refused = hostrelay("bind", nvme, state_dir=state_dir)
        assert refused.returncode == 1
        assert "swap" in refused.stderr and "--force" in refused.stderr
        assert driver_of(nvme) == "nvme"
        assert not (state_dir / f"{nvme}.json").exists()
    finally:
        subprocess.run(["swapoff", disk], check=True)
    listed = {d["address"]: d for d in json.loads(hostrelay("devices", "--json", state_dir=state_dir, check=True).stdout)}
    assert listed[nvme]["in_use"] == []


@pytest.mark.vfio(**INTEL)
def test_unbind_refused_while_group_open(state_dir: Path) -> None:
    from hostrelay.kernel.vfio import Group

    edu = lone_edu()
    hostrelay("bind", edu, state_dir=state_dir, check=True)
    try:
        with Group.for_device(edu):
            refused = hostrelay("unbind", "--restore", edu, state_dir=state_dir)
            assert refused.returncode == 1
            assert f"pid {os.getpid()}" in refused.stderr, refused.stderr
            assert driver_of(edu) == "vfio-pci"
    finally:
        hostrelay("unbind", "--restore", edu, state_dir=state_dir, check=True)
    assert driver_of(edu) is None


# ------------------------------------------------------------------ groups
@pytest.mark.vfio(**INTEL)
def test_shared_group_refused_dry_run_then_group_bind(state_dir: Path) -> None:
    a, b = bridged_edus()
    host = Host()
    group = host.group(a)
    assert group is not None and host.group(b) == group
    groups = {g["group"]: g for g in json.loads(hostrelay("groups", "--json", state_dir=state_dir, check=True).stdout)}
    assert {m["address"] for m in groups[group]["members"]} >= {a, b}
    assert groups[group]["viable"] is True  # both driverless
    assert groups[group]["reserved_regions"], "intel-iommu reports at least the MSI window"

    refused = hostrelay("bind", a, state_dir=state_dir)
    assert refused.returncode == 1
    assert b in refused.stderr and "--group" in refused.stderr
    assert driver_of(a) is None and driver_of(b) is None

    dry = hostrelay("bind", a, "--group", "--dry-run", "--json", state_dir=state_dir, check=True)
    plan = json.loads(dry.stdout)
    assert plan["dry_run"] is True
    assert [(Path(w["path"]).name, w["value"]) for w in plan["writes"]] == [
        ("driver_override", "vfio-pci"), ("drivers_probe", a), ("driver_override", "vfio-pci"), ("drivers_probe", b)]
    assert driver_of(a) is None and driver_of(b) is None, "dry run changed a driver link"
    assert not state_dir.exists() or not list(state_dir.iterdir()), "dry run saved state"
    human = hostrelay("bind", a, "--group", "--dry-run", state_dir=state_dir, check=True)
    assert f"/sys/bus/pci/devices/{b}/driver_override" in human.stdout

    hostrelay("bind", a, "--group", state_dir=state_dir, check=True)
    assert driver_of(a) == driver_of(b) == "vfio-pci"
    node_ready(a)
    hostrelay("unbind", "--restore", a, b, state_dir=state_dir, check=True)
    assert driver_of(a) is None and driver_of(b) is None


# ---------------------------------------------------------------- hot-plug
@pytest.mark.vfio(**INTEL)
def test_hotplugged_device_seen_through_udev_event_and_bound(state_dir: Path, udevd: None) -> None:
    from hostrelay.testbed.qmp import guest_qmp

    env = {**os.environ, "HOSTRELAY_STATE_DIR": str(state_dir)}
    watch = subprocess.Popen([sys.executable, "-m", "hostrelay.cli", "devices", "--watch", "--json", "--count", "1",
                              "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert watch.stderr is not None and watch.stdout is not None
        ready = watch.stderr.readline()  # printed once the monitor is listening
        assert "listening" in ready and "udev" in ready, ready
        before = set(find_pci(*EDU))
        guest_qmp("device_add", {"driver": "edu", "bus": "hp0", "id": "hot0"})
        event = json.loads(watch.stdout.readline())
        assert watch.wait(timeout=60) == 0
    finally:
        if watch.poll() is None:
            watch.kill()
    assert event["action"] == "add" and event["source"] == "udev"
    new = event["address"]
    assert new not in before and new in find_pci(*EDU)
    assert (event["device"]["vendor"], event["device"]["device"]) == ("1234", "11e8")
    listed = {d["address"]: d for d in json.loads(hostrelay("devices", "--json", state_dir=state_dir, check=True).stdout)}
    assert listed[new]["iommu_group"] is not None and listed[new]["vfio_ready"] is False

    hostrelay("bind", new, state_dir=state_dir, check=True)
    assert driver_of(new) == "vfio-pci"
    node_ready(new)
    listed = {d["address"]: d for d in json.loads(hostrelay("devices", "--json", state_dir=state_dir, check=True).stdout)}
    assert listed[new]["vfio_ready"] is True
    hostrelay("unbind", "--restore", new, state_dir=state_dir, check=True)
    assert driver_of(new) is None


@pytest.mark.vfio(**INTEL)
def test_boot_bind_rule_binds_hotplugged_device(state_dir: Path, udevd: None) -> None:
    from hostrelay.testbed.qmp import guest_qmp
    from hostrelay.host.udev import PciWatcher

    rules = hostrelay("udev-rules", "--bind", "1234:11e8", state_dir=state_dir, check=True).stdout
    rule_file = Path("/etc/udev/rules.d/60-hostrelay-vfio-bind.rules")
    rule_file.parent.mkdir(parents=True, exist_ok=True)
    rule_file.write_text(rules)
    reload_udev_rules()  # udevd may ignore a bare --reload; the hot-plug must meet the rule
    try:
        before = set(find_pci(*EDU))
        with PciWatcher(Host()) as watcher:
            guest_qmp("device_add", {"driver": "edu", "bus": "hp1", "id": "hot1"})
            bound = None
            for ev in watcher.events(timeout=60, actions=("bind",)):
                if ev.address not in before and driver_of(ev.address) == "vfio-pci":
                    bound = ev.address
                    break
        assert bound is not None, "the hot-plugged edu was not bound to vfio-pci by the rule"
        assert Path(f"/sys/bus/pci/devices/{bound}/driver_override").read_text().strip() == "vfio-pci"
    finally:
        rule_file.unlink()
        reload_udev_rules()
    hostrelay("unbind", "--restore", bound, state_dir=state_dir, check=True)
    assert driver_of(bound) is None


# ------------------------------------------------------- unprivileged user
MAP_UNMAP = """
import mmap, sys
from hostrelay.kernel.vfio import Container, Group
buf = mmap.mmap(-1, 1 << 20)
addr = __import__("ctypes").addressof(__import__("ctypes").c_char.from_buffer(buf))
with Container() as c:
    c.attach(Group(int(sys.argv[1])))
    c.map_dma(0x100000, 1 << 20, addr)
    print("unmapped", c.unmap_dma(0x100000, 1 << 20))
"""


def _as_user(user: str, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    pw = pwd.getpwnam(user)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(Path(__file__).parents[1]), "HOME": "/tmp"}
    # prlimit raises RLIMIT_MEMLOCK while still root; setpriv then drops to the user with its groups.
    cmd = ["prlimit", f"--memlock={64 << 20}", "setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
           sys.executable, "-c", script, *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/tmp", timeout=60)


def _test_users() -> None:
    """Group hrvfio with member hruser, and hrother outside it (in the guest's overlay only)."""
    subprocess.run(["groupadd", "-f", "hrvfio"], check=True)
    for user, extra in (("hruser", ["-G", "hrvfio"]), ("hrother", [])):
        if subprocess.run(["id", user], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "-M", "-N", "-g", "nogroup", *extra, user], check=True)
    # The host's interpreter lives under /root (0700); open it up in the guest's overlay only.
    os.chmod("/root", 0o755)


@pytest.mark.vfio(**INTEL)
def test_udev_group_rule_lets_unprivileged_user_map(state_dir: Path, udevd: None) -> None:
    _test_users()
    rules = hostrelay("udev-rules", "--group", "hrvfio", state_dir=state_dir, check=True).stdout
    Path("/etc/udev/rules.d").mkdir(parents=True, exist_ok=True)
    Path("/etc/udev/rules.d/70-hostrelay-vfio.rules").write_text(rules)
    reload_udev_rules()

    edu = lone_edu()
    hostrelay("bind", edu, state_dir=state_dir, check=True)
    try:
        node = node_ready(edu)
        st = node.stat()
        # bind waited for udev's event, so the rule has run when it returns.
        assert st.st_gid == grp.getgrnam("hrvfio").gr_gid and st.st_mode & 0o777 == 0o660, oct(st.st_mode)
        group = str(Host().group(edu))
        ok = _as_user("hruser", MAP_UNMAP, group)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.split() == ["unmapped", str(1 << 20)]
        denied = _as_user("hrother", MAP_UNMAP, group)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied.stderr
        checked = _as_user("hruser", "import sys; from hostrelay.cli import main; main(sys.argv[1:])", "check", "--json",
                           "--guest-ram", "32M")  # fmt: skip
        report: dict[str, Any] = json.loads(checked.stdout)
        perms = [f for f in report["findings"] if f["check"] == "vfio-permissions"]
        assert perms and all(f["status"] == "ok" for f in perms), perms
    finally:
        hostrelay("unbind", "--restore", edu, state_dir=state_dir, check=True)


# --------------------------------------------------------------------- check
def _findings(out: subprocess.CompletedProcess[str]) -> dict[str, dict[str, str]]:
    return {f["check"]: f for f in json.loads(out.stdout)["findings"]}


@pytest.mark.vfio(**INTEL)
def test_check_passes_under_intel(state_dir: Path) -> None:
    out = hostrelay("check", "--json", "--guest-ram", "1G", state_dir=state_dir)
    findings = _findings(out)
    assert out.returncode == 0, findings
    assert json.loads(out.stdout)["ready"] is True
    assert findings["interrupt-remapping"]["status"] == "ok"
    assert "Intel VT-d" in findings["iommu"]["detail"]
    assert findings["vfio-modules"]["status"] == "ok"


@pytest.mark.vfio(iommu="virtio")
def test_check_reports_missing_interrupt_remapping_under_virtio(state_dir: Path) -> None:
    param = Path("/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts")
    original = param.read_text().strip()
    assert original in ("Y", "1")  # the testbed sets it: virtio-iommu has no interrupt remapping
    findings = _findings(hostrelay("check", "--json", state_dir=state_dir))
    assert findings["interrupt-remapping"]["status"] == "warn"
    assert "no interrupt remapping" in findings["interrupt-remapping"]["detail"]
    param.write_text("N")
    try:
        out = hostrelay("check", state_dir=state_dir)
        assert out.returncode == 1
        assert "[FAIL] interrupt-remapping" in out.stdout and "allow_unsafe_interrupts=1" in out.stdout
        assert "NOT ready" in out.stdout
    finally:
        param.write_text("Y")


# ------------------------------------------------------------------ iommufd
def _char_device(path: Path) -> bool:
    return path.exists() and stat.S_ISCHR(path.stat().st_mode)


def _cdev_of(bdf: str) -> Path:
    # Linux >= 6.6 with CONFIG_VFIO_DEVICE_CDEV: <dev>/vfio-dev/vfioN has a dev
    # number and devtmpfs creates /dev/vfio/devices/vfioN.
    (name,) = os.listdir(f"/sys/bus/pci/devices/{bdf}/vfio-dev")
    assert Path(f"/sys/bus/pci/devices/{bdf}/vfio-dev/{name}/dev").exists()
    return Path("/dev/vfio/devices") / name


@pytest.mark.vfio(**INTEL)
def test_type1_kernel_check_says_iommufd_unavailable_and_bind_has_no_cdev(state_dir: Path) -> None:
    if Path("/dev/iommu").exists():
        pytest.skip("this kernel has iommufd; the testbed's stock Debian kernel has not")
    edu = lone_edu()
    bound = json.loads(hostrelay("bind", edu, "--json", state_dir=state_dir, check=True).stdout)
    try:
        assert bound["devices"][0]["cdev"] is None, "no cdev support is not an error"
        # The vfio-dev device exists all the same (Linux >= 6.1), without a dev number.
        (name,) = os.listdir(f"/sys/bus/pci/devices/{edu}/vfio-dev")
        assert not Path(f"/sys/bus/pci/devices/{edu}/vfio-dev/{name}/dev").exists()
        assert not Path("/dev/vfio/devices").exists()
        out = hostrelay("check", "--json", "--guest-ram", "1G", state_dir=state_dir)
        report = json.loads(out.stdout)
        assert out.returncode == 0 and report["ready"] is True, "the type1 checks decide"
        assert report["iommufd"]["ready"] is False
        assert report["iommufd"]["detail"].startswith("iommufd backend unavailable: /dev/iommu does not exist")
        findings = _findings(out)
        assert findings["iommufd-cdev"]["status"] == "warn"
        assert "no; evidence: vfio is loaded but registered no 'vfio-dev' char region" in findings["iommufd-cdev"]["detail"]
        assert all(f["status"] != "fail" for f in report["findings"] if f["check"].startswith("iommufd"))
        text = hostrelay("check", "--guest-ram", "1G", state_dir=state_dir)
        assert "[WARN] iommufd: iommufd backend unavailable: /dev/iommu does not exist" in text.stdout
        assert text.returncode == 0 and text.stdout.splitlines()[-1] == "ready"
        listed = {d["address"]: d for d in json.loads(hostrelay("devices", "--json", state_dir=state_dir, check=True).stdout)}
        assert listed[edu]["cdev"] is None and listed[edu]["vfio_ready"] is True
    finally:
        hostrelay("unbind", "--restore", edu, state_dir=state_dir, check=True)


@pytest.mark.vfio(**IOMMUFD)
def test_iommufd_kernel_check_bind_devices_groups_show_the_cdev(state_dir: Path) -> None:
    edu = lone_edu()
    before = hostrelay("check", "--json", state_dir=state_dir)
    assert before.returncode == 0, before.stdout
    assert _findings(before)["iommufd-devices"]["detail"].startswith("no device is bound")

    bound = hostrelay("bind", edu, state_dir=state_dir, check=True)
    try:
        cdev = _cdev_of(edu)
        assert f", cdev {cdev})" in bound.stdout, bound.stdout
        assert _char_device(cdev), "bind returned before the cdev node existed"
        out = hostrelay("check", "--json", state_dir=state_dir)
        report = json.loads(out.stdout)
        findings = _findings(out)
        assert out.returncode == 0 and report["ready"] is True, findings
        assert report["iommufd"]["ready"] is True, report["iommufd"]
        assert report["iommufd"]["detail"].startswith("iommufd backend ready")
        assert findings["iommufd-dev"]["status"] == "ok" and "/dev/iommu" in findings["iommufd-dev"]["detail"]
        assert findings["iommufd-cdev"]["status"] == "ok"
        assert "evidence: vfio registered the 'vfio-dev' char region (/proc/devices)" in findings["iommufd-cdev"]["detail"]
        assert findings["iommufd-devices"]["status"] == "ok"
        assert findings["iommufd-devices"]["detail"].startswith(f"{edu}: {cdev}, uid 0 can open it")
        assert findings["iommufd-build"]["status"] == "ok"
        text = hostrelay("check", state_dir=state_dir, check=True).stdout
        assert "[OK  ] iommufd: iommufd backend ready" in text

        listed = {d["address"]: d for d in json.loads(hostrelay("devices", "--json", state_dir=state_dir, check=True).stdout)}
        assert listed[edu]["cdev"] == str(cdev)
        table = hostrelay("devices", state_dir=state_dir, check=True).stdout.splitlines()
        column = table[0].split().index("CDEV")
        assert next(line.split() for line in table if line.startswith(edu))[column] == cdev.name
        groups = hostrelay("groups", state_dir=state_dir, check=True).stdout
        assert f"{edu}  1234:11e8  vfio-pci  cdev {cdev.name}" in groups
        group = Host().group(edu)
        listed_groups = {g["group"]: g for g in json.loads(hostrelay("groups", "--json", state_dir=state_dir, check=True).stdout)}
        assert listed_groups[group]["members"][0]["cdev"] == str(cdev)
    finally:
        unbound = hostrelay("unbind", "--restore", edu, state_dir=state_dir, check=True)
    assert f"vfio-pci -> no driver (cdev {cdev} removed)" in unbound.stdout
    assert not cdev.exists() and driver_of(edu) is None
    listed = {d["address"]: d for d in json.loads(hostrelay("devices", "--json", state_dir=state_dir, check=True).stdout)}
    assert listed[edu]["cdev"] is None


IOMMUFD_MAP_UNMAP = """
import mmap, sys
from hostrelay.kernel.ioctl import buffer_address
from hostrelay.kernel.iommufd import Iommufd, IommufdDevice
buf = mmap.mmap(-1, 1 << 20)
with Iommufd() as fd:
    ioas = fd.ioas()
    dev = IommufdDevice(sys.argv[1], fd)
    try:
        dev.attach(ioas.id)
        ioas.map(0x100000, 1 << 20, buffer_address(buf))
        print("unmapped", ioas.unmap(0x100000, 1 << 20))
    finally:
        dev.close()
"""


@pytest.mark.vfio(**IOMMUFD)
def test_udev_group_rule_gives_iommufd_nodes_to_the_group(state_dir: Path, udevd: None) -> None:
    import pyudev

    _test_users()
    rules = hostrelay("udev-rules", "--group", "hrvfio", "--mode", "0660", state_dir=state_dir, check=True).stdout
    assert 'SUBSYSTEM=="misc", KERNEL=="iommu", GROUP="hrvfio", MODE="0660"' in rules
    Path("/etc/udev/rules.d").mkdir(parents=True, exist_ok=True)
    Path("/etc/udev/rules.d/70-hostrelay-vfio.rules").write_text(rules)
    reload_udev_rules()
    gid = grp.getgrnam("hrvfio").gr_gid

    # /dev/iommu was created at boot (0660 root:root, iommufd's misc device):
    # a change event makes udevd apply the rule to it, as 'udevadm trigger' would.
    iommu = Path("/dev/iommu")
    assert iommu.stat().st_gid == 0
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
    monitor.filter_by("misc")
    monitor.start()
    Path("/sys/class/misc/iommu/uevent").write_text("change")
    deadline = time.monotonic() + 30
    while True:
        dev = monitor.poll(timeout=max(0.0, deadline - time.monotonic()))
        assert dev is not None, "udevd did not process the change event of /dev/iommu"
        if dev.action == "change" and dev.sys_name == "iommu":
            break
    st = iommu.stat()
    assert st.st_gid == gid and stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)

    edu = lone_edu()
    hostrelay("bind", edu, state_dir=state_dir, check=True)
    try:
        cdev = _cdev_of(edu)
        st = cdev.stat()
        # bind waited for udev's add event of the cdev, so the rule has run when it returns.
        assert st.st_gid == gid and stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
        ok = _as_user("hruser", IOMMUFD_MAP_UNMAP, edu)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.split() == ["unmapped", str(1 << 20)]
        denied = _as_user("hrother", IOMMUFD_MAP_UNMAP, edu)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied.stderr
        checked = _as_user("hruser", "import sys; from hostrelay.cli import main; main(sys.argv[1:])", "check", "--json")
        report: dict[str, Any] = json.loads(checked.stdout)
        assert report["iommufd"]["ready"] is True, report["iommufd"]
        found = {f["check"]: f for f in report["findings"]}
        assert found["iommufd-dev"]["status"] == "ok" and found["iommufd-devices"]["status"] == "ok", found
        other = json.loads(_as_user("hrother", "import sys; from hostrelay.cli import main; main(sys.argv[1:])",
                                    "check", "--json").stdout)  # fmt: skip
        assert other["iommufd"]["detail"].startswith("iommufd backend unavailable: uid"), other["iommufd"]
    finally:
        hostrelay("unbind", "--restore", edu, state_dir=state_dir, check=True)
