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
        with pytest.raises(ValueError, match="PCI address|out of range"):
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
                             "--edu", f"{edu}@{BDF}", "--record", str(tmp_path / "rec.jsonl"), "-v"],
                            env=env, stderr=subprocess.PIPE)  # fmt: skip
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
    # The recording: its header names the edu's endpoint, and SIGTERM wrote the final table.
    from hostrelay.frontends.record import read_records

    objs = list(read_records((tmp_path / "rec.jsonl").read_text().splitlines()))
    assert [o["kind"] for o in objs] == ["header", "table"] and objs[0]["endpoints"] == [EP]
    assert b"recorded 0 requests" in err


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


# --- serve --record, and its replay ----------------------------------------------------------


def _recorded_session(tmp_path: Path) -> Path:
    """A guest's session through the fake vhost-user front end, recorded: the file's path."""
    from hostrelay.frontends.record import RecordingLoop, RecordingRelay, open_record
    from hostrelay.frontends.vhost_user_wire import Request
    from hostrelay.frontends import vhost_user_wire as vw
    from hostrelay.model.wire import DetachRequest, UnmapRequest

    path = tmp_path / "rec.jsonl"
    relay = RecordingRelay(GuestMemory(), record=open_record(path))
    loop = RecordingLoop(relay)
    device = VhostUserDevice(relay, loop)
    server = edu_frontend(tmp_path / "edu.sock", BDF)(loop, device)
    relay.begin()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = VhostUserConnection(b, device, loop)
    fe = FrontEnd(a, loop)
    try:
        features = fe.connect_sequence()
        fe.driver_ok_sequence(features)
        # The C walker serves MAP/UNMAP, Python ATTACH/DETACH/PROBE; refusals are recorded too.
        ok = requests(fe, [ProbeRequest(EP).pack(), AttachRequest(1, EP).pack(),
                           *(MapRequest(1, 0x100000 + i * 0x1000, 0x100FFF + i * 0x1000, 0x600000 + i * 0x1000, 3).pack()
                             for i in range(8)),
                           UnmapRequest(1, 0x102000, 0x103FFF).pack(),
                           MapRequest(1, 0x100000, 0x100FFF, 0x600000, 3).pack(),  # overlaps: INVAL
                           AttachRequest(1, 0x999).pack()])  # no such endpoint: NOENT  # fmt: skip
        assert ok[:11] == [Status.OK] * 11 and ok[11:] == [Status.INVAL, Status.NOENT]
        loop.run_once(0)
        # Poweroff: the rings stop, which resets the device (every domain goes).
        for i in range(2):
            fe.ack(Request.SET_VRING_ENABLE, vw.vring_state(i, 0))
        base = [vw.unpack_vring_state(fe.send(Request.GET_VRING_BASE, vw.vring_state(i, 0), need_reply=False) or b"").num
                for i in range(2)]  # fmt: skip
        assert relay.domain_ids() == []
        # After the reset the guest's driver starts again (where the rings stopped) and leaves a domain behind.
        fe.driver_ok_sequence(features, base=base)
        assert requests(fe, [AttachRequest(2, EP).pack(), MapRequest(2, 0x0, 0xFFF, 0x1000, 1).pack(),
                             DetachRequest(2, EP).pack(), AttachRequest(3, EP).pack(),
                             MapRequest(3, 0x2000, 0x2FFF, 0x3000, 2).pack()]) == [Status.OK] * 5  # fmt: skip
    finally:
        # In hostrelay serve's order: the front ends end (a disconnect resets
        # the device and drops guest RAM), then the recording is finished.
        server.close()
        conn.close()
        relay.finish()
        relay.record.close()
        fe.close()
        relay.close()
        relay.memory.close()
        loop.close()
    return path


def test_a_recorded_session_replays_to_the_same_replies_and_tables(tmp_path: Path) -> None:
    import json

    from hostrelay.frontends.record import read_records, replay

    path = _recorded_session(tmp_path)
    objs = list(read_records(path.read_text().splitlines()))
    kinds = [o["kind"] for o in objs]
    assert kinds[0] == "header" and kinds[-1] == "table" and objs[0]["endpoints"] == [EP]
    assert kinds.count("request") == 18
    assert [o["regions"] for o in objs if o["kind"] == "memory"] == [[[0, 1 << 20], [1 << 20, RAM - (1 << 20)]], []]
    first, last = (o["table"]["domains"] for o in objs if o["kind"] == "reset")  # as each reset found it
    (dom,) = first
    assert dom["id"] == 1 and dom["endpoints"] == [EP]
    assert [m[0] for m in dom["mappings"]] == [0x100000 + i * 0x1000 for i in (0, 1, 4, 5, 6, 7)]
    assert [(d["id"], d["mappings"]) for d in last] == [(3, [[0x2000, 0x2FFF, 0x3000, 2]])]  # the disconnect's
    assert objs[-1]["table"] == {"domains": []}  # the final table: after the disconnect's reset
    result = replay(path.read_text().splitlines())
    assert result.ok, (result.mismatches, result.table_mismatches)
    assert result.requests == 18 and result.resets == 2 and result.statuses == {0: 16, 4: 1, 6: 1}
    # The comparison can fail: a reply changed in the file, or a table, is reported.
    lines = path.read_text().splitlines()
    i = next(n for n, ln in enumerate(lines) if '"kind":"request"' in ln and '"reply":"00000000"' in ln)
    tampered = json.loads(lines[i])
    tampered["reply"] = "04000000"
    bad = [*lines[:i], json.dumps(tampered), *lines[i + 1:]]
    assert [m[0] for m in replay(bad).mismatches] == [i + 1]
    j = max(n for n, ln in enumerate(lines) if '"kind":"reset"' in ln)
    bad_table = [*lines[:j], lines[j].replace("12288", "16384"), *lines[j + 1:]]
    assert not replay(bad_table).ok and replay(bad_table).table_mismatches


def test_replay_refuses_what_is_not_a_recording(tmp_path: Path) -> None:
    from hostrelay.frontends.record import replay

    with pytest.raises(ValueError, match="line 1"):
        replay(['{"kind":"request"}'])
    with pytest.raises(ValueError, match="line 1: not JSON"):
        replay(["{"])
    with pytest.raises(ValueError, match="is not the recorded"):  # another device's config
        replay(['{"kind":"header","format":"hostrelay-record","version":1,"bypass":true,"config":"00","endpoints":[]}'])
    with pytest.raises(ValueError, match="version 2"):
        replay(['{"kind":"header","format":"hostrelay-record","version":2}'])
