"""Boot the testbed VM, run one command in it, power off.

q35 under TCG (no KVM needed) with an emulated IOMMU (Intel VT-d with
interrupt remapping, or virtio-iommu), ``edu`` DMA engines and ``nvme``
controllers.  The guest runs the command as root over the host's root
filesystem (see ``initramfs``); its output streams back while it runs.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostrelay.testbed.initramfs import XFER_MOUNT, build_initramfs
from hostrelay.testbed.kernel import TestbedSetupError, find_kernel, required_modules
from hostrelay.testbed.qmp import QmpClient, serve_requests

if TYPE_CHECKING:
    from hostrelay.testbed.served import ServedIommu

__all__ = ["TestbedBootError", "TestbedConfig", "TestbedResult", "run", "qemu_binary", "TIMEOUT_STATUS"]


class TestbedBootError(TestbedSetupError):
    """The VM stopped before the command finished (guest panic, QEMU crash)."""

    def __init__(self, command_started: bool, message: str) -> None:
        super().__init__(message)
        self.command_started = command_started

IOMMUS = ("intel", "virtio")
# "host": the host's qemu-system-x86_64 (7.2 on Debian 12); "newer": trixie-backports'
# QEMU (11.1) in a private root, provisioned on first use (hostrelay.testbed.qemu_newer).
QEMUS = ("host", "newer")
# The memory backend's id when ``shared_memory`` is on (extra_qemu_args may name it).
SHARED_MEMORY_ID = "mem"
# Files in the xfer share that belong to the runner itself.
_XFER_OWN = frozenset({"cmd.sh", "output", "rc", "started"})
# Seconds QEMU gets to exit once the guest wrote the command's exit status:
# the init powers off right after (`poweroff -f`), so longer means the guest
# kernel is wedged (an oops holding a lock: seen with Linux 6.12 when
# virtio_iommu is unbound under a probed endpoint), and the result is in.
POWEROFF_GRACE = 30.0

# Exit status reported when the command did not finish in time (as timeout(1)).
TIMEOUT_STATUS = 124
# Environment carried from the host into the guest's command.
_ENV_PREFIXES = ("HOSTRELAY_", "PYTHON", "PYTEST_", "HYPOTHESIS_", "LC_")
_ENV_NAMES = ("PATH", "HOME", "LANG", "TERM", "VIRTUAL_ENV", "CI", "PYENV_VERSION", "PYENV_ROOT", "USER", "LOGNAME")


@dataclass(frozen=True)
class TestbedConfig:
    """What the VM is made of.  Defaults: Intel IOMMU, one ``edu``, no ``nvme``."""

    __test__ = False  # not a pytest test class

    iommu: str = "intel"
    edu: int = 1
    nvme: int = 0
    # edu devices behind one pcie-pci-bridge: conventional PCI behind a bridge
    # cannot be told apart by the IOMMU, so they share one IOMMU group.
    bridged_edu: int = 0
    # Empty pcie-root-ports for hot-plugging devices through QMP (device_add bus=hpN).
    hotplug_ports: int = 0
    kernel_args: tuple[str, ...] = ()
    memory_mb: int = 2048
    # One vCPU: multi-threaded TCG with two vCPUs was seen to crash the guest
    # at boot (int3 oops in text patching, Linux 6.12 on QEMU 7.2), and
    # nothing here needs a second vCPU.
    cpus: int = 1
    kernel: Path | None = None
    modules: Path | None = None
    # QEMU's instruction counter: the guest clock advances 1 ns per guest
    # instruction, so what the guest times repeats from boot to boot instead
    # of following the host's load (see _qemu_args).
    icount: bool = False
    # Boot the kernel built with IOMMUFD and VFIO_DEVICE_CDEV (hostrelay.testbed.build),
    # built on first use; ignored when ``kernel`` is given.
    iommufd: bool = False
    # Which QEMU runs the VM (see QEMUS).
    qemu: str = "host"
    # Appended to QEMU's command line as given, after the testbed's own devices:
    # for callers that add devices of their own (``-chardev socket,...``,
    # ``-device vhost-user-test-device-pci,...``, ``-device vfio-user-pci,...``,
    # ``-acpitable file=...``, tracing).
    extra_qemu_args: tuple[str, ...] = ()
    # Guest RAM in a shareable memfd (``-object memory-backend-memfd,id=mem,
    # size=<memory_mb>M,share=on``, the machine's ``memory-backend=mem``), which
    # vhost-user and vfio-user back ends map: they get its fd from QEMU.
    shared_memory: bool = False
    # hostrelay as the guest's only IOMMU (hostrelay.testbed.served): ``hostrelay
    # serve`` beside the VM, its virtio-iommu over vhost-user and
    # ``served_edu`` emulated edus over vfio-user behind it, described to the
    # guest by a VIOT.  Needs qemu="newer", iommu="virtio" (the 6.12 kernel and
    # its virtio_iommu module; QEMU's own virtio-iommu-pci is then not created),
    # shared_memory and edu=0 (QEMU's own edus would DMA around our IOMMU).
    served_iommu: bool = False
    served_edu: int = 1
    # served_iommu: ``serve --record`` (every request and reply, for replay);
    # off for a benchmark, where writing it costs the host CPU the VM needs.
    served_record: bool = True

    def __post_init__(self) -> None:
        if self.iommu not in IOMMUS:
            raise ValueError(f"iommu must be one of {IOMMUS}, not {self.iommu!r}")
        if self.qemu not in QEMUS:
            raise ValueError(f"qemu must be one of {QEMUS}, not {self.qemu!r}")
        if min(self.edu, self.nvme, self.bridged_edu, self.hotplug_ports) < 0:
            raise ValueError("device counts must be >= 0")
        if self.served_iommu:
            from hostrelay.testbed.served import MAX_SERVED_EDU

            wrong = [why for bad, why in (
                (self.qemu != "newer", 'qemu="newer" (QEMU 7.2 has neither vhost-user-test-device-pci nor vfio-user-pci)'),
                (self.iommu != "virtio", 'iommu="virtio" (the guest kernel with virtio_iommu)'),
                (not self.shared_memory, "shared_memory=True (both back ends map guest RAM)"),
                (self.edu or self.bridged_edu, "edu=0 and bridged_edu=0 (QEMU's own edu would DMA around the served IOMMU)"),
                (not 1 <= self.served_edu <= MAX_SERVED_EDU, f"served_edu in 1..{MAX_SERVED_EDU}"),
            ) if bad]  # fmt: skip
            if wrong:
                raise ValueError("served_iommu needs " + "; ".join(wrong))

    @classmethod
    def served(cls, served_edu: int = 1, **kwargs: Any) -> TestbedConfig:
        """A served-IOMMU configuration: ``served_iommu`` with everything it needs set."""
        base: dict[str, Any] = {"qemu": "newer", "iommu": "virtio", "shared_memory": True, "edu": 0}
        return cls(**{**base, **kwargs, "served_iommu": True, "served_edu": served_edu})


@dataclass
class TestbedResult:
    """How the command ended, what it printed, and how long things took."""

    __test__ = False

    returncode: int
    output: str
    timed_out: bool
    wall_seconds: float
    boot_seconds: float | None  # host wall clock from QEMU start to the command starting
    guest_uptime_at_start: float | None
    console: str = field(repr=False, default="")
    kernel: str = ""
    qemu: str = ""  # "host", or "newer <version>"
    # Files the command left in $HOSTRELAY_TESTBED_XFER (name -> content); with
    # served_iommu also the server's log and recording (hostrelay.testbed.served).
    files: dict[str, bytes] = field(repr=False, default_factory=dict)
    # served_iommu: how ``hostrelay serve`` ended after SIGTERM (None: not served).
    served_returncode: int | None = None


def qemu_binary() -> str:
    """Path of ``qemu-system-x86_64``, or a setup error naming the package."""
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        raise TestbedSetupError(
            "qemu-system-x86_64 not found: install the 'qemu-system-x86' package "
            "(apt-get install --no-install-recommends qemu-system-x86)"
        )
    return exe


def _command_script(cmd: Sequence[str], cwd: Path, config: TestbedConfig, qemu_version: str = "") -> str:
    env = {k: v for k, v in os.environ.items() if k in _ENV_NAMES or k.startswith(_ENV_PREFIXES)}
    env["HOSTRELAY_TESTBED"] = config.iommu
    env["HOSTRELAY_TESTBED_EDU"] = str(config.edu)
    env["HOSTRELAY_TESTBED_NVME"] = str(config.nvme)
    env["HOSTRELAY_TESTBED_BRIDGED_EDU"] = str(config.bridged_edu)
    env["HOSTRELAY_TESTBED_HOTPLUG_PORTS"] = str(config.hotplug_ports)
    env["HOSTRELAY_TESTBED_XFER"] = XFER_MOUNT
    # Which QEMU the guest runs on, and for "newer" its version, so a test
    # can check it against what the guest itself observes.
    env["HOSTRELAY_TESTBED_QEMU"] = config.qemu
    env["HOSTRELAY_TESTBED_QEMU_VERSION"] = qemu_version
    # With hostrelay serving the IOMMU: how many edus it serves (0: QEMU's own IOMMU).
    env["HOSTRELAY_TESTBED_SERVED_EDU"] = str(config.served_edu if config.served_iommu else 0)
    lines = ["# generated by hostrelay.testbed"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines.append(f"cd {shlex.quote(str(cwd))} 2>/dev/null || cd /")
    lines.append("exec " + " ".join(shlex.quote(c) for c in cmd))
    return "\n".join(lines) + "\n"


def _qemu_args(config: TestbedConfig, vmlinuz: Path, initrd: Path, run_dir: Path,
               served_args: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """QEMU's arguments (after the binary) for ``config``; the same for both QEMUs but where noted."""
    # no_timer_check: under TCG on a loaded host the guest's boot-time check
    # that the timer interrupt arrives (arch/x86/kernel/apic/io_apic.c
    # timer_irq_works, Linux 6.12) can time out and, with interrupt remapping
    # on, panics "timer doesn't work through Interrupt-remapped IO-APIC"
    # (seen with --iommufd --edu 3 while other testbeds ran); the parameter
    # makes it trust the timer, which QEMU's always works.
    append = ["console=ttyS0", "quiet", "panic=-1", "mitigations=off", "no_timer_check"]
    # thread=single: with several vCPUs, round-robin TCG avoids the MTTCG
    # cross-modifying-code race above.
    accel = "tcg" if config.cpus == 1 else "tcg,thread=single"
    args = ["-accel", accel, "-m", str(config.memory_mb), "-smp", str(config.cpus)]
    if config.icount:
        # QEMU 7.2 -icount: shift=0 is one guest instruction per ns of virtual
        # time; sleep=off makes an idle vCPU jump straight to the next timer
        # deadline, where the default sleep=on lets virtual time run with the
        # host clock while idle.  So what a computing guest (a benchmark loop)
        # times repeats from boot to boot whatever the host's load: to 0.01 us
        # per pair in tests/bench_vfio.py, though not bit for bit, as events
        # from the host side (I/O completions) need not land on the same
        # guest instruction each boot.
        # icount needs single-threaded TCG: QEMU 7.2 refuses
        # "-accel tcg,thread=multi" with it ("No MTTCG when icount is
        # enabled"), and given plain "tcg" it switches by itself from one
        # thread per vCPU to one round-robin thread for all of them.  So both
        # accel values above work, with any -smp, and need no change.
        args += ["-icount", "shift=0,sleep=off"]
    args += ["-nographic", "-no-reboot", "-vga", "none", "-nodefaults", "-serial", f"file:{run_dir / 'console.log'}"]
    machine = "q35"
    if config.shared_memory:
        # The machine's memory-backend property (QEMU >= 5.0) takes guest RAM
        # from the object; its size must equal -m.
        args += ["-object", f"memory-backend-memfd,id={SHARED_MEMORY_ID},size={config.memory_mb}M,share=on"]
        machine += f",memory-backend={SHARED_MEMORY_ID}"
    if config.iommu == "intel":
        # intremap=on: VFIO type1 refuses groups without interrupt remapping
        # unless allow_unsafe_interrupts=1; caching-mode=on: QEMU needs it to
        # shadow the guest's IOMMU tables for emulated DMA.  Both keep their
        # names in QEMU 11.1, where 7.2's x-scalable-mode became scalable-mode.
        iommu = "intel-iommu,intremap=on,caching-mode=on"
        if config.qemu == "newer":
            # QEMU 9.2 raised intel-iommu's default aw-bits from 39 to 48 (a
            # 4-level table); 39 keeps the guest's IOVA space what 7.2 gives.
            iommu += ",aw-bits=39"
        args += ["-machine", f"{machine},kernel-irqchip=split", "-device", iommu]
        append.append("intel_iommu=on")
    elif config.served_iommu:
        # hostrelay's virtio-iommu (extra args from hostrelay.testbed.served) is the only
        # IOMMU: no interrupt remapping, so VFIO type1 refuses groups without
        # this (Linux 6.12 vfio_iommu_type1, as for the virtio flavour's tests).
        args += ["-machine", machine]
        append.append("vfio_iommu_type1.allow_unsafe_interrupts=1")
    else:
        args += ["-machine", machine, "-device", "virtio-iommu-pci"]
    for _ in range(config.edu):
        args += ["-device", "edu"]
    if config.bridged_edu:
        args += ["-device", "pcie-root-port,id=brport,chassis=20,slot=20"]
        args += ["-device", "pcie-pci-bridge,id=br0,bus=brport"]
        for i in range(config.bridged_edu):
            args += ["-device", f"edu,bus=br0,addr={i + 1:#x}"]
    for i in range(config.hotplug_ports):
        args += ["-device", f"pcie-root-port,id=hp{i},chassis={30 + i},slot={30 + i}"]
    for i in range(config.nvme):
        disk = run_dir / f"nvme{i}.img"
        with open(disk, "wb") as f:
            f.truncate(16 << 20)
        args += ["-drive", f"file={disk},if=none,id=nvme{i},format=raw"]
        args += ["-device", f"nvme,drive=nvme{i},serial=hostrelay-nvme{i}"]
    args += [
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={run_dir / 'xfer'},mount_tag=xfer,security_model=none",
        "-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off",
    ]  # fmt: skip
    args += list(served_args)
    args += list(config.extra_qemu_args)
    args += ["-kernel", str(vmlinuz), "-initrd", str(initrd), "-append", " ".join(append + list(config.kernel_args))]
    return args


