"""Relay.set_queue / process_queue: the request and event queues walked in C."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostrelay import GuestMemory, Relay
from hostrelay.kernel.errors import VfioNoDevice
from hostrelay.model.wire import AttachRequest, MapFlag, MapRequest, ProbeRequest, Status, UnmapRequest
from hostrelay.drivers.virtqueue import DESC_F_NEXT, DESC_F_WRITE, DriverQueue

RAM = 16 << 20
RING = 0x800000
EVENTS = 0xC00000
R, W = int(MapFlag.READ), int(MapFlag.WRITE)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory() as m:
        m.add_region(0, RAM)
        yield m


@pytest.fixture
def setup(memory: GuestMemory) -> tuple[Relay, DriverQueue]:
    r = Relay(memory)
    r.add_endpoint(1)
    q = DriverQueue(memory, RING, 256, data_size=1 << 20)
    r.set_queue(0, size=q.size, desc=q.desc, avail=q.avail, used=q.used_ring)
    return r, q


def tail_of(memory: GuestMemory, gpa: int) -> Status:
    return Status(memory.read(gpa, 1)[0])


def test_batch_of_mixed_requests_completes_in_order(setup: tuple[Relay, DriverQueue], memory: GuestMemory) -> None:
    r, q = setup
    reqs = [AttachRequest(7, 1).pack()]
    reqs += [MapRequest(7, i << 12, (i << 12) + 0xFFF, i << 12, R | W).pack() for i in range(100)]
    reqs += [ProbeRequest(1).pack()]
    reqs += [UnmapRequest(7, 0, (50 << 12) - 1).pack(), MapRequest(7, 0, 0xFFF, 0, 1 << 7).pack()]
    heads, outs = [], []
    for raw in reqs:
        wlen = 512 + 4 if raw[0] == 5 else 4
        h, (o,) = q.add([raw], [wlen], publish=False)
        heads.append(h)
        outs.append((o, wlen))
    q.publish(*heads)
    assert r.process_queue() == len(reqs)
    used = q.used()
    assert [u.id for u in used] == heads
    assert [u.len for u in used] == [w for _, w in outs]  # used length = writable length
    statuses = [tail_of(memory, o + w - 4) for o, w in outs]
    assert statuses[:-1] == [Status.OK] * (len(reqs) - 1)
    assert statuses[-1] == Status.INVAL  # unknown MAP flag (D-25)
    assert [(m.start, m.end) for m in r.mappings(7)][0] == (50 << 12, (50 << 12) + 0xFFF)
    assert r.mapping_count(7) == 50
    assert r.translate(1, 60 << 12, 8, write=True) == 60 << 12


def test_chained_and_indirect_requests(setup: tuple[Relay, DriverQueue], memory: GuestMemory) -> None:
    r, q = setup
    raw = AttachRequest(3, 1).pack()
    _, (o1,) = q.add([raw[:5], raw[5:]], [4])  # readable part split in two descriptors
    _, (o2,) = q.add([MapRequest(3, 0, 0xFFF, 0, R).pack()], [4], indirect=True)
    assert r.process_queue() == 2
    assert tail_of(memory, o1) == tail_of(memory, o2) == Status.OK
    assert r.mapping_count(3) == 1


@pytest.mark.parametrize("kind", ["loop", "outside", "writable_first", "zero_length_outside"])
def test_malformed_chains_get_used_length_zero_and_change_nothing(
    setup: tuple[Relay, DriverQueue], memory: GuestMemory, kind: str
) -> None:
    r, q = setup
    assert r.handle_request(AttachRequest(3, 1).pack(), 4) == bytes(4)
    buf = q.alloc(64)
    memory.write(buf, MapRequest(3, 0, 0xFFF, 0, R).pack())
    head, nxt = q.reserve(2)
    if kind == "loop":
        q.write_desc(head, buf, 36, DESC_F_NEXT, nxt)
        q.write_desc(nxt, buf, 4, DESC_F_NEXT | DESC_F_WRITE, head)
    elif kind == "outside":
        q.write_desc(head, RAM - 8, 36, DESC_F_NEXT, nxt)
        q.write_desc(nxt, buf + 40, 4, DESC_F_WRITE)
    elif kind == "writable_first":
        q.write_desc(head, buf + 40, 4, DESC_F_WRITE | DESC_F_NEXT, nxt)
        q.write_desc(nxt, buf, 36, 0)
    else:  # an empty writable descriptor outside RAM (not kept), then a readable one: still out of order
        q.write_desc(head, RAM + (1 << 30), 0, DESC_F_WRITE | DESC_F_NEXT, nxt)
        q.write_desc(nxt, buf, 36, 0)
    q.publish(head)
    _, (ok,) = q.add([MapRequest(3, 0x1000, 0x1FFF, 0x1000, R).pack()], [4])  # the ring keeps working
    assert r.process_queue() == 2
    used = q.used()
    assert (used[0].id, used[0].len) == (head, 0)
    assert used[1].len == 4 and tail_of(memory, ok) == Status.OK
    assert [m.start for m in r.mappings(3)] == [0x1000], "the malformed MAP changed nothing"


def test_impossible_head_stops_the_queue_until_reset(setup: tuple[Relay, DriverQueue], memory: GuestMemory) -> None:
    """An avail entry >= the queue size names no descriptor: no used element
    can be written for it, so the queue stops and the device needs a reset
    (virtio 1.2 §2.1.2), rather than tell the driver about a descriptor that
    cannot exist."""
    r, q = setup
    assert r.handle_request(AttachRequest(3, 1).pack(), 4) == bytes(4)
    q.publish(q.size + 5)
    q.add([MapRequest(3, 0x1000, 0x1FFF, 0x1000, R).pack()], [4])  # behind it: not served
    assert not r.needs_reset
    assert r.process_queue() == 0
    assert r.needs_reset
    assert q.used() == [], "no used element names the impossible head"
    assert r.mapping_count(3) == 0
    assert r.process_queue() == 0, "the queue stays stopped"
    r.reset()  # the driver's answer to DEVICE_NEEDS_RESET
    assert not r.needs_reset
    with pytest.raises(ValueError):
        r.process_queue(0)  # a reset device has no queues until the driver sets them up again


def test_malformed_chain_inside_a_burst_keeps_the_order(setup: tuple[Relay, DriverQueue], memory: GuestMemory) -> None:
    # The walker decodes runs of plain MAP/UNMAP ahead of carrying them out;
    # anything else ends the run and is served alone, in its place.
    r, q = setup
    assert r.handle_request(AttachRequest(3, 1).pack(), 4) == bytes(4)
    heads, tails = [], []
    for i in range(5):
        if i == 2:
            (bad,) = q.reserve(1)
            q.write_desc(bad, RAM - 8, 36, 0)  # runs off the end of guest RAM
            heads.append(bad)
            tails.append(None)
            continue
        h, (t,) = q.add([MapRequest(3, i << 12, (i << 12) + 0xFFF, 0, R).pack()], [4], publish=False)
        heads.append(h)
        tails.append(t)
    q.publish(*heads)
    assert r.process_queue() == 5
    used = q.used()
    assert [u.id for u in used] == heads
    assert [u.len for u in used] == [4, 4, 0, 4, 4]
    assert all(tail_of(memory, t) == Status.OK for t in tails if t is not None)
    assert [m.start >> 12 for m in r.mappings(3)] == [0, 1, 3, 4]


def test_python_backend_domain_inside_a_burst(setup: tuple[Relay, DriverQueue], memory: GuestMemory) -> None:
    # A domain whose backend only Python drives is checked in C, then handed
    # back (DEFER) in its place in the run; requests around it stay in C.
    from test_relay import FakeBackend

    r, q = setup
    backend = FakeBackend()
    r.add_endpoint(2, backend=backend)
    assert r.handle_request(AttachRequest(7, 1).pack(), 4) == bytes(4)
    assert r.handle_request(AttachRequest(8, 2).pack(), 4) == bytes(4)
    reqs = [MapRequest(7, i << 12, (i << 12) + 0xFFF, 0, R).pack() for i in range(3)]
    reqs += [MapRequest(8, 0x10000, 0x10FFF, 0, R).pack(), MapRequest(7, 0x3000, 0x3FFF, 0, R).pack()]
    reqs += [UnmapRequest(8, 0x10000, 0x10FFF).pack(), MapRequest(8, 0x20000, 0x20FFF, 0, R).pack()]
    reqs += [MapRequest(7, 0x4000, 0x4FFF, 0, R).pack()]
    heads, tails = [], []
    for raw in reqs:
        h, (t,) = q.add([raw], [4], publish=False)
        heads.append(h)
        tails.append(t)
    q.publish(*heads)
    assert r.process_queue() == len(reqs)
    assert [u.id for u in q.used()] == heads
    assert [tail_of(memory, t) for t in tails] == [Status.OK] * len(reqs)
    assert backend.calls == [("map", ((0x10000, 0x10FFF),)), ("unmap", ((0x10000, 0x10FFF),)),
                             ("map", ((0x20000, 0x20FFF),))]  # fmt: skip
    assert r.mapping_count(7) == 5 and [m.start for m in r.mappings(8)] == [0x20000]


def failing_container(r: Relay, domain: int) -> tuple[Any, Any]:
    """Attach endpoint 1 to ``domain`` and give the domain a C container on a
    closed fd: every MAP then fails in the kernel (EBADF), as a VFIO
    container's would, without needing VFIO.  Returns (container, list)."""
    from hostrelay._native import ffi, lib

    assert r.handle_request(AttachRequest(domain, 1).pack(), 4) == bytes(4)
    cont = ffi.new("struct hr_container *", {"fd": -1, "avail": 1000})
    conts = ffi.new("struct hr_container *[]", [cont])
    assert lib.hr_relay_domain_set_containers(r._dp.c, domain, conts, 1) == 0
    return cont, conts


