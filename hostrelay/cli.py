"""The ``hostrelay`` command line (click).  Front end only: no business logic here."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from hostrelay import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hostrelay")
def main() -> None:
    """hostrelay: the host side of a paravirtualized IOMMU (virtio-iommu → VFIO)."""


@main.command("demo")
@click.option("--device", "devices", multiple=True, metavar="ADDR",
              help="Run on this VFIO host with your own edu or NVMe function instead of the testbed (repeatable).")
@click.option("--iommu", type=click.Choice(["intel", "virtio"]), default="intel", show_default=True,
              help="Testbed IOMMU flavour.")
@click.option("--timeout", type=float, default=900.0, show_default=True, help="Seconds before the testbed is killed.")
@click.option("--backend", type=click.Choice(["type1", "iommufd", "auto"]), default="type1", show_default=True,
              help="How the relay drives VFIO: a type1 container per group, or one iommufd IOAS per domain "
                   "(the testbed then boots its iommufd kernel).")
def demo_cmd(devices: tuple[str, ...], iommu: str, timeout: float, backend: str) -> None:
    """The main job: a guest's virtio-iommu session relayed to a real IOMMU.

    With no arguments it boots the built-in testbed and, inside it, binds an
    edu DMA engine and an NVMe controller with this CLI, builds a Relay over
    memfd guest memory and plays PROBE, ATTACH, MAP, device DMA that lands,
    UNMAP, the same DMA blocked, a second domain (NVMe Identify) and DETACH,
    printing each step.  Exit status 0 when every check held.
    """
    import os

    from hostrelay import demo

    if devices or os.environ.get("HOSTRELAY_TESTBED"):
        sys.exit(demo.main([*(a for d in devices for a in ("--device", d)), "--backend", backend]))
    from hostrelay.testbed import TestbedSetupError

    def out(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        sys.exit(demo.launch(timeout=timeout, iommu=iommu, out=out, log=lambda t: click.echo(t, err=True),
                             backend=backend))  # fmt: skip
    except TestbedSetupError as exc:
        click.echo(f"hostrelay demo: {exc}", err=True)
        sys.exit(1)


def _edu_spec(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for v in values:
        path, sep, bdf = v.rpartition("@")
        if not sep or not path or not bdf:
            raise click.BadParameter(f"{v!r} is not SOCKET@BDF", ctx, param)
        out.append((path, bdf))
    return out


@main.command("serve")
@click.option("--vhost-user", "vhost_user", required=True, metavar="SOCKET",
              help="Listen here for a vhost-user front end (QEMU: -chardev socket,path=SOCKET "
                   "-device vhost-user-test-device-pci,virtio-id=23,num_vqs=2,config_size=40).")
@click.option("--edu", "edus", multiple=True, metavar="SOCKET@BDF", callback=_edu_spec,
              help="Also serve an emulated edu endpoint over vfio-user on SOCKET, as PCI function BDF (repeatable).")
@click.option("--bypass/--no-bypass", default=True, show_default=True, help="Config bypass at reset.")
@click.option("--record", "record_path", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Write every request served and its reply, each reset's table and the final table to this file "
                   "(JSON lines, see hostrelay.frontends.record) for replay.")
@click.option("--kick-thread/--no-kick-thread", default=True, show_default=True, envvar="HOSTRELAY_KICK_THREAD",
              help="Serve the request queue's MAP/UNMAP from a C thread woken by its kick eventfd (no Python per kick).")
@click.option("--kick-spin", type=click.FloatRange(0, 10_000), default=0.0, show_default=True, metavar="US",
              envvar="HOSTRELAY_KICK_SPIN",
              help="With --kick-thread: look for the guest's next request this many microseconds after each one "
                   "before sleeping (takes a core while it looks).")
@click.option("--kick-priority", type=click.IntRange(0, 99), default=0, show_default=True, metavar="N",
              envvar="HOSTRELAY_KICK_PRIORITY",
              help="With --kick-thread: run it SCHED_FIFO at priority N (0: normally), so a kick wakes it at once on a "
                   "busy host; needs CAP_SYS_NICE; not with --kick-spin.")
@click.option("-v", "--verbose", is_flag=True, help="Log each connection and reset.")
def serve_cmd(vhost_user: str, edus: list[tuple[str, str]], bypass: bool, record_path: Path | None,
              kick_thread: bool, kick_spin: float, kick_priority: int, verbose: bool) -> None:  # fmt: skip
    """Serve the virtio-iommu device to a VMM over vhost-user until SIGTERM or SIGINT.

    One front end at a time; after a disconnect (the device is reset) the
    next one is served.  Errors in what a front end sends are logged and end
    its connection, not the server.
    """
    import importlib
    import logging

    from hostrelay.backends.memory import GuestMemory
    from hostrelay.frontends.vhost_user import FrontEndFactory, serve
    from hostrelay.relay import Relay

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="hostrelay serve: %(levelname)s %(message)s")  # fmt: skip
    factories: list[FrontEndFactory] = []
    if edus:
        try:
            vfio_user = importlib.import_module("hostrelay.frontends.vfio_user")
        except ModuleNotFoundError:
            click.echo("hostrelay serve: --edu is not available yet (this build has no "
                       "hostrelay.frontends.vfio_user)", err=True)  # fmt: skip
            sys.exit(2)
        # The vfio-user module's hook: edu_frontend(socket_path, bdf) -> FrontEndFactory.
        try:
            factories = [vfio_user.edu_frontend(path, bdf) for path, bdf in edus]
        except ValueError as exc:  # a malformed BDF
            raise click.BadParameter(str(exc), param_hint="'--edu'") from exc
        bdfs = [vfio_user.endpoint_id_of(bdf) for _, bdf in edus]
        if len(set(bdfs)) != len(bdfs):
            raise click.BadParameter("two endpoints at one PCI address", param_hint="'--edu'")
    from hostrelay.frontends.loop import Loop
    from hostrelay.frontends.vhost_user import VhostUserServer

    loop: Loop | None = None
    recording: Any = None
    if record_path is not None:
        from hostrelay.frontends.record import RecordingLoop, RecordingRelay, open_record

        try:
            record = open_record(record_path)
        except OSError as exc:
            click.echo(f"hostrelay serve: --record: {exc}", err=True)
            sys.exit(1)
        recording = RecordingRelay(GuestMemory(), bypass=bypass, record=record)
        loop = RecordingLoop(recording)
    relay: Relay = recording if recording is not None else Relay(GuestMemory(), bypass=bypass)

    def ready(server: VhostUserServer) -> None:
        if recording is not None:
            recording.begin()  # every endpoint is declared now, and nothing has been served
        click.echo(f"hostrelay serve: vhost-user on {server.path}", err=True)

    try:
        serve(vhost_user, relay, frontends=factories, ready=ready, loop=loop, kick_thread=kick_thread,
              kick_spin=kick_spin * 1e-6, kick_priority=kick_priority)  # fmt: skip
    except OSError as exc:
        click.echo(f"hostrelay serve: {exc}", err=True)
        sys.exit(1)
    finally:
        if recording is not None:
            recording.finish()
            recording.record.close()
            click.echo(f"hostrelay serve: recorded {recording.recorded} requests to {record_path}", err=True)
        relay.close()
        relay.memory.close()


@main.group()
def testbed() -> None:
    """The built-in VFIO testbed: a QEMU VM with an emulated IOMMU and DMA devices."""


# Options end at `--` or at the first word that is not an option, and one the
# testbed does not know is a usage error (exit 2) before anything boots:
# ignoring unknown options would boot the guest only to run a mistyped option
# as the command (exit 127), and interspersed options would take an option of
# CMD's own that the testbed also has (`python bench.py --edu 4`).
@testbed.command("run", context_settings={"allow_interspersed_args": False})
@click.option("--iommu", type=click.Choice(["intel", "virtio"]), default="intel", show_default=True,
              help="Emulated IOMMU: Intel VT-d with interrupt remapping, or virtio-iommu.")
@click.option("--edu", type=click.IntRange(0, 8), default=1, show_default=True, help="Number of edu DMA devices.")
@click.option("--nvme", type=click.IntRange(0, 8), default=0, show_default=True, help="Number of nvme controllers.")
@click.option("--bridged-edu", type=click.IntRange(0, 8), default=0, show_default=True,
              help="edu devices behind one pcie-pci-bridge (they share an IOMMU group).")
@click.option("--hotplug-ports", type=click.IntRange(0, 8), default=0, show_default=True,
              help="Empty PCIe root ports hp0.. for QMP device_add.")
@click.option("--kernel-arg", "kernel_args", multiple=True, metavar="ARG",
              help="Extra kernel command line argument; module.param=value applies to the modules the testbed loads.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds before the VM is killed (exit 124).")
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Kernel image to boot.")
@click.option("--modules", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The /lib/modules/<release> directory that goes with --kernel.")
@click.option("--memory", "memory_mb", type=click.IntRange(256, 16384), default=2048, show_default=True, help="Guest RAM in MiB.")
@click.option("--iommufd", is_flag=True,
              help="Boot the kernel built with IOMMUFD and VFIO device cdevs (built once per machine, ~11 min).")
@click.option("--icount", is_flag=True,
              help="Run the guest under QEMU's instruction counter (-icount shift=0,sleep=off): timings are in guest "
                   "instructions (1 ns each) and repeat from boot to boot.")
@click.option("--qemu", type=click.Choice(["host", "newer"]), default="host", show_default=True,
              help="The host's QEMU, or a newer one (Debian trixie-backports', in a private root under "
                   "~/.cache/hostrelay, provisioned on first use, ~1 min).")
@click.option("--served-iommu", is_flag=True,
              help="hostrelay itself is the guest's only IOMMU: 'hostrelay serve' beside the VM, its virtio-iommu "
                   "over vhost-user and --served-edu edu endpoints over vfio-user, a VIOT naming them. Implies "
                   "--qemu newer and the virtio flavour's kernel; no QEMU IOMMU and no QEMU edu.")
@click.option("--served-edu", type=click.IntRange(1, 8), default=1, show_default=True,
              help="With --served-iommu: edu endpoints served behind it (guest 00:15.0, 00:16.0, ...).")
@click.option("--served-record/--no-served-record", default=True, show_default=True,
              help="With --served-iommu: record every request and reply (returned with the run's files).")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def testbed_run(ctx: click.Context, iommu: str, edu: int, nvme: int, bridged_edu: int, hotplug_ports: int, kernel_args: tuple[str, ...], timeout: float, kernel: Path | None,
                modules: Path | None, memory_mb: int, iommufd: bool, icount: bool, qemu: str, served_iommu: bool,
                served_edu: int, served_record: bool, quiet: bool, cmd: tuple[str, ...]) -> None:  # fmt: skip
    """Boot the testbed, run CMD as root in it, power off; exit with CMD's status.

    The guest sees the host's root filesystem read-only with a writable
    overlay, so the host's Python and virtualenv run unchanged.  The
    testbed's options end at the first word that is not one of them, so
    CMD's own options go to CMD; put `--` before a CMD that starts with `-`.
    """
    from hostrelay.testbed import TestbedConfig, TestbedSetupError, run

    def out(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def log(text: str) -> None:
        if not quiet:
            click.echo(text, err=True)

    given = {name for name in ("iommu", "qemu", "edu", "bridged_edu", "served_edu")
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}  # fmt: skip
    if served_iommu:
        clash = [f"--{n.replace('_', '-')} {v}" for n, v, ok in (("iommu", iommu, "virtio"), ("qemu", qemu, "newer"))
                 if n in given and v != ok] + [f"--{n.replace('_', '-')} {v}" for n, v in (("edu", edu), ("bridged_edu", bridged_edu))
                                               if n in given and v]  # fmt: skip
        if clash:
            raise click.UsageError(f"--served-iommu is the guest's only IOMMU on the newer QEMU, without QEMU's own "
                                   f"edu: drop {', '.join(clash)}")  # fmt: skip
        iommu, qemu, edu = "virtio", "newer", 0
    elif "served_edu" in given:
        raise click.UsageError("--served-edu needs --served-iommu")
    config = TestbedConfig(iommu=iommu, edu=edu, nvme=nvme, bridged_edu=bridged_edu, hotplug_ports=hotplug_ports,
                           kernel_args=kernel_args, kernel=kernel,
                           modules=modules, memory_mb=memory_mb, icount=icount, iommufd=iommufd, qemu=qemu,
                           served_iommu=served_iommu, served_edu=served_edu, served_record=served_record,
                           shared_memory=served_iommu)  # fmt: skip
    try:
        result = run(cmd, config, timeout=timeout, on_output=out, log=log)
    except TestbedSetupError as exc:
        click.echo(f"hostrelay testbed: {exc}", err=True)
        sys.exit(1)
    if result.timed_out:
        log(f"testbed: timed out after {timeout:.0f} s")
    else:
        log(f"testbed: {shlex.join(cmd)} exited {result.returncode} (boot {result.boot_seconds or 0:.1f} s, "
            f"total {result.wall_seconds:.1f} s)")  # fmt: skip
    sys.exit(result.returncode)


# ------------------------------------------------------------- host tooling
# Front ends only: discovery in hostrelay.host.devices, binding in hostrelay.host.binding,
# readiness in hostrelay.host.check, events and rules in hostrelay.host.udev.
F = TypeVar("F", bound=Callable[..., Any])


def _host_options(func: F) -> F:
    """Injectable roots (hidden; for tests and chroots) and the state directory."""
    options = [
        click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), envvar="HOSTRELAY_STATE_DIR",
                     default=Path("/run/hostrelay"), show_default=True, help="Where bind saves original drivers."),
        click.option("--sysfs-root", type=click.Path(path_type=Path), envvar="HOSTRELAY_SYSFS_ROOT",
                     default=Path("/sys"), hidden=True),
        click.option("--dev-root", type=click.Path(path_type=Path), envvar="HOSTRELAY_DEV_ROOT",
                     default=Path("/dev"), hidden=True),
        click.option("--proc-root", type=click.Path(path_type=Path), envvar="HOSTRELAY_PROC_ROOT",
                     default=Path("/proc"), hidden=True),
        click.option("--boot-root", type=click.Path(path_type=Path), envvar="HOSTRELAY_BOOT_ROOT",
                     default=Path("/boot"), hidden=True),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


def _host(state_dir: Path, sysfs_root: Path, dev_root: Path, proc_root: Path, boot_root: Path) -> Any:
    from hostrelay.host.sysfs import Host

    return Host(sys=sysfs_root, dev=dev_root, proc=proc_root, boot=boot_root, state_dir=state_dir)


def _build_support() -> Any:
    """Does this build have iommufd? (Host tooling may not import the kernel seam; the front end asks.)"""
    from hostrelay.host.check import BuildSupport

    try:
        from hostrelay.kernel import iommufd
    except ImportError as exc:  # the extension is not built or does not load
        return BuildSupport(False, f"its extension does not load ({exc})")
    if iommufd.AVAILABLE:
        return BuildSupport(True)
    return BuildSupport(False, "its extension was built against kernel headers without <linux/iommufd.h>")


def _addresses(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    from hostrelay.host.devices import normalize_address

    try:
        return [normalize_address(v) for v in values]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=lambda o: o.__dict__))


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@main.command("devices")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--watch", is_flag=True, help="Report PCI add/remove events as they arrive (udev, else kernel events).")
@click.option("--count", type=click.IntRange(1), help="With --watch: stop after COUNT events (exit 1 if fewer by --timeout).")
@click.option("--timeout", type=click.FloatRange(0), default=60.0, show_default=True, help="With --watch: seconds to listen.")
@_host_options
def devices_cmd(as_json: bool, watch: bool, count: int | None, timeout: float, **roots: Path) -> None:
    """PCI functions: address, IDs, name, class, driver, IOMMU group, vfio-ready, in use."""
    from hostrelay.host.devices import describe, list_functions

    host = _host(**roots)
    if watch:
        from hostrelay.host.udev import PciWatcher

        seen = 0
        try:
            with PciWatcher(host) as watcher:
                click.echo(f"listening for PCI events ({watcher.source} events)", err=True)
                sys.stderr.flush()
                for ev in watcher.events(timeout=timeout):
                    record: dict[str, Any] = {"action": ev.action, "address": ev.address, "source": ev.source}
                    if ev.action == "add" and host.pci(ev.address).is_dir():
                        record["device"] = describe(host, ev.address).to_json()
                    if as_json:
                        click.echo(json.dumps(record))
                    else:
                        dev = record.get("device")
                        extra = f" {dev['vendor']}:{dev['device']} group {dev['iommu_group']}" if dev else ""
                        click.echo(f"{ev.action} {ev.address}{extra} ({ev.source})")
                    sys.stdout.flush()
                    seen += 1
                    if count is not None and seen >= count:
                        return
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from exc
        if count is not None:
            raise click.ClickException(f"saw {seen} of {count} events within {timeout:g} s")
        return
    funcs = list_functions(host)
    if as_json:
        _emit_json([f.to_json() for f in funcs])
        return
    rows = []
    for f in funcs:
        group = "-" if f.iommu_group is None else str(f.iommu_group)
        others = [m for m in f.group_members if m != f.address]
        rows.append([f.address, f"{f.vendor}:{f.device}", f.class_code, f.driver or "-",
                     group + (f" (+{len(others)})" if others else ""), "yes" if f.vfio_ready else "no",
                     Path(f.cdev).name if f.cdev else "-", "; ".join(f.in_use) or "-", f.name])  # fmt: skip
    _table(rows, ["ADDRESS", "ID", "CLASS", "DRIVER", "GROUP", "VFIO", "CDEV", "IN USE", "NAME"])


@main.command("groups")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@_host_options
def groups_cmd(as_json: bool, **roots: Path) -> None:
    """IOMMU groups: members, viability for VFIO, reserved regions, who holds them open."""
    from hostrelay.host.devices import list_groups

    groups = list_groups(_host(**roots))
    if as_json:
        _emit_json([g.to_json() for g in groups])
        return
    for g in groups:
        state = "viable" if g.viable else "not viable: " + ", ".join(g.blockers)
        click.echo(f"group {g.group} ({g.type or '?'}, {state})" + (f" {g.vfio_node}" if g.vfio_node else ""))
        for m in g.members:
            click.echo(f"  {m['address']}  {m['id']}  {m['driver'] or '-'}" + ("  [bridge]" if m["bridge"] else "")
                       + (f"  cdev {Path(m['cdev']).name}" if m["cdev"] else ""))  # fmt: skip
        for r in g.reserved_regions:
            click.echo(f"  reserved {r['start']}-{r['end']} {r['type']}")
        for o in g.open_by:
            click.echo(f"  open by pid {o.pid} ({o.command}): {o.path}")


def _report(result: Any, as_json: bool) -> None:
    from hostrelay.host.binding import result_text

    if as_json:
        _emit_json(result.to_json())
    else:
        for line in result_text(result):
            click.echo(line)


@main.command("bind")
@click.argument("addresses", nargs=-1, required=True, callback=_addresses, metavar="ADDR...")
@click.option("--group", "whole_group", is_flag=True, help="Also bind every other endpoint in the IOMMU groups.")
@click.option("--force", is_flag=True, help="Bind even if the host is using the device (mounted disk, interface up).")
@click.option("--dry-run", is_flag=True, help="Print the ordered sysfs writes; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--timeout", type=click.FloatRange(0), default=10.0, show_default=True,
              help="Seconds to wait for /dev/vfio/N and /dev/vfio/devices/vfioN.")  # fmt: skip
@_host_options
def bind_cmd(addresses: list[str], whole_group: bool, force: bool, dry_run: bool, as_json: bool, timeout: float,
             **roots: Path) -> None:  # fmt: skip
    """Hand PCI functions to vfio-pci; returns when /dev/vfio/N (and each device cdev, if any) is ready."""
    from hostrelay.host.binding import BindError, bind

    try:
        result = bind(addresses, _host(**roots), whole_group=whole_group, force=force, dry_run=dry_run, timeout=timeout)
    except BindError as exc:
        raise click.ClickException(str(exc)) from exc
    _report(result, as_json)


@main.command("unbind")
@click.argument("addresses", nargs=-1, required=True, callback=_addresses, metavar="ADDR...")
@click.option("--restore", is_flag=True, help="Give the device back to its saved driver (or the kernel's choice).")
@click.option("--dry-run", is_flag=True, help="Print the ordered sysfs writes; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@_host_options
def unbind_cmd(addresses: list[str], restore: bool, dry_run: bool, as_json: bool, **roots: Path) -> None:
    """Take PCI functions off vfio-pci (refused while their group is open)."""
    from hostrelay.host.binding import BindError, unbind

    try:
        result = unbind(addresses, _host(**roots), restore=restore, dry_run=dry_run)
    except BindError as exc:
        raise click.ClickException(str(exc)) from exc
    _report(result, as_json)


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from hostrelay.host.check import parse_size

    try:
        return None if value is None else parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@main.command("check")
@click.option("--guest-ram", callback=_size, metavar="SIZE", help="Guest RAM to check RLIMIT_MEMLOCK against (4G, 512M).")
@click.option("--containers", type=click.IntRange(1), help="VFIO containers the guest needs [default: bound groups, min 1].")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@_host_options
def check_cmd(guest_ram: int | None, containers: int | None, as_json: bool, **roots: Path) -> None:
    """Is this host ready for VFIO? Each finding with its remedy; exit 1 if not ready.

    The iommufd backend (/dev/iommu, device cdevs) is reported too; its
    absence is a warning, as the type1 checks alone decide the exit status.
    """
    from hostrelay.host.check import iommufd_ready, readiness, ready

    findings = readiness(_host(**roots), guest_ram=guest_ram, containers=containers, build=_build_support())
    ok = ready(findings)
    if as_json:
        summary = next(f for f in findings if f.check == "iommufd")
        _emit_json({"ready": ok, "iommufd": {"ready": iommufd_ready(findings), "detail": summary.detail},
                    "findings": [f.to_json() for f in findings]})  # fmt: skip
    else:
        for f in findings:
            click.echo(f"[{f.status.upper():4}] {f.check}: {f.detail}")
            if f.remedy and f.status != "ok":
                click.echo(f"       remedy: {f.remedy}")
        click.echo("ready" if ok else "NOT ready")
    sys.exit(0 if ok else 1)


@main.command("udev-rules")
@click.option("--group", "unix_group", metavar="GROUP",
              help="Unix group to give access to /dev/vfio/<N>, /dev/vfio/devices/vfioN and /dev/iommu.")
@click.option("--mode", default="0660", show_default=True, help="Mode for those nodes.")
@click.option("--bind", "selectors", multiple=True, metavar="ADDR|VVVV:DDDD",
              help="Bind this function (or every function with this ID) to vfio-pci at boot; repeatable.")
def udev_rules_cmd(unix_group: str | None, mode: str, selectors: tuple[str, ...]) -> None:
    """Print udev rules: group access to /dev/vfio/*, /dev/vfio/devices/* and /dev/iommu, and/or vfio-pci binding at boot."""
    from hostrelay.host.udev import rules_text

    if unix_group is None and not selectors:
        raise click.UsageError("give --group GROUP and/or --bind ADDR|VVVV:DDDD")
    try:
        click.echo(rules_text(unix_group, selectors, mode), nl=False)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


# ------------------------------------------------------------ firmware tables
# Front end only: building, parsing and checking live in hostrelay.firmware.viot.
def _viot_bdf(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    from hostrelay.firmware.viot import Bdf, ViotError

    try:
        return None if value is None else Bdf.parse(value)
    except ViotError as exc:
        raise click.BadParameter(str(exc)) from exc


def _viot_ranges(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[Any]:
    from hostrelay.firmware.viot import Bdf, PciRange, ViotError

    ranges = []
    for value in values:
        first, sep, last = value.partition("-")
        try:
            ranges.append(PciRange.between(Bdf.parse(first), Bdf.parse(last) if sep else Bdf.parse(first)))
        except ViotError as exc:
            raise click.BadParameter(f"{value}: {exc}") from exc
    return ranges


@main.command("viot")
@click.option("--iommu", callback=_viot_bdf, metavar="BDF", help="The virtio-iommu's PCI address as the guest sees it, [SSSS:]BB:DD.F.")
@click.option("--endpoints", "ranges", multiple=True, callback=_viot_ranges, metavar="BDF[-BDF]",
              help="PCI functions the virtio-iommu manages (inclusive range, one segment); repeatable. "
                   "Endpoint IDs are the functions' requester IDs (bus << 8 | devfn).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True, path_type=Path), help="Write the table here.")
@click.option("--check", "check_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Instead: validate this VIOT file (layout, lengths, checksum) and print what it describes.")
def viot_cmd(iommu: Any, ranges: list[Any], output: Path | None, check_file: Path | None) -> None:
    """Write an ACPI VIOT naming a virtio-iommu and the endpoints it manages, for QEMU's -acpitable file=.

    QEMU generates its own VIOT only for its built-in virtio-iommu-pci; a
    virtio-iommu served over vhost-user needs this table, or the guest's
    driver binds but manages no endpoint.
    """
    from hostrelay.firmware.viot import ViotError, ViotTable, VirtioPciIommu, build, parse, summary

    if check_file is not None:
        if iommu is not None or ranges or output is not None:
            raise click.UsageError("--check FILE takes no other option")
        data = check_file.read_bytes()
        try:
            table = parse(data)
        except ViotError as exc:
            raise click.ClickException(f"{check_file}: not a valid VIOT: {exc}") from exc
        click.echo(f"{check_file}: valid")
        for line in summary(table):
            click.echo(line)
        if build(table, allow_iommu_in_range=True)[36:] != data[36:]:
            click.echo("  (node offsets above are hostrelay's layout, IOMMU nodes first; the file orders its nodes otherwise)")
        return
    missing = [name for name, v in (("--iommu", iommu), ("--endpoints", ranges), ("-o", output)) if not v]
    if missing:
        raise click.UsageError(f"give {', '.join(missing)} (or --check FILE)")
    assert output is not None
    try:
        table = ViotTable((VirtioPciIommu(iommu),), tuple(ranges))
        data = build(table)
    except ViotError as exc:  # every refusal left is about the ranges: overlap, or covering the IOMMU
        raise click.BadParameter(str(exc), param_hint="'--endpoints'") from exc
    output.write_bytes(data)
    click.echo(f"wrote {output} ({len(data)} bytes)")
    for line in summary(table):
        click.echo(line)


@main.group("state")
def state_group() -> None:
    """Saved virtio-iommu device states (``Relay.save_state``)."""


@state_group.command("show")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the state's JSON header instead of a summary.")
def state_show_cmd(path: Path, as_json: bool) -> None:
    """Check a saved state (format, version, checksum, consistency) and say what it holds."""
    from hostrelay.model.state import StateError, decode, header_of, summary

    data = path.read_bytes()
    try:
        state = decode(data)
    except StateError as exc:
        raise click.ClickException(f"{path}: not a valid state: {exc}") from exc
    if as_json:
        _emit_json(header_of(data)[0])
        return
    click.echo(f"{path}: valid, {len(data)} bytes, {state.mapping_count()} mappings")
    for line in summary(state):
        click.echo(f"  {line}")


if __name__ == "__main__":
    main()
