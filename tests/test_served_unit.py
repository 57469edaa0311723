"""``hostrelay serve --edu``: the edu endpoint beside the vhost-user device, on one loop and relay.

Both fake clients are the stateful ones of the front ends' own unit tiers:
the vhost-user front end of tests/test_vhost_user.py (guest RAM in a memfd,
driver-side queues laid in it) and the vfio-user client of
tests/test_vfio_user.py (QEMU's DMA_MAP of that same memfd at IOVA = GPA).
What is shown: :func:`edu_frontend` declares the endpoint in the device's
relay, the guest's MAP through the request queue is what the edu's DMA is
translated by, and a translation fault reaches the guest's event queue (and
its interrupt) with nobody but the front end calling for it.  The same
against the real QEMU and a real guest is tests/test_served_iommu.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_vfio_user import Client, VfioDevice
from test_vhost_user import RAM, FrontEnd, fired, requests

from hostrelay.backends.memory import GuestMemory
from hostrelay.drivers.edu import Edu
from hostrelay.frontends.loop import Loop
from hostrelay.frontends.vfio_user import EduServer, edu_frontend, endpoint_id_of
from hostrelay.frontends.vhost_user import VhostUserConnection, VhostUserDevice
from hostrelay.model.wire import AttachRequest, Fault, FaultFlag, FaultReason, MapRequest, ProbeRequest, Status
from hostrelay.relay import Relay

BDF = "00:04.0"
EP = endpoint_id_of(BDF)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Relay, Loop, FrontEnd, VhostUserConnection, EduServer, Client]]:
    relay = Relay(GuestMemory(), bypass=False)
    loop = Loop()
    device = VhostUserDevice(relay, loop)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = VhostUserConnection(b, device, loop)
    fe = FrontEnd(a, loop)
    server = edu_frontend(tmp_path / "edu.sock", BDF)(loop, device)
    assert isinstance(server, EduServer)
    vsock = socket.socket(socket.AF_UNIX)
    vsock.connect(str(tmp_path / "edu.sock"))
    client = Client(vsock, loop)
    try:
        yield relay, loop, fe, conn, server, client
    finally:
        vsock.close()
        server.close()
        conn.close()
        fe.close()
        relay.close()
        relay.memory.close()
        loop.close()


def test_bad_bdf_is_refused_before_anything_listens(tmp_path: Path) -> None:
    for bad in ("00:20.0", "4.0", "zz:00.0"):
        with pytest.raises(ValueError, match="PCI address|above 31"):
            edu_frontend(tmp_path / "x.sock", bad)
    assert list(tmp_path.iterdir()) == []


def test_a_second_edu_at_the_same_bdf_is_refused(tmp_path: Path) -> None:
    relay = Relay(GuestMemory())
    loop = Loop()
    device = VhostUserDevice(relay, loop)
    first = edu_frontend(tmp_path / "a.sock", BDF)(loop, device)
    try:
        with pytest.raises(ValueError, match="already exists"):
            edu_frontend(tmp_path / "b.sock", "0000:" + BDF)(loop, device)
        assert not (tmp_path / "b.sock").exists()
    finally:
        first.close()
        relay.close()
        relay.memory.close()
        loop.close()


def test_guest_map_translates_the_edus_dma_and_a_fault_reaches_the_eventq(
    world: tuple[Relay, Loop, FrontEnd, VhostUserConnection, EduServer, Client],
) -> None:
    relay, loop, fe, conn, server, client = world
    # The factory declared the endpoint: PROBE answers for it (MSI window and all).
    assert relay.endpoint_domain(EP) is None and relay.reserved_regions(EP)
    features = fe.connect_sequence()
    fe.driver_ok_sequence(features)
    client.version()
    # QEMU's vfio-user-pci maps guest RAM at IOVA = GPA with the memfd (hw/vfio-user/container.c).
    client.dma_map(0, RAM, os.dup(fe.memfd))
    assert requests(fe, [ProbeRequest(EP).pack(), AttachRequest(1, EP).pack(),
                         MapRequest(1, 0x100000, 0x100FFF, 0x600000, 3).pack()]) == [Status.OK] * 3  # fmt: skip
    pattern = os.urandom(2048)
    fe.mem.write(0x600000, pattern)
    edu = Edu(VfioDevice(client))  # type: ignore[arg-type]  # the Device surface Edu uses
    edu.to_device(0x100000, 2048)
    edu.from_device(0x100800, 2048)
    assert fe.mem.read(0x600800, 2048) == pattern  # RAM -> device -> RAM at the GPA the guest's MAP named
    assert server.dma.faults == 0

    # The guest gives the device an event buffer; the edu then writes to an IOVA with no mapping.
    buf = fe.eq.add([], [24])[1][0]
    fe.notify(1)
    assert not fe.eq.used() and not fired(fe.call[1])
    fe.mem.write(0x900000, b"\x5a" * 64)
    edu.from_device(0x900000, 64)
    assert fe.mem.read(0x900000, 64) == b"\x5a" * 64  # nothing landed (IOVA 0x900000 is GPA 0x900000 only in bypass)
    assert server.dma.faults == 1
    (used,) = fe.eq.used()
    assert used.len == 24 and fired(fe.call[1]), "the fault reached the eventq and interrupted, unasked"
    fault = Fault.unpack(fe.mem.read(buf, 24))
    assert fault == Fault(FaultReason.MAPPING, FaultFlag.WRITE | FaultFlag.ADDRESS, EP, 0x900000)
    assert relay.pop_events() == []  # delivered, not left waiting
    assert not conn.closed and server.connected


def test_a_fault_before_the_eventq_is_set_up_waits_in_the_relay(
    world: tuple[Relay, Loop, FrontEnd, VhostUserConnection, EduServer, Client],
) -> None:
    relay, loop, fe, conn, server, client = world
    features = fe.connect_sequence()
    fe.driver_ok_sequence(features)
    client.version()
    client.dma_map(0, RAM, os.dup(fe.memfd))
    assert requests(fe, [AttachRequest(1, EP).pack()]) == [Status.OK]
    # No event buffer yet: deliver_events has nowhere to put the record, so it stays queued.
    edu = Edu(VfioDevice(client))  # type: ignore[arg-type]  # the Device surface Edu uses
    edu.from_device(0x100000, 64)
    assert server.dma.faults == 1 and not fe.eq.used()
    (record,) = relay.pop_events()
    assert Fault.unpack(record).address == 0x100000


def _wait_for(paths: list[Path], proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not all(p.is_socket() for p in paths):
        assert proc.poll() is None, f"hostrelay serve exited {proc.returncode} before listening"
        assert time.monotonic() < deadline, f"hostrelay serve did not listen on {paths} in {timeout} s"
        time.sleep(0.05)


def test_the_cli_serves_both_sockets_and_ends_cleanly_on_sigterm(tmp_path: Path) -> None:
    import signal
    import sys

    from hostrelay.frontends import vfio_user_wire as w

    vu, edu = tmp_path / "vu.sock", tmp_path / "edu.sock"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "hostrelay.cli", "serve", "--vhost-user", str(vu),
                             "--edu", f"{edu}@{BDF}", "-v"], env=env, stderr=subprocess.PIPE)  # fmt: skip
    try:
        _wait_for([vu, edu], proc)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(edu))
        s.sendall(w.pack_message(1, w.Command.VERSION, w.Version(0, 0, {}).pack(), reply=False))
        s.settimeout(10)
        reply = w.Header.unpack(s.recv(w.HEADER_SIZE, socket.MSG_WAITALL), 1 << 20)
        assert reply.is_reply and reply.command == w.Command.VERSION and not reply.flags & w.HeaderFlag.ERROR
        s.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert f"edu endpoint {EP:#x} ({BDF})".encode() in err
    assert not vu.exists() and not edu.exists()  # both front ends removed their sockets


# --- the testbed's served-IOMMU boot, as far as it goes without booting ---------------------


def test_served_config_needs_the_newer_qemu_and_no_iommu_or_edu_of_qemus() -> None:
    from hostrelay.testbed import TestbedConfig

    cfg = TestbedConfig.served(3)
    assert (cfg.qemu, cfg.iommu, cfg.shared_memory, cfg.edu, cfg.served_edu) == ("newer", "virtio", True, 0, 3)
    with pytest.raises(ValueError, match='qemu="newer"') as exc:
        TestbedConfig(served_iommu=True)
    assert "edu=0" in str(exc.value) and "shared_memory" in str(exc.value)
    with pytest.raises(ValueError, match="served_edu in 1..8"):
        TestbedConfig.served(9)


def test_served_qemu_args_name_no_qemu_iommu_and_the_viot_covers_exactly_the_edus(tmp_path: Path) -> None:
    import json

    from hostrelay.firmware.viot import Bdf, build, parse
    from hostrelay.testbed import TestbedConfig
    from hostrelay.testbed.served import IOMMU_BDF, edu_bdfs, qemu_args, viot_table
    from hostrelay.testbed.vm import _qemu_args

    bdfs = edu_bdfs(2)
    assert bdfs == ["00:15.0", "00:16.0"]
    table = parse(build(viot_table(bdfs)))
    assert [str(i.address) for i in table.iommus] == ["0000:" + IOMMU_BDF]
    assert [(r.bdf_start, r.bdf_end, r.endpoint_start) for r in table.ranges] == [
        (Bdf.parse(b).bdf, Bdf.parse(b).bdf, endpoint_id_of(b)) for b in bdfs]  # fmt: skip
    assert table.endpoint_id(Bdf.parse("00:15.1")) is None  # nothing between or beside them
    served = qemu_args(tmp_path / "v.sock", [(tmp_path / "e0.sock", bdfs[0])], tmp_path / "viot.bin")
    args = _qemu_args(TestbedConfig.served(1), tmp_path / "vmlinuz", tmp_path / "initrd", tmp_path, served)
    joined = " ".join(args)
    assert "virtio-iommu-pci" not in joined and "intel-iommu" not in joined and "-device edu" not in joined
    assert f"vhost-user-test-device-pci,chardev=hrviommu,virtio-id=23,num_vqs=2,config_size=40,addr=0x14.0" in args
    edu = json.loads(args[args.index("-acpitable") - 1])
    assert edu == {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(tmp_path / "e0.sock")}, "addr": "0x15.0"}
    assert "memory-backend-memfd,id=mem,size=2048M,share=on" in args
    assert "vfio_iommu_type1.allow_unsafe_interrupts=1" in args[-1]


def test_testbed_run_served_options_imply_and_refuse(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from hostrelay.cli import main

    runner = CliRunner()
    for argv, why in ((["--served-iommu", "--iommu", "intel"], "--iommu intel"),
                      (["--served-iommu", "--qemu", "host"], "--qemu host"),
                      (["--served-iommu", "--edu", "2"], "--edu 2"),
                      (["--served-edu", "2"], "needs --served-iommu")):  # fmt: skip
        result = runner.invoke(main, ["testbed", "run", *argv, "--", "true"])
        assert result.exit_code == 2 and why in result.output, result.output