def test_more_kernel_failures_than_one_call_holds(
    setup: tuple[Relay, DriverQueue], memory: GuestMemory, caplog: pytest.LogCaptureFixture
) -> None:
    # Every MAP fails in the kernel: the walker stops when its failure list
    # (HR_QUEUE_ERRS) is full, Python reports them, and the walk goes on.
    from hostrelay._native import lib

    r, q = setup
    cont, _conts = failing_container(r, 3)
    n = lib.HR_QUEUE_ERRS + 8
    heads, tails = [], []
    for i in range(n):
        h, (t,) = q.add([MapRequest(3, i << 12, (i << 12) + 0xFFF, i << 12, R).pack()], [4], publish=False)
        heads.append(h)
        tails.append(t)
    q.publish(*heads)
    with caplog.at_level("WARNING", logger="hostrelay"):
        assert r.process_queue() == n
    assert [u.id for u in q.used()] == heads
    assert {tail_of(memory, t) for t in tails} == {Status(lib.hr_status_for_errno(9))}  # EBADF
    assert sum("MAP at" in rec.getMessage() for rec in caplog.records) == n
    assert r.mapping_count(3) == 0, "every failed MAP was taken out of the table again"
    assert cont.entries == 0 and cont.avail == 1000


def test_kernel_failure_through_handle_request_is_reported_and_unlocks(
    setup: tuple[Relay, DriverQueue], caplog: pytest.LogCaptureFixture
) -> None:
    # hr_relay_fast keeps the relay's lock when it has a failure to report;
    # handle_request reports it and lets go (a leaked lock would hang below).
    from hostrelay._native import lib

    r, _ = setup
    cont, conts = failing_container(r, 3)
    bad = Status(lib.hr_status_for_errno(9))  # EBADF
    with caplog.at_level("WARNING", logger="hostrelay"):
        for i in range(3):
            assert r.handle_request(MapRequest(3, i << 12, (i << 12) + 0xFFF, 0, R).pack(), 4)[0] == bad
    assert sum("MAP at" in rec.getMessage() for rec in caplog.records) == 3
    assert r.mapping_count(3) == 0 and cont.entries == 0
    assert lib.hr_relay_domain_set_containers(r._dp.c, 3, conts, 0) == 0
    assert r.handle_request(MapRequest(3, 0, 0xFFF, 0, R).pack(), 4) == bytes(4)  # the lock is free again


