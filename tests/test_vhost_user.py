# mypy: disable-error-code="func-returns-value"
# (the BAD table chains a front end's steps in tuples: each is called for its effect)
"""The vhost-user back end against a front end in Python (QEMU 11.1's message sequence).

The fake front end is stateful, not a mock: it owns a memfd as guest RAM,
lays the project's own driver-side queues (``DriverQueue``) in it, and
speaks the wire format over a real Unix socket with SCM_RIGHTS, eventfds
for kicks and calls.  The real QEMU is in tests/test_vhost_user_qemu.py.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from hostrelay.backends.memory import GuestMemory
from hostrelay.relay import QueuePosition, Relay
from hostrelay.drivers.virtqueue import DriverQueue
from hostrelay.frontends import vhost_user as vu
from hostrelay.frontends import vhost_user_wire as w
from hostrelay.frontends.loop import Loop
from hostrelay.frontends.vhost_user import VhostUserConnection, VhostUserDevice, VhostUserServer
from hostrelay.frontends.vhost_user_wire import MemRegion, Request, VhostUserError
from hostrelay.model.wire import AttachRequest, MapRequest, ProbeRequest, Status, UnmapRequest

RAM = 16 << 20
# Two regions of one memfd, at user addresses with a gap, as QEMU's are.
REGIONS = (
    MemRegion(guest_addr=0, size=1 << 20, user_addr=0x7F00_0000_0000, mmap_offset=0),
    MemRegion(guest_addr=1 << 20, size=RAM - (1 << 20), user_addr=0x7F10_0000_0000, mmap_offset=1 << 20),
)
REQ_RING, EV_RING = 0x200000, 0x400000
ENDPOINT = 8


def uva(gpa: int) -> int:
    for r in REGIONS:
        if r.guest_addr <= gpa < r.guest_addr + r.size:
            return r.user_addr + gpa - r.guest_addr
    raise AssertionError(gpa)


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def fired(fd: int) -> bool:
    try:
        return os.read(fd, 8) != bytes(8)
    except BlockingIOError:
        return False


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class FrontEnd:
    """A vhost-user front end: QEMU's side of the socket, with guest RAM and driver queues."""

    def __init__(self, sock: socket.socket, loop: Loop) -> None:
        self.sock = sock
        self.loop = loop
        sock.settimeout(2.0)
        self.memfd = os.memfd_create("fake-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, RAM)
        self.mem = GuestMemory()
        self.mem.add_region(0, RAM, fd=self.memfd)
        self.kick = [eventfd(), eventfd()]
        self.call = [eventfd(), eventfd()]
        self.err = [eventfd(), eventfd()]
        self.rq = DriverQueue(self.mem, REQ_RING, 64, data_size=1 << 16)
        self.eq = DriverQueue(self.mem, EV_RING, 8, data_size=4096)

    def close(self) -> None:
        self.sock.close()
        for fd in (*self.kick, *self.call, *self.err):
            os.close(fd)
        self.mem.close()
        os.close(self.memfd)

    # -- wire -------------------------------------------------------------------------
    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)
        self.loop.run_once(1.0)  # the back end serves it

    def send(self, req: Request, payload: bytes = b"", fds: Sequence[int] = (), *, need_reply: bool = True) -> bytes | None:
        """Send and, when one is due, return the reply's payload."""
        self.send_raw(w.encode(req, payload, need_reply=need_reply), fds)
        due = req in (Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM,
                      Request.GET_CONFIG, Request.GET_VRING_BASE) or need_reply  # fmt: skip
        return self.reply(req) if due else None

    def reply(self, req: Request) -> bytes:
        hdr = self._recv(w.HEADER.size)
        request, flags, size = w.HEADER.unpack(hdr)
        assert request == req and flags == w.VERSION | w.FLAG_REPLY
        return self._recv(size)

    def ack(self, req: Request, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        got = self.send(req, payload, fds, need_reply=True)
        assert got is not None and w.unpack_u64(got) == 0, f"{req.name} not acknowledged"

    def _recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            more = self.sock.recv(n - len(out))
            assert more, "the back end closed the connection"
            out += more
        return out

    def eof(self) -> bool:
        """The back end closed its end."""
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False

    # -- QEMU 11.1's sequence --------------------------------------------------------------
    def connect_sequence(self) -> int:
        features = w.unpack_u64(self.send(Request.GET_FEATURES, need_reply=False) or b"")
        proto = w.unpack_u64(self.send(Request.GET_PROTOCOL_FEATURES, need_reply=False) or b"")
        self.send(Request.SET_PROTOCOL_FEATURES, w.u64(proto & 0xFFFF), need_reply=False)
        assert w.unpack_u64(self.send(Request.GET_QUEUE_NUM, need_reply=False) or b"") == 2
        self.ack(Request.SET_OWNER)
        for i in range(2):
            self.ack(Request.SET_VRING_CALL, w.u64(i), [self.call[i]])
            self.ack(Request.SET_VRING_ERR, w.u64(i), [self.err[i]])
        return features

    def driver_ok_sequence(self, features: int, *, base: Sequence[int] = (0, 0)) -> None:
        for _ in range(3):
            cfg = w.unpack_config(self.send(Request.GET_CONFIG, w.config_msg(0, bytes(40)), need_reply=False) or b"")
            assert cfg.size == 40
        self.ack(Request.SET_FEATURES, w.u64(features))
        self.ack(Request.SET_MEM_TABLE, w.mem_table(REGIONS), [self.memfd, self.memfd])
        for i, q in enumerate((self.rq, self.eq)):
            self.ack(Request.SET_VRING_NUM, w.vring_state(i, q.size))
            self.ack(Request.SET_VRING_BASE, w.vring_state(i, base[i]))
            self.ack(Request.SET_VRING_ADDR, w.vring_addr(i, uva(q.desc), uva(q.used_ring), uva(q.avail)))
            self.ack(Request.SET_VRING_KICK, w.u64(i), [self.kick[i]])
            self.ack(Request.SET_VRING_CALL, w.u64(i), [self.call[i]])
        for i in range(2):
            self.ack(Request.SET_VRING_ENABLE, w.vring_state(i, 1))

    def notify(self, index: int) -> None:
        """Kick ring ``index`` and let the back end serve it.

        The request queue may be served from the back end's C thread
        (VhostUserDevice.kick_thread) with no loop callback at all: wait
        until every buffer made available is used (or a second passed: a
        stopped queue), running the loop for the thread's hand-overs.
        """
        os.write(self.kick[index], (1).to_bytes(8, "little"))
        if index != 0:
            self.loop.run_once(1.0)
            return
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            self.loop.run_once(0.002)
            if struct.unpack("<H", self.mem.read(self.rq.used_ring + 2, 2))[0] == self.rq.avail_idx & 0xFFFF:
                break
        self.loop.run_once(0)  # a hand-over the thread asked for after its last completion


@pytest.fixture
def relay() -> Iterator[Relay]:
    r = Relay(GuestMemory())
    r.add_endpoint(ENDPOINT)
    yield r
    r.close()
    r.memory.close()


@pytest.fixture
def pair(relay: Relay, loop: Loop) -> Iterator[tuple[FrontEnd, VhostUserConnection]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    device = VhostUserDevice(relay, loop)
    conn = VhostUserConnection(b, device, loop)
    fe = FrontEnd(a, loop)
    yield fe, conn
    conn.close()
    fe.close()


def requests(fe: FrontEnd, raws: Sequence[bytes]) -> list[Status]:
    outs = []
    for raw in raws:
        wlen = 4 + 512 if raw[0] == 5 else 4
        _, (o,) = fe.rq.add([raw], [wlen], publish=True)
        outs.append((o, wlen))
    fe.notify(0)
    used = fe.rq.used()
    assert [u.len for u in used] == [wl for _, wl in outs]
    return [Status(fe.mem.read(o + wl - 4, 1)[0]) for o, wl in outs]


# --- the whole sequence, then a guest's requests -----------------------------------------------


def test_qemu_sequence_then_attach_map_probe_unmap(pair: tuple[FrontEnd, VhostUserConnection], relay: Relay) -> None:
    fe, conn = pair
    features = fe.connect_sequence()
    assert features & (1 << 32), "VIRTIO_F_VERSION_1"
    assert features & vu.PROTOCOL_FEATURES_BIT
    assert not features & (1 << 29), "no VIRTIO_RING_F_EVENT_IDX: every completion interrupts"
    assert features & ~vu.PROTOCOL_FEATURES_BIT == relay.device_features
    cfg = fe.send(Request.GET_CONFIG, w.config_msg(0, bytes(40)), need_reply=False)
    assert cfg is not None and w.unpack_config(cfg).data == relay.config_bytes()
    fe.driver_ok_sequence(features)
    assert relay.memory.contains(0, RAM)

    statuses = requests(fe, [AttachRequest(1, ENDPOINT).pack(), MapRequest(1, 0x10000, 0x10FFF, 0x800000, 3).pack(),
                             ProbeRequest(ENDPOINT).pack()])  # fmt: skip
    assert statuses == [Status.OK] * 3
    assert fired(fe.call[0]), "used buffers interrupt through the call eventfd"
    assert not fired(fe.call[1])
    assert relay.translate(ENDPOINT, 0x10010, 4, write=True) == 0x800010
    assert requests(fe, [UnmapRequest(1, 0x10000, 0x10FFF).pack()]) == [Status.OK]
    assert fired(fe.call[0])
    assert relay.mapping_count(1) == 0

    # A fault recorded by translate (another front end's DMA) reaches the eventq.
    buf = fe.eq.add([], [24])[1][0]
    fe.notify(1)  # the driver gave the device an event buffer: nothing to report yet
    assert not fe.eq.used() and not fired(fe.call[1])
    with pytest.raises(Exception):
        relay.translate(ENDPOINT, 0x10000, 4, write=True)
    assert conn.device.deliver_events() == 1
    assert fired(fe.call[1])
    (u,) = fe.eq.used()
    assert u.len == 24
    record = fe.mem.read(buf, 24)
    assert int.from_bytes(record[8:12], "little") == ENDPOINT
    assert int.from_bytes(record[16:24], "little") == 0x10000

    # Poweroff: SET_VRING_ENABLE 0, GET_VRING_BASE -> the positions, and a device reset.
    for i in range(2):
        fe.ack(Request.SET_VRING_ENABLE, w.vring_state(i, 0))
    got = [w.unpack_vring_state(fe.send(Request.GET_VRING_BASE, w.vring_state(i, 0), need_reply=False) or b"")
           for i in range(2)]  # fmt: skip
    assert got == [w.VringState(0, 4), w.VringState(1, 1)]
    assert relay.endpoint_domain(ENDPOINT) is None and relay.domain_ids() == []
    with pytest.raises(ValueError):
        relay.queue_position(0)
    assert not conn.closed


def test_vring_base_resumes_where_the_front_end_says(pair: tuple[FrontEnd, VhostUserConnection], relay: Relay) -> None:
    fe, _ = pair
    features = fe.connect_sequence()
    # A ring that had served 65533 buffers before (a resumed VM): the
    # driver's indexes and the base agree, and they wrap at 2^16.
    start = 0xFFFD
    for q in (fe.rq,):
        q.avail_idx = q.last_used = start
        fe.mem.write(q.avail + 2, struct.pack("<H", start))
        fe.mem.write(q.used_ring + 2, struct.pack("<H", start))
    fe.driver_ok_sequence(features, base=(start, 0))
    assert relay.queue_position(0).next_avail == start
    raws = [AttachRequest(1, ENDPOINT).pack()] + [MapRequest(1, i << 12, (i << 12) + 0xFFF, 0, 1).pack() for i in range(4)]
    assert requests(fe, raws) == [Status.OK] * 5
    pos = relay.queue_position(0)
    assert pos.next_avail == pos.used == (start + 5) & 0xFFFF == 2
    got = w.unpack_vring_state(fe.send(Request.GET_VRING_BASE, w.vring_state(0, 0), need_reply=False) or b"")
    assert got.num == 2


def test_bypass_byte_through_set_config(pair: tuple[FrontEnd, VhostUserConnection], relay: Relay) -> None:
    fe, _ = pair
    features = fe.connect_sequence()
    fe.ack(Request.SET_FEATURES, w.u64(features))
    assert relay.bypass
    # QEMU's vhost-user-base sends the whole 40 bytes with the guest's byte changed.
    cfg = bytearray(relay.config_bytes())
    cfg[36] = 0
    cfg[0] ^= 0xFF  # a read-only byte the guest scribbled on: ignored (D-05)
    fe.ack(Request.SET_CONFIG, w.config_msg(0, bytes(cfg)))
    assert not relay.bypass
    assert relay.config_bytes()[0] != cfg[0]
    got = w.unpack_config(fe.send(Request.GET_CONFIG, w.config_msg(36, bytes(1)), need_reply=False) or b"")
    assert got.offset == 36 and got.data == b"\x00"
    # Past the 40 bytes: an empty reply (the protocol's error), the connection stays.
    assert fe.send(Request.GET_CONFIG, w.config_msg(32, bytes(16)), need_reply=False) == b""
    assert w.unpack_u64(fe.send(Request.SET_CONFIG, w.config_msg(40, b"\x01")) or b"") != 0
    assert fe.send(Request.GET_QUEUE_NUM, need_reply=False) == w.u64(2)


def test_no_interrupt_flag_suppresses_the_call(pair: tuple[FrontEnd, VhostUserConnection], relay: Relay) -> None:
    fe, conn = pair
    conn.device.busy_poll = 0
    fe.driver_ok_sequence(fe.connect_sequence())
    # Linux 6.12's virtio-iommu: the requestq has no callback, so the driver
    # sets VRING_AVAIL_F_NO_INTERRUPT (virtio 1.2 §2.7.7) and spins instead.
    fe.mem.write(fe.rq.avail, struct.pack("<H", 1))
    assert requests(fe, [AttachRequest(1, ENDPOINT).pack()]) == [Status.OK]
    assert not fired(fe.call[0]), "interrupted a driver that asked for none"
    fe.mem.write(fe.rq.avail, struct.pack("<H", 0))  # interrupts wanted again: the next completion calls
    assert requests(fe, [MapRequest(1, 0x10000, 0x10FFF, 0x800000, 3).pack()]) == [Status.OK]
    assert fired(fe.call[0])


def test_busy_poll_serves_the_next_request_without_a_kick(pair: tuple[FrontEnd, VhostUserConnection],
                                                          relay: Relay) -> None:  # fmt: skip
    fe, conn = pair
    conn.device.busy_poll = 5.0  # long enough for the driver thread below, on any machine
    fe.driver_ok_sequence(fe.connect_sequence())
    seen: dict[str, object] = {}

    def driver() -> None:
        # While the device polls: it has told the driver not to kick...
        deadline = time.monotonic() + 5
        while fe.rq.consume() == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        seen["no_notify"] = struct.unpack("<H", fe.mem.read(fe.rq.used_ring, 2))[0] & 1
        # ...so this request gets no kick, and is served all the same.
        _, (out,) = fe.rq.add([MapRequest(1, 0x10000, 0x10FFF, 0x800000, 3).pack()], [4], publish=True)
        while fe.rq.consume() == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        seen["status"] = fe.mem.read(out, 1)[0]

    fe.rq.add([AttachRequest(1, ENDPOINT).pack()], [4], publish=True)
    thread = threading.Thread(target=driver)
    thread.start()
    fe.notify(0)  # the kick, then the poll (it ends BUSY_POLL_MAX after the last request it served)
    thread.join(10)
    assert seen == {"no_notify": 1, "status": Status.OK}, seen
    assert relay.translate(ENDPOINT, 0x10010, 4, write=True) == 0x800010
    assert struct.unpack("<H", fe.mem.read(fe.rq.used_ring, 2))[0] & 1 == 0, "NO_NOTIFY left set after the poll"
    assert not kicked(fe.kick[0]), "a kick was consumed that the driver never sent"


def kicked(fd: int) -> bool:
    try:
        os.read(fd, 8)
        return True
    except BlockingIOError:
        return False


def test_broken_ring_signals_the_error_eventfd(pair: tuple[FrontEnd, VhostUserConnection], relay: Relay) -> None:
    fe, conn = pair
    fe.driver_ok_sequence(fe.connect_sequence())
    fe.rq.publish(1000)  # an avail entry naming no descriptor: the relay stops the queue
    fe.notify(0)
    assert relay.needs_reset
    assert fired(fe.err[0]) and fired(fe.err[1])
    assert not conn.closed
    fe.ack(Request.RESET_DEVICE)
    assert not relay.needs_reset


def test_a_changed_memory_table_under_mappings_is_refused(pair: tuple[FrontEnd, VhostUserConnection], relay: Relay) -> None:
    fe, conn = pair
    fe.driver_ok_sequence(fe.connect_sequence())
    assert requests(fe, [AttachRequest(1, ENDPOINT).pack(), MapRequest(1, 0, 0xFFF, 0x800000, 3).pack()]) == [Status.OK] * 2
    # The same table again is fine (QEMU re-sends it) and keeps the mapping.
    fe.ack(Request.SET_MEM_TABLE, w.mem_table(REGIONS), [fe.memfd, fe.memfd])
    assert relay.translate(ENDPOINT, 0, 4, write=False) == 0x800000
    other = (MemRegion(0, RAM, 0x7E00_0000_0000, 0),)
    fe.send_raw(w.encode(Request.SET_MEM_TABLE, w.mem_table(other), need_reply=True), [fe.memfd])
    assert conn.closed and isinstance(conn.error, VhostUserError)
    assert "memory layout" in str(conn.error)
    # The disconnect reset the device and dropped the front end's memory.
    assert relay.domain_ids() == [] and relay.memory.regions == ()



def test_a_guest_driver_rebind_resets_the_device_and_sets_it_up_again_on_one_connection(
    pair: tuple[FrontEnd, VhostUserConnection], relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """Linux's unbind + bind of virtio_iommu, as QEMU 11.1 passes it on (tests/test_served_rebind.py: the guest's).

    The unbind's virtio reset reaches the back end as SET_VRING_ENABLE 0 and
    GET_VRING_BASE per ring (vhost_dev_stop); the bind's DRIVER_OK as the
    whole start again: SET_FEATURES, the same SET_MEM_TABLE, new rings at
    new addresses from index 0.  The connection stays, nothing of the old
    driver's state survives, and the new driver is served, event queue too.
    """
    caplog.set_level("INFO", logger=vu.__name__)
    fe, conn = pair
    features = fe.connect_sequence()
    fe.driver_ok_sequence(features)
    assert requests(fe, [AttachRequest(1, ENDPOINT).pack(), MapRequest(1, 0x10000, 0x10FFF, 0x800000, 3).pack()]) == [Status.OK] * 2
    with pytest.raises(Exception):
        relay.translate(ENDPOINT, 0x40000, 4, write=True)  # a fault record, waiting for an event buffer
    # Unbind: viommu_remove's virtio_reset_device.
    for i in range(2):
        fe.ack(Request.SET_VRING_ENABLE, w.vring_state(i, 0))
    got = [w.unpack_vring_state(fe.send(Request.GET_VRING_BASE, w.vring_state(i, 0), need_reply=False) or b"")
           for i in range(2)]  # fmt: skip
    assert got == [w.VringState(0, 2), w.VringState(1, 0)]
    assert relay.domain_ids() == [] and relay.endpoint_domain(ENDPOINT) is None
    assert caplog.text.count("rings stopped, device reset") == 1
    assert relay.memory.contains(0, RAM), "guest RAM stays mapped across a device reset"
    # Bind: a new driver instance, new rings elsewhere in guest RAM.
    fe.rq = DriverQueue(fe.mem, 0xA00000, 64, data_size=1 << 16)
    fe.eq = DriverQueue(fe.mem, 0xC00000, 8, data_size=4096)
    fe.driver_ok_sequence(features)
    assert not conn.closed
    assert relay.queue_position(0).next_avail == 0 and relay.queue_position(1).next_avail == 0
    assert caplog.text.count("ring 0 started") == 2 and caplog.text.count("ring 1 started") == 2
    assert "SET_MEM_TABLE: the same 2 regions, mapping kept" in caplog.text
    # The old driver's mapping is gone: unattached, the endpoint is in bypass (config bypass=1 kept, D-04).
    assert relay.translate(ENDPOINT, 0x10000, 4, write=True) == 0x10000
    statuses = requests(fe, [AttachRequest(1, ENDPOINT).pack(), MapRequest(1, 0x20000, 0x20FFF, 0x900000, 3).pack()])
    assert statuses == [Status.OK] * 2
    assert relay.translate(ENDPOINT, 0x20010, 4, write=True) == 0x900010
    # The fault of before the reset was dropped with it; a new one reaches the new event queue.
    buf = fe.eq.add([], [24])[1][0]
    fe.notify(1)
    assert not fe.eq.used()
    with pytest.raises(Exception):
        relay.translate(ENDPOINT, 0x30000, 4, write=False)
    assert conn.device.deliver_events() == 1
    (u,) = fe.eq.used()
    assert u.len == 24 and int.from_bytes(fe.mem.read(buf + 16, 8), "little") == 0x30000


# --- malformed and out-of-order messages: error, disconnect, the next front end is served ------------


def _hdr(req: int, flags: int, size: int) -> bytes:
    return w.HEADER.pack(req, flags, size)


def _owned(fe: FrontEnd) -> None:
    fe.send(Request.SET_PROTOCOL_FEATURES, w.u64(int(vu.OFFERED_PROTOCOL_FEATURES)), need_reply=False)
    fe.ack(Request.SET_OWNER)


def _ready_rings(fe: FrontEnd) -> None:
    fe.driver_ok_sequence(fe.connect_sequence())


BAD: list[tuple[str, object, str]] = [
    ("bad version", lambda fe: fe.send_raw(_hdr(1, 2, 0)), "protocol version 2"),
    ("unknown flags", lambda fe: fe.send_raw(_hdr(1, 1 | 0x10, 0)), "unknown flag bits"),
    ("a reply sent to the back end", lambda fe: fe.send_raw(_hdr(1, 1 | 4, 0)), "a reply where a request"),
    ("unknown request", lambda fe: fe.send_raw(_hdr(99, 1, 0)), "vhost-user request 99: unknown request"),
    ("payload over the largest", lambda fe: fe.send_raw(_hdr(24, 1, 4096)), "more than any message has"),
    ("GET_FEATURES with a payload", lambda fe: fe.send_raw(w.encode(Request.GET_FEATURES, w.u64(0))),
     "VHOST_USER_GET_FEATURES: payload of 8 bytes, its layout has 0"),
    ("short u64", lambda fe: fe.send_raw(w.encode(Request.SET_FEATURES, b"\0" * 4)), "its layout has 8"),
    ("9 regions", lambda fe: fe.send_raw(w.encode(Request.SET_MEM_TABLE, struct.pack("=II", 9, 0) + bytes(8 * 32))),
     "9 regions, at most 8"),
    ("regions without their fds", lambda fe: (_owned(fe), fe.send_raw(w.encode(Request.SET_MEM_TABLE, w.mem_table(REGIONS)))),
     "0 file descriptors came, it carries 2"),
    ("an fd where none belongs", lambda fe: fe.send_raw(w.encode(Request.GET_FEATURES), [fe.kick[0]]),
     "1 file descriptors came, it carries 0"),
    ("kick without an fd", lambda fe: (_owned(fe), fe.send_raw(w.encode(Request.SET_VRING_KICK, w.u64(0)))),
     "0 file descriptors came"),
    ("kick polling", lambda fe: (_owned(fe), fe.send_raw(w.encode(Request.SET_VRING_KICK, w.u64(w.VRING_NOFD)))),
     "polling) is not supported"),
    ("config over 256 bytes", lambda fe: fe.send_raw(w.encode(Request.GET_CONFIG, struct.pack("=III", 0, 300, 0))),
     "config size 300"),
    ("config size mismatch", lambda fe: fe.send_raw(w.encode(Request.GET_CONFIG, struct.pack("=III", 0, 40, 0) + bytes(8))),
     "its layout has 52"),
    ("mem table before SET_OWNER", lambda fe: fe.send_raw(w.encode(Request.SET_MEM_TABLE, w.mem_table(REGIONS)), [fe.memfd] * 2),
     "VHOST_USER_SET_MEM_TABLE: before SET_OWNER"),
    ("SET_OWNER twice", lambda fe: (_owned(fe), fe.send_raw(w.encode(Request.SET_OWNER))), "already has an owner"),
    ("unoffered features", lambda fe: (_owned(fe), fe.send_raw(w.encode(Request.SET_FEATURES, w.u64(1 << 29)))),
     "features 0x20000000 were not offered"),
    ("unoffered protocol features", lambda fe: fe.send_raw(w.encode(Request.SET_PROTOCOL_FEATURES, w.u64(1 << 1))),
     "were not offered"),
    ("GET_QUEUE_NUM without MQ", lambda fe: fe.send_raw(w.encode(Request.GET_QUEUE_NUM)), "MQ was not negotiated"),
    ("ring 2", lambda fe: (_owned(fe), fe.send_raw(w.encode(Request.SET_VRING_NUM, w.vring_state(2, 64)))),
     "ring 2: virtio-iommu has 2"),
    ("ring size 3", lambda fe: (_owned(fe), fe.send_raw(w.encode(Request.SET_VRING_NUM, w.vring_state(0, 3)))),
     "not a power of two"),
    ("ring addr before the mem table", lambda fe: (_owned(fe), fe.ack(Request.SET_VRING_NUM, w.vring_state(0, 64)),
     fe.send_raw(w.encode(Request.SET_VRING_ADDR, w.vring_addr(0, 0, 0, 0)))), "before SET_MEM_TABLE"),
    ("kick before the ring addr", lambda fe: (_owned(fe), fe.send_raw(w.encode(Request.SET_VRING_KICK, w.u64(0)), [fe.kick[0]])),
     "before SET_VRING_NUM and SET_VRING_ADDR"),
    ("ring outside the table", lambda fe: (_owned(fe), fe.ack(Request.SET_MEM_TABLE, w.mem_table(REGIONS), [fe.memfd] * 2),
     fe.ack(Request.SET_VRING_NUM, w.vring_state(0, 64)),
     fe.send_raw(w.encode(Request.SET_VRING_ADDR, w.vring_addr(0, 0x1000, 0x2000, 0x3000)))), "outside the memory table"),
    ("base on a started ring", lambda fe: (_ready_rings(fe), fe.send_raw(w.encode(Request.SET_VRING_BASE, w.vring_state(0, 0)))),
     "ring 0 is started"),
    ("dirty logging", lambda fe: fe.send_raw(w.encode(Request.SET_LOG_BASE, bytes(16)), [fe.memfd]), "not supported: dirty logging"),
    ("enable 2", lambda fe: (fe.connect_sequence(), fe.send_raw(w.encode(Request.SET_VRING_ENABLE, w.vring_state(0, 2)))),
     "enable 2, not 0 or 1"),
    ("truncated payload", lambda fe: (fe.sock.sendall(_hdr(2, 1, 8) + b"\0"), fe.sock.shutdown(socket.SHUT_WR), fe.loop.run_once(1.0)),
     "connection closed inside the payload"),
]


@pytest.fixture
def server(relay: Relay, loop: Loop, tmp_path: Path) -> Iterator[VhostUserServer]:
    srv = VhostUserServer(tmp_path / "vu.sock", VhostUserDevice(relay, loop), loop)
    yield srv
    srv.close()


def connect(server: VhostUserServer) -> FrontEnd:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(server.path))
    server.loop.run_once(1.0)  # accept
    return FrontEnd(s, server.loop)


@pytest.mark.parametrize("name,act,why", BAD, ids=[b[0] for b in BAD])
def test_bad_message_disconnects_and_the_next_front_end_is_served(
    server: VhostUserServer, relay: Relay, name: str, act: object, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    before = open_fds()
    fe = connect(server)
    conn = server.connection
    assert conn is not None
    act(fe)  # type: ignore[operator]
    assert conn.closed, f"{name}: the connection stays"
    assert isinstance(conn.error, VhostUserError), conn.error
    assert why in str(conn.error)
    assert why in caplog.text, "the error is logged"
    assert fe.eof()
    assert relay.domain_ids() == [] and relay.memory.regions == ()
    fe.close()
    assert open_fds() == before, "every fd that came with the bad session is closed"
    # The next front end gets a fresh device.
    nxt = connect(server)
    assert server.connection is not None and server.connection is not conn
    features = nxt.connect_sequence()
    nxt.driver_ok_sequence(features)
    assert requests(nxt, [AttachRequest(1, ENDPOINT).pack()]) == [Status.OK]
    nxt.close()
    server.loop.run_once(1.0)
    assert server.connection is None


def test_a_stalled_message_times_out(server: VhostUserServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vu, "MESSAGE_TIMEOUT", 0.2)
    fe = connect(server)
    conn = server.connection
    assert conn is not None
    conn.sock.settimeout(0.2)
    fe.send_raw(_hdr(2, 1, 8) + b"\0\0")  # half a SET_FEATURES, then nothing
    assert conn.closed and "stopped arriving" in str(conn.error)
    fe.close()


def test_one_front_end_at_a_time(server: VhostUserServer) -> None:
    first = connect(server)
    second = connect(server)
    assert second.eof(), "the second front end is turned away"
    assert w.unpack_u64(first.send(Request.GET_FEATURES, need_reply=False) or b"") & vu.PROTOCOL_FEATURES_BIT
    first.close()
    second.close()


def test_disconnect_resets_the_device(server: VhostUserServer, relay: Relay) -> None:
    fe = connect(server)
    fe.driver_ok_sequence(fe.connect_sequence())
    assert requests(fe, [AttachRequest(1, ENDPOINT).pack(), MapRequest(1, 0, 0xFFF, 0, 3).pack()]) == [Status.OK] * 2
    fe.sock.close()
    server.loop.run_once(1.0)
    assert server.connection is None
    assert relay.domain_ids() == [] and relay.memory.regions == ()
    fe.sock = socket.socket()  # closed above; close() below closes this one
    fe.close()


def test_codec_round_trip() -> None:
    hdr = w.parse_header(w.encode(Request.SET_VRING_ADDR, w.vring_addr(1, 0x10, 0x20, 0x30), need_reply=True)[:12])
    assert hdr == w.Header(Request.SET_VRING_ADDR, w.VERSION | w.FLAG_NEED_REPLY, 40)
    msg = w.decode(hdr, w.vring_addr(1, 0x10, 0x20, 0x30), [])
    assert msg.payload == w.VringAddr(1, 0, 0x10, 0x20, 0x30, 0) and msg.need_reply
    table = w.decode(w.Header(Request.SET_MEM_TABLE, 1, 8 + 64), w.mem_table(REGIONS), [100, 101])
    assert table.payload == w.MemTable(REGIONS) and table.fds == [100, 101]
    with pytest.raises(VhostUserError, match="payload of 4 bytes, the header said 8"):
        w.decode(w.Header(Request.SET_FEATURES, 1, 8), bytes(4), [])


def test_set_queue_avail_index_and_position() -> None:
    with GuestMemory() as m:
        m.add_region(0, 1 << 20)
        r = Relay(m)
        q = DriverQueue(m, 0x1000, 16, data_size=4096)
        r.set_queue(0, size=16, desc=q.desc, avail=q.avail, used=q.used_ring, avail_index=7)
        assert r.queue_position(0) == QueuePosition(next_avail=7, used=0, broken=False)
        with pytest.raises(ValueError, match="not a u16"):
            r.set_queue(0, size=16, desc=q.desc, avail=q.avail, used=q.used_ring, avail_index=1 << 16)
        # Memory may be replaced only while nothing uses it.
        with pytest.raises(RuntimeError, match="queues are set up"):
            r.replace_memory(())
        r.reset()
        r.replace_memory(())
        assert m.regions == ()