def run(
    cmd: Sequence[str],
    config: TestbedConfig | None = None,
    *,
    timeout: float = 600.0,
    cwd: Path | None = None,
    on_output: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> TestbedResult:
    """Boot the testbed, run ``cmd`` as root in it, power off, and report.

    ``on_output`` receives the command's output as it arrives; ``log`` receives
    progress lines (kernel fetch, boot).  Raises :class:`TestbedSetupError` when
    the testbed cannot be prepared (no qemu, no kernel).
    """
    config = config or TestbedConfig()
    if not cmd:
        raise ValueError("no command given")
    if config.qemu == "newer":
        from hostrelay.testbed.qemu_newer import provision_newer_qemu

        newer = provision_newer_qemu(log=log)
        qemu_argv, qemu_version = newer.command(), newer.version
    else:
        qemu_argv, qemu_version = [qemu_binary()], ""
    qemu_name = f"{config.qemu} {qemu_version}".strip()
    kernel = find_kernel(config.iommu, kernel=config.kernel, modules=config.modules, iommufd=config.iommufd, log=log)
    initrd = build_initramfs(kernel, config.iommu, required_modules(config.iommu))
    with tempfile.TemporaryDirectory(prefix="hostrelay-testbed-") as tmp:
        run_dir = Path(tmp)
        xfer = run_dir / "xfer"
        xfer.mkdir()
        (xfer / "cmd.sh").write_text(_command_script(cmd, cwd or Path.cwd(), config, qemu_version))
        served = None
        served_args: list[str] = []
        if config.served_iommu:
            from hostrelay.testbed.served import ServedIommu

            served = ServedIommu(run_dir, xfer, config.served_edu, record=config.served_record)
            served_args = served.start()
            if log:
                log(f"testbed: hostrelay serve (pid {served.proc.pid if served.proc else '?'}) serves the virtio-iommu "
                    f"and {config.served_edu} edu")  # fmt: skip
        try:
            return _boot(cmd, config, [*qemu_argv, *_qemu_args(config, kernel.vmlinuz, initrd, run_dir, served_args)],
                         run_dir, kernel.origin, qemu_name, timeout, on_output, log, served)  # fmt: skip
        finally:
            if served is not None:
                served.stop()


def _boot(cmd: Sequence[str], config: TestbedConfig, args: list[str], run_dir: Path, kernel_origin: str,
          qemu_name: str, timeout: float, on_output: Callable[[str], None] | None,
          log: Callable[[str], None] | None, served: ServedIommu | None) -> TestbedResult:  # fmt: skip
    """Run QEMU until the guest powers off (or ``timeout``); ``served``, if any, is stopped before the files are read."""
    xfer = run_dir / "xfer"
    if log:
        log(f"testbed: booting {kernel_origin} ({config.iommu} IOMMU, {config.edu} edu, {config.nvme} nvme"
            f"{f', {config.bridged_edu} edu behind a bridge' if config.bridged_edu else ''}"
            f"{f', QEMU {qemu_name}' if config.qemu != 'host' else ''}"
            f"{f', hostrelay serving the IOMMU and {config.served_edu} edu' if served is not None else ''})")
    start = time.monotonic()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    qemu_out: list[bytes] = []
    reader = threading.Thread(target=lambda: qemu_out.append(proc.stdout.read() if proc.stdout else b""), daemon=True)
    reader.start()
    output = bytearray()
    boot_seconds: float | None = None
    timed_out = False
    out_path = xfer / "output"
    pos = 0
    qmp_client: QmpClient | None = None
    rc_seen: float | None = None
    while True:
        finished = proc.poll() is not None
        if not finished:
            qmp_client = serve_requests(xfer, run_dir / "qmp.sock", qmp_client)
        if boot_seconds is None and (xfer / "started").exists():
            boot_seconds = time.monotonic() - start
            if log:
                log(f"testbed: booted in {boot_seconds:.1f} s, running {shlex.join(cmd)}")
        if out_path.exists():
            with open(out_path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
            if chunk:
                pos += len(chunk)
                output += chunk
                if on_output:
                    on_output(chunk.decode(errors="replace"))
        if finished:
            break
        gone = served.exited_early() if served is not None else None
        if gone is not None:
            # The guest's IOMMU is gone: nothing it does from here means anything.
            proc.kill()
            proc.wait()
            raise TestbedBootError(boot_seconds is not None, gone)
        if time.monotonic() - start > timeout:
            timed_out = True
            proc.kill()
            proc.wait()
            continue  # one more read of the output
        if rc_seen is None and (xfer / "rc").exists():
            rc_seen = time.monotonic()
        elif rc_seen is not None and time.monotonic() - rc_seen > POWEROFF_GRACE:
            if log:
                log(f"testbed: the guest wrote its exit status but did not power off in {POWEROFF_GRACE:.0f} s "
                    "(a wedged guest kernel?): QEMU killed")  # fmt: skip
            proc.kill()
            proc.wait()
            continue  # one more read of the output
        time.sleep(0.05)
    wall = time.monotonic() - start
    served_rc = None
    if served is not None:
        # SIGTERM: the server writes the recording's last line (the final
        # table) and exits; its files are in xfer, read below.
        served_rc = served.stop()
        if log:
            log(f"testbed: hostrelay serve stopped (exit {served_rc})")
    reader.join(timeout=5)
    if qmp_client is not None:
        qmp_client.close()
    console = (run_dir / "console.log").read_text(errors="replace") if (run_dir / "console.log").exists() else ""
    rc_path = xfer / "rc"
    uptime = None
    if (xfer / "started").exists():
        try:
            uptime = float((xfer / "started").read_text().strip())
        except ValueError:
            uptime = None
    if timed_out:
        returncode = TIMEOUT_STATUS
    elif rc_path.exists() and rc_path.read_text().strip().isdigit():
        returncode = int(rc_path.read_text().strip())
    else:
        qemu_text = b"".join(qemu_out).decode(errors="replace")
        raise TestbedBootError(
            boot_seconds is not None,
            f"the testbed VM stopped before the command finished (qemu exit {proc.returncode}).\n"
            f"qemu said: {qemu_text.strip()[-2000:]}\nguest console (last lines):\n{console[-3000:]}"
            + (f"\nhostrelay serve (exit {served_rc}) said:\n{served.log_tail(3000)}" if served is not None else "")
        )
    return TestbedResult(
        returncode=returncode,
        output=output.decode(errors="replace"),
        timed_out=timed_out,
        wall_seconds=wall,
        boot_seconds=boot_seconds,
        guest_uptime_at_start=uptime,
        console=console,
        kernel=kernel_origin,
        qemu=qemu_name,
        files={p.name: p.read_bytes() for p in xfer.iterdir() if p.is_file() and p.name not in _XFER_OWN},
        served_returncode=served_rc,
    )