def test_threads_share_the_relay(setup: tuple[Relay, DriverQueue], memory: GuestMemory) -> None:
    # The fast paths take the relay's lock in C, the rest in Python: two
    # threads mapping and unmapping, one translating and one walking the
    # ring must leave exactly what they mapped last.
    import threading

    r, q = setup
    assert r.handle_request(AttachRequest(3, 1).pack(), 4) == bytes(4)
    errors: list[BaseException] = []
    rounds = 296  # the last round maps page 7 (295 % 8) and keeps it

    def mapper(base: int) -> None:
        try:
            for i in range(rounds):
                iova = base + ((i % 8) << 12)
                assert r.handle_request(MapRequest(3, iova, iova + 0xFFF, iova, R | W).pack(), 4) == bytes(4)
                if i != rounds - 1:
                    assert r.handle_request(UnmapRequest(3, iova, iova + 0xFFF).pack(), 4) == bytes(4)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def translator() -> None:
        try:
            for _ in range(rounds):
                try:
                    assert r.translate(1, 0x100000 + 0x7000, 8, write=True) == 0x107000
                except Exception as exc:  # not mapped yet: a fault is fine, anything else is not
                    assert type(exc).__name__ == "TranslationFault", exc
        except BaseException as exc:
            errors.append(exc)

    def walker() -> None:
        try:
            for i in range(rounds // 10):
                iova = 0x800000 + (i << 12)
                _, (t,) = q.add([MapRequest(3, iova, iova + 0xFFF, iova, R).pack()], [4])
                assert r.process_queue() == 1 and memory.read(t, 1) == bytes(1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=mapper, args=(base,)) for base in (0x100000, 0x200000)]
    threads += [threading.Thread(target=translator), threading.Thread(target=walker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    starts = [m.start for m in r.mappings(3)]
    assert starts == [0x107000, 0x207000] + [0x800000 + (i << 12) for i in range(rounds // 10)]
    r.pop_events()


def test_faults_are_delivered_to_the_event_queue(setup: tuple[Relay, DriverQueue], memory: GuestMemory) -> None:
    r, q = setup
    ev = DriverQueue(memory, EVENTS, 8, data_size=4096)
    r.set_queue(1, size=ev.size, desc=ev.desc, avail=ev.avail, used=ev.used_ring)
    bufs = [ev.add([], [24])[1][0] for _ in range(2)]
    assert r.process_queue(1) == 0, "no fault yet: the buffers stay with the device"
    assert r.handle_request(AttachRequest(3, 1).pack(), 4) == bytes(4)
    with pytest.raises(Exception):
        r.translate(1, 0x5000, 4, write=True)
    assert r.process_queue(1) == 1
    used = ev.used()
    assert len(used) == 1 and used[0].len == 24
    record = memory.read(bufs[0], 24)
    assert record[0] == 2  # VIRTIO_IOMMU_FAULT_R_MAPPING
    assert int.from_bytes(record[8:12], "little") == 1
    assert int.from_bytes(record[16:24], "little") == 0x5000
    assert r.pop_events() == []


def test_set_queue_rejects_bad_geometry(memory: GuestMemory) -> None:
    r = Relay(memory)
    with pytest.raises(ValueError):
        r.set_queue(0, size=100, desc=0x1000, avail=0x2000, used=0x3000)
    with pytest.raises(ValueError):
        r.set_queue(0, size=16, desc=RAM, avail=0x2000, used=0x3000)
    with pytest.raises(ValueError):
        r.set_queue(2, size=16, desc=0x1000, avail=0x2000, used=0x3000)
    with pytest.raises(ValueError):
        r.process_queue(0)  # never set up


def test_setting_up_a_queue_freezes_the_config(memory: GuestMemory) -> None:
    # A driver sets up its queues after reading the config (virtio 1.2
    # §3.1.1), so from then on no VFIO endpoint may appear; a refused
    # set_queue is not a driver talking yet.  (The check comes before any
    # sysfs access, so no device is needed.)
    r = Relay(memory)
    with pytest.raises(ValueError):
        r.set_queue(0, size=100, desc=0x1000, avail=0x2000, used=0x3000)
    with pytest.raises(VfioNoDevice):  # not frozen: it went on to sysfs
        r.add_vfio_endpoint(0x99, "0000:00:00.0", sysfs_root=Path("/nonexistent"))
    q = DriverQueue(memory, RING, 16)
    r.set_queue(0, size=q.size, desc=q.desc, avail=q.avail, used=q.used_ring)
    with pytest.raises(RuntimeError, match="read the config"):
        r.add_vfio_endpoint(0x99, "0000:00:00.0", sysfs_root=Path("/nonexistent"))


def test_a_reply_over_the_avail_index_cannot_keep_the_walker_going(memory: GuestMemory) -> None:
    """The guest may point a writable buffer at its own avail index: the
    device's reply then rewrites the index while the walker runs.  Here it
    jumps past the ring (INVAL = 4, in a 2-entry queue), which breaks the
    queue; the walker must notice and return, not walk a stale chain forever
    (found by fuzzing: the walker took a chain pop() no longer gave)."""
    r = Relay(memory)
    r.add_endpoint(1)
    q = DriverQueue(memory, RING, 2, data_size=1 << 16)
    r.set_queue(0, size=q.size, desc=q.desc, avail=q.avail, used=q.used_ring)
    assert r.handle_request(AttachRequest(3, 1).pack(), 4) == bytes(4)
    buf = q.alloc(64)
    memory.write(buf, MapRequest(3, 0, 0xFFF, 0, R).pack()[:30])  # too short: INVAL, written in C
    a, b = q.reserve(2)
    q.write_desc(a, buf, 30, DESC_F_NEXT, b)
    q.write_desc(b, q.avail + 2, 4, DESC_F_WRITE)  # the reply lands on avail->idx
    # A second chain of the same kind is available when the index moves.
    q.publish(a, a)
    assert r.process_queue() == 1
    assert r.needs_reset
    assert r.process_queue() == 0
