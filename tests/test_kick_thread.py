"""The request queue served from a C thread (cext/hr_kick.c) behind the vhost-user back end.

With the fake front end of tests/test_vhost_user.py (a memfd as guest RAM,
the project's driver-side queues, real eventfds over a real socket).  What
these show: plain MAP/UNMAP kicks are completed with no Python callback at
all; anything else (ATTACH, PROBE, a kernel failure to report, a stopped
queue) is served by Python in ring order, the thread having stopped at it
without taking it; the thread is stopped and joined on every path that ends
or replaces the ring, leaking no fd and no thread; recording still sees
every request.  The thread runs against the real QEMU in
tests/test_served_iommu.py (``hostrelay serve`` has it on by default).
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from hostrelay._native import ffi, lib
from hostrelay.backends.memory import GuestMemory
from hostrelay.drivers.virtqueue import DriverQueue
from hostrelay.frontends.loop import Loop
from hostrelay.frontends.vhost_user import VhostUserConnection, VhostUserDevice
from hostrelay.frontends.vhost_user_wire import Request
from hostrelay.frontends import vhost_user_wire as w
from hostrelay.model.wire import AttachRequest, MapRequest, ProbeRequest, Status, UnmapRequest
from hostrelay.relay import Relay
from test_vhost_user import ENDPOINT, FrontEnd, fired, open_fds

PAGE = 0x1000


class CountingLoop(Loop):
    """The serve loop, counting the callbacks it runs (each is Python serving something)."""

    def __init__(self) -> None:
        super().__init__()
        self.callbacks = 0

    def run_once(self, timeout: float | None = None) -> int:
        ran = super().run_once(timeout)
        self.callbacks += ran
        return ran


def tasks() -> int:
    """Threads of this process, C ones included."""
    return len(os.listdir("/proc/self/task"))


def used_idx(fe: FrontEnd) -> int:
    return int(struct.unpack("<H", fe.mem.read(fe.rq.used_ring + 2, 2))[0])


def wait_used(fe: FrontEnd, n: int, timeout: float = 2.0) -> bool:
    """Wait, without running the loop, until the used index is n."""
    deadline = time.monotonic() + timeout
    while used_idx(fe) != n & 0xFFFF:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True


def publish(fe: FrontEnd, raws: list[bytes]) -> list[tuple[int, int, int]]:
    """Make requests available (no kick); (head, reply offset, writable length) each."""
    out = []
    for raw in raws:
        wlen = 4 + 512 if raw[0] == 5 else 4
        head, (o,) = fe.rq.add([raw], [wlen], publish=True)
        out.append((head, o, wlen))
    return out


def kick(fe: FrontEnd) -> None:
    os.write(fe.kick[0], (1).to_bytes(8, "little"))


def status(fe: FrontEnd, o: int, wlen: int) -> Status:
    return Status(fe.mem.read(o + wlen - 4, 1)[0])


def maps(n: int, domain: int = 1) -> list[bytes]:
    out = []
    for i in range(n):
        iova = 0x100000 + i * PAGE
        out += [MapRequest(domain, iova, iova + PAGE - 1, 0x800000 + i * PAGE, 3).pack(),
                UnmapRequest(domain, iova, iova + PAGE - 1).pack()]  # fmt: skip
    return out


@pytest.fixture
def relay() -> Iterator[Relay]:
    r = Relay(GuestMemory())
    r.add_endpoint(ENDPOINT)
    r.add_endpoint(ENDPOINT + 1)
    yield r
    r.close()
    r.memory.close()


@pytest.fixture
def loop() -> Iterator[CountingLoop]:
    lp = CountingLoop()
    yield lp
    lp.close()


def connect(relay: Relay, loop: Loop, *, kick_thread: bool = True,
            kick_spin: float = 0.0) -> tuple[FrontEnd, VhostUserConnection]:  # fmt: skip
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = VhostUserConnection(b, VhostUserDevice(relay, loop, kick_thread=kick_thread, kick_spin=kick_spin), loop)
    fe = FrontEnd(a, loop)
    fe.features = fe.connect_sequence()  # type: ignore[attr-defined]
    fe.driver_ok_sequence(fe.features)  # type: ignore[attr-defined]
    return fe, conn


@pytest.fixture
def pair(relay: Relay, loop: CountingLoop) -> Iterator[tuple[FrontEnd, VhostUserConnection]]:
    fe, conn = connect(relay, loop)
    yield fe, conn
    conn.close()
    fe.close()


def attach(fe: FrontEnd, loop: CountingLoop, domain: int = 1, endpoint: int = ENDPOINT) -> None:
    ((_, o, wl),) = publish(fe, [AttachRequest(domain, endpoint).pack()])
    fe.notify(0)
    assert status(fe, o, wl) == Status.OK


# --- MAP/UNMAP: no Python -------------------------------------------------------------------


def test_map_unmap_kicks_run_no_python(pair: tuple[FrontEnd, VhostUserConnection], relay: Relay,
                                       loop: CountingLoop) -> None:  # fmt: skip
    fe, conn = pair
    ring = conn.device.rings[0]
    assert ring.need is not None, "the request queue is served from its thread"
    assert ring.kick is not None and not loop.watching(ring.kick), "the loop leaves the kick eventfd to the thread"
    attach(fe, loop)
    before, stats0 = loop.callbacks, relay.queue_thread_stats()
    assert stats0 is not None
    # One request per kick, as Linux 6.12's viommu_sync_req sends them; the
    # loop is not run at all meanwhile.
    start = used_idx(fe)
    raws = maps(50)
    for i, raw in enumerate(raws):
        ((_, o, wl),) = publish(fe, [raw])
        kick(fe)
        assert wait_used(fe, start + i + 1), f"request {i} was not served without the loop"
        assert status(fe, o, wl) == Status.OK
    assert fe.rq.consume() >= len(raws)
    assert loop.run_once(0) == 0, "nothing was left for Python"
    assert loop.callbacks == before
    stats = relay.queue_thread_stats()
    assert stats is not None
    assert stats["served"] - stats0["served"] == len(raws)
    assert stats["handovers"] == stats0["handovers"]
    assert relay.mapping_count(1) == 0
    assert fired(fe.call[0]), "the thread interrupts a driver that wants interrupts"


def test_no_interrupt_flag_is_respected_by_the_thread(pair: tuple[FrontEnd, VhostUserConnection],
                                                      loop: CountingLoop) -> None:  # fmt: skip
    fe, _ = pair
    attach(fe, loop)
    fired(fe.call[0])
    fe.mem.write(fe.rq.avail, struct.pack("<H", 1))  # VRING_AVAIL_F_NO_INTERRUPT (Linux 6.12's requestq)
    start = used_idx(fe)
    publish(fe, maps(1))
    kick(fe)
    assert wait_used(fe, start + 2)
    assert not fired(fe.call[0]), "interrupted a driver that asked for none"
    fe.mem.write(fe.rq.avail, struct.pack("<H", 0))
    publish(fe, maps(1))
    kick(fe)
    assert wait_used(fe, start + 4)
    deadline = time.monotonic() + 1
    while not fired(fe.call[0]):
        assert time.monotonic() < deadline, "no interrupt once the driver wants them again"
        time.sleep(0.001)


# --- what needs Python: served by Python, in ring order -------------------------------------


def test_attach_and_probe_in_the_middle_are_served_in_order(pair: tuple[FrontEnd, VhostUserConnection],
                                                           relay: Relay, loop: CountingLoop) -> None:  # fmt: skip
    fe, _ = pair
    attach(fe, loop)
    start = used_idx(fe)
    raws = [*maps(2), AttachRequest(2, ENDPOINT + 1).pack(), MapRequest(2, 0x5000, 0x5FFF, 0x900000, 3).pack(),
            ProbeRequest(ENDPOINT).pack(), *maps(1)]  # fmt: skip
    placed = publish(fe, raws)
    kick(fe)
    # The thread serves the four MAP/UNMAP and stops at the ATTACH: the
    # MAP after it is C's too, but it is not taken before the ATTACH is done.
    assert wait_used(fe, start + 4)
    time.sleep(0.05)
    assert used_idx(fe) == (start + 4) & 0xFFFF
    assert relay.endpoint_domain(ENDPOINT + 1) is None and 2 not in relay.domain_ids()
    callbacks = loop.callbacks
    assert loop.run_once(1.0) == 1  # the hand-over: Python serves the rest, in order
    assert loop.callbacks == callbacks + 1
    assert wait_used(fe, start + len(raws), timeout=1.0)
    used = fe.rq.used()
    assert [u.id for u in used[-len(raws):]] == [h for h, _, _ in placed], "completed in ring order"
    assert [status(fe, o, wl) for _, o, wl in placed] == [Status.OK] * len(raws)
    assert relay.endpoint_domain(ENDPOINT + 1) == 2
    assert relay.translate(ENDPOINT + 1, 0x5010, 4, write=True) == 0x900010
    # ...and the thread serves the next MAP/UNMAP kicks again.
    stats = relay.queue_thread_stats()
    assert stats is not None and stats["handovers"] >= 2  # the first ATTACH, this one
    publish(fe, maps(1))
    callbacks = loop.callbacks
    kick(fe)
    assert wait_used(fe, start + len(raws) + 2)
    assert loop.run_once(0) == 0 and loop.callbacks == callbacks


def test_a_kernel_failure_is_handed_to_python_to_report(pair: tuple[FrontEnd, VhostUserConnection], relay: Relay,
                                                        loop: CountingLoop, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    fe, _ = pair
    attach(fe, loop, domain=3)
    # A container whose fd is /dev/null: the MAP ioctl the thread issues
    # fails (ENOTTY -> DEVERR, a kernel failure the C walk cannot report).
    devnull = os.open("/dev/null", os.O_RDWR)
    cont = ffi.new("struct hr_container *", {"fd": devnull, "avail": 1000})
    conts = ffi.new("struct hr_container *[]", [cont])
    with relay._dp.lock:
        assert lib.hr_relay_domain_set_containers(relay._dp.c, 3, conts, 1) == 0
    try:
        start = used_idx(fe)
        ((_, o, wl),) = publish(fe, [MapRequest(3, 0x1000, 0x1FFF, 0x800000, 3).pack()])
        caplog.set_level(logging.WARNING, logger="hostrelay.relay")
        kick(fe)
        assert wait_used(fe, start + 1)
        assert status(fe, o, wl) == Status.DEVERR
        assert "failed" not in caplog.text, "reported before Python had its turn"
        assert loop.run_once(1.0) == 1  # the hand-over
        assert "MAP at 0x1000 failed" in caplog.text
        assert relay.mapping_count(3) == 0 and cont.entries == 0
        stats = relay.queue_thread_stats()
        assert stats is not None and stats["handovers"] >= 2
    finally:
        with relay._dp.lock:
            lib.hr_relay_domain_set_containers(relay._dp.c, 3, conts, 0)
        os.close(devnull)


def test_a_broken_queue_is_handed_over_and_signals_the_error_eventfd(pair: tuple[FrontEnd, VhostUserConnection],
                                                                    relay: Relay, loop: CountingLoop) -> None:  # fmt: skip
    fe, conn = pair
    fe.rq.publish(1000)  # an avail entry naming no descriptor
    kick(fe)
    assert loop.run_once(1.0) == 1
    assert relay.needs_reset
    assert fired(fe.err[0])
    assert not conn.closed
    fe.ack(Request.RESET_DEVICE)
    assert not relay.needs_reset and relay.queue_thread_stats() is None


# --- stopping: reset, disconnect, GET_VRING_BASE, a disabled ring -----------------------------


def test_get_vring_base_during_a_hand_over_gives_the_chain_back(pair: tuple[FrontEnd, VhostUserConnection],
                                                               relay: Relay, loop: CountingLoop) -> None:  # fmt: skip
    fe, _ = pair
    attach(fe, loop)
    start = relay.queue_position(0).next_avail
    publish(fe, [*maps(1), ProbeRequest(ENDPOINT).pack()])
    kick(fe)
    assert wait_used(fe, start + 2)
    time.sleep(0.02)  # the thread has stopped at the PROBE and waits for Python (the loop is not run)
    # The PROBE was not taken: the device's position is just before it.
    pos = relay.queue_position(0)
    assert pos.next_avail == pos.used == (start + 2) & 0xFFFF
    threads = tasks()
    got = w.unpack_vring_state(fe.send(Request.GET_VRING_BASE, w.vring_state(0, 0), need_reply=False) or b"")
    # The loop that served GET_VRING_BASE may have run the hand-over first
    # (both fds were ready): either way the base is the used index, every
    # chain taken was completed, and a resumed device serves the rest.
    assert got.num == used_idx(fe) and got.num in ((start + 2) & 0xFFFF, (start + 3) & 0xFFFF)
    assert tasks() == threads - 1, "the thread was joined"
    assert relay.queue_thread_stats() is None


def test_reset_and_disconnect_join_the_thread_and_leak_nothing(relay: Relay, loop: CountingLoop) -> None:
    fds, threads = open_fds(), tasks()
    for _ in range(3):
        fe, conn = connect(relay, loop)
        assert tasks() == threads + 1
        attach(fe, loop)
        publish(fe, maps(2))
        kick(fe)
        assert wait_used(fe, 5)
        fe.ack(Request.RESET_DEVICE)
        assert tasks() == threads and relay.queue_thread_stats() is None
        # The driver sets the device up again (its queue resumes where it is).
        fe.driver_ok_sequence(fe.features, base=(used_idx(fe), 0))  # type: ignore[attr-defined]
        assert tasks() == threads + 1
        conn.close()
        assert tasks() == threads
        fe.close()
    assert open_fds() == fds


def test_a_disabled_ring_gives_its_kicks_back_to_the_loop(pair: tuple[FrontEnd, VhostUserConnection],
                                                         relay: Relay, loop: CountingLoop) -> None:  # fmt: skip
    fe, conn = pair
    attach(fe, loop)
    fe.ack(Request.SET_VRING_ENABLE, w.vring_state(0, 0))
    assert relay.queue_thread_stats() is None and conn.device.rings[0].need is None
    start = used_idx(fe)
    publish(fe, maps(1))
    kick(fe)
    assert loop.run_once(1.0) == 1 and used_idx(fe) == start, "a disabled ring is not served"
    fe.ack(Request.SET_VRING_ENABLE, w.vring_state(0, 1))  # what was made available meanwhile is served
    assert used_idx(fe) == (start + 2) & 0xFFFF
    assert relay.queue_thread_stats() is not None


def test_a_new_call_fd_restarts_the_thread_with_it(pair: tuple[FrontEnd, VhostUserConnection],
                                                  loop: CountingLoop) -> None:  # fmt: skip
    fe, _ = pair
    attach(fe, loop)
    new = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    fe.ack(Request.SET_VRING_CALL, w.u64(0), [new])  # the back end now owns its copy
    os.close(new)  # ours; the back end's copy is what the thread writes
    start = used_idx(fe)
    publish(fe, maps(1))
    kick(fe)
    assert wait_used(fe, start + 2)


def test_the_option_turns_the_thread_off(relay: Relay, loop: CountingLoop) -> None:
    fe, conn = connect(relay, loop, kick_thread=False)
    try:
        assert conn.device.rings[0].need is None and relay.queue_thread_stats() is None
        attach(fe, loop)
        callbacks = loop.callbacks
        publish(fe, maps(1))
        fe.notify(0)
        assert loop.callbacks == callbacks + 1, "the loop served the kick"
    finally:
        conn.close()
        fe.close()


# --- recording --------------------------------------------------------------------------------


def test_recording_sees_every_request_the_thread_serves(pair: tuple[FrontEnd, VhostUserConnection], relay: Relay,
                                                        loop: CountingLoop) -> None:  # fmt: skip
    fe, _ = pair
    relay.start_recording()
    try:
        raws = [AttachRequest(1, ENDPOINT).pack(), *maps(200), ProbeRequest(ENDPOINT).pack(), *maps(3)]
        start = used_idx(fe)
        for raw in raws:  # one a kick, the loop run only for hand-overs
            publish(fe, [raw])
            kick(fe)
            deadline = time.monotonic() + 2
            while used_idx(fe) != (start + 1) & 0xFFFF:
                loop.run_once(0.001)
                assert time.monotonic() < deadline
            start += 1
        stats = relay.queue_thread_stats()
        assert stats is not None and stats["served"] >= 400, "the thread served while recording"
        got = relay.take_recording()
        assert [r.request for r in got] == raws, "every request, in completion order"
        assert all(r.reply[-4:] == bytes(4) for r in got)
    finally:
        relay.stop_recording()


# --- spinning ---------------------------------------------------------------------------------


def test_the_spin_serves_the_next_request_without_a_kick(relay: Relay, loop: CountingLoop) -> None:
    fe, conn = connect(relay, loop, kick_spin=2.0)
    try:
        attach(fe, loop)
        seen: dict[str, object] = {}

        def driver() -> None:
            time.sleep(0.01)
            seen["no_notify"] = struct.unpack("<H", fe.mem.read(fe.rq.used_ring, 2))[0] & 1
            start = used_idx(fe)
            ((_, o, wl),) = publish(fe, [MapRequest(1, 0x10000, 0x10FFF, 0x800000, 3).pack()])  # no kick
            seen["served"] = wait_used(fe, start + 1)
            seen["status"] = status(fe, o, wl)

        publish(fe, [UnmapRequest(1, 0, 0xFFF).pack()])
        kick(fe)  # served, then the spin sees the driver's next request
        t = threading.Thread(target=driver)
        t.start()
        t.join(5)
        assert seen == {"no_notify": 1, "served": True, "status": Status.OK}, seen
        stats = relay.queue_thread_stats()
        assert stats is not None and stats["spin_hits"] >= 1
        assert relay.translate(ENDPOINT, 0x10010, 4, write=True) == 0x800010
        conn.close()  # stops the thread in its spin
        assert struct.unpack("<H", fe.mem.read(fe.rq.used_ring, 2))[0] & 1 == 0, "NO_NOTIFY left set"
    finally:
        conn.close()
        fe.close()


# --- the Relay API on its own (no vhost-user) -------------------------------------------------


def _direct() -> tuple[Relay, GuestMemory, DriverQueue, list[int]]:
    mem = GuestMemory()
    mem.add_region(0, 4 << 20)
    relay = Relay(mem)
    relay.add_endpoint(ENDPOINT)
    rq = DriverQueue(mem, 0x100000, 64, data_size=1 << 16)
    relay.set_queue(0, size=64, desc=rq.desc, avail=rq.avail, used=rq.used_ring)
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)]  # kick, call, need
    return relay, mem, rq, fds


def _serve(rq: DriverQueue, kick_fd: int, raw: bytes) -> int:
    _, (o,) = rq.add([raw], [4], publish=True)
    os.write(kick_fd, (1).to_bytes(8, "little"))
    deadline = time.monotonic() + 2
    while rq.consume() == 0:
        assert time.monotonic() < deadline, "not served"
        time.sleep(0.0005)
    return o


def _wait_fired(fd: int) -> None:
    deadline = time.monotonic() + 2
    while not fired(fd):
        assert time.monotonic() < deadline, "the thread did not ask for Python"
        time.sleep(0.0005)


def test_relay_api_handover_resume_and_a_new_ring_stops_the_thread() -> None:
    relay, mem, rq, (kick_fd, call_fd, need_fd) = _direct()
    threads = tasks()
    try:
        assert relay.serve_queue_in_thread(0, kick_fd, call_fd, need_fd)
        with pytest.raises(RuntimeError):
            relay.serve_queue_in_thread(0, kick_fd, call_fd, need_fd)
        assert tasks() == threads + 1
        rq.add([AttachRequest(1, ENDPOINT).pack()], [4], publish=True)
        os.write(kick_fd, (1).to_bytes(8, "little"))
        _wait_fired(need_fd)
        # Left in the ring, not served: Python's turn.
        assert rq.consume() == 0 and relay.endpoint_domain(ENDPOINT) is None
        assert relay.queue_position(0).next_avail == 0
        assert relay.queue_thread_handover(0) == 1
        assert relay.endpoint_domain(ENDPOINT) == 1 and rq.consume() == 1
        assert relay.resume_queue_thread(0)
        o = _serve(rq, kick_fd, MapRequest(1, 0x1000, 0x1FFF, 0x200000, 3).pack())
        assert Status(mem.read(o, 1)[0]) == Status.OK and relay.mapping_count(1) == 1
        assert not fired(need_fd) and fired(call_fd)
        # A new ring 0: the thread serving the old one is stopped first.
        relay.set_queue(0, size=64, desc=rq.desc, avail=rq.avail, used=rq.used_ring)
        assert relay.queue_thread_stats() is None and tasks() == threads
        assert not relay.resume_queue_thread(0)
    finally:
        relay.close()
        mem.close()
        for fd in (kick_fd, call_fd, need_fd):
            os.close(fd)
    assert tasks() == threads


def test_a_relay_dropped_without_close_stops_its_thread() -> None:
    relay, mem, _rq, fds = _direct()
    threads = tasks()
    assert relay.serve_queue_in_thread(0, *fds)
    assert tasks() == threads + 1
    del relay
    gc.collect()
    assert tasks() == threads, "the thread outlived its relay"
    mem.close()
    for fd in fds:
        os.close(fd)


def test_a_real_time_thread_is_asked_for_and_never_spins() -> None:
    relay, mem, rq, (kick_fd, call_fd, need_fd) = _direct()
    try:
        with pytest.raises(ValueError):
            relay.serve_queue_in_thread(0, kick_fd, call_fd, need_fd, spin=1e-5, rt_priority=1)
        assert relay.serve_queue_in_thread(0, kick_fd, call_fd, need_fd, rt_priority=1)
        k = relay._queues.kick
        assert k is not None
        policy = None
        if k.rt_error == 0:  # allowed here (root, or RLIMIT_RTPRIO): the thread is SCHED_FIFO
            for tid in os.listdir("/proc/self/task"):
                fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
                if int(fields[38]) == os.SCHED_FIFO:  # field 41, policy (proc(5))
                    policy = os.SCHED_FIFO
            assert policy == os.SCHED_FIFO
        else:
            assert k.rt_error == errno.EPERM
        rq.add([AttachRequest(1, ENDPOINT).pack()], [4], publish=True)
        os.write(kick_fd, (1).to_bytes(8, "little"))
        _wait_fired(need_fd)
        relay.queue_thread_handover(0)
        assert relay.resume_queue_thread(0)
        o = _serve(rq, kick_fd, MapRequest(1, 0x1000, 0x1FFF, 0x200000, 3).pack())
        assert Status(mem.read(o, 1)[0]) == Status.OK
    finally:
        relay.close()
        mem.close()
        for fd in (kick_fd, call_fd, need_fd):
            os.close(fd)
