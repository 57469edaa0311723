"""Relay.start_recording / take_recording / stop_recording: a stream kept and replayed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hostrelay import GuestMemory, Relay
from hostrelay.drivers.virtqueue import DriverQueue
from hostrelay.model.wire import (
    AttachRequest,
    DetachRequest,
    MapFlag,
    MapRequest,
    ProbeRequest,
    Status,
    UnmapRequest,
)
from hostrelay.relay import RecordedRequest

RAM = 16 << 20
RING = 0x800000
RW = int(MapFlag.READ | MapFlag.WRITE)
PROBE_WLEN = 512 + 4


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory() as m:
        m.add_region(0, RAM)
        yield m


def relay_with_queue(memory: GuestMemory, size: int = 1024) -> tuple[Relay, DriverQueue]:
    r = Relay(memory)
    r.add_endpoint(1)
    r.add_endpoint(2)
    q = DriverQueue(memory, RING, size, data_size=4 << 20)
    r.set_queue(0, size=q.size, desc=q.desc, avail=q.avail, used=q.used_ring)
    return r, q


def mixed_stream() -> list[bytes]:
    """ATTACHes, PROBEs, MAPs and UNMAPs, some refused, some framed wrongly."""
    reqs = [AttachRequest(7, 1).pack(), AttachRequest(8, 2).pack(), ProbeRequest(1).pack()]
    reqs += [MapRequest(7, i << 12, (i << 12) + 0xFFF, i << 12, RW).pack() for i in range(300)]
    reqs += [MapRequest(7, 5 << 12, (5 << 12) + 0xFFF, 0, RW).pack()]  # overlap: INVAL
    reqs += [MapRequest(9, 0, 0xFFF, 0, RW).pack()]  # no such domain: NOENT
    reqs += [MapRequest(7, 0x10000000, 0x10000FFF, RAM, RW).pack()]  # outside guest RAM: FAULT
    reqs += [UnmapRequest(7, 0, (100 << 12) - 1).pack(), UnmapRequest(7, (100 << 12) + 0x800, (101 << 12) + 0xFFF).pack()]
    reqs += [MapRequest(7, 1 << 30, (1 << 30) + 0xFFF, 0, RW).pack()[:-1]]  # one byte short
    reqs += [MapRequest(8, 0, 0x1FFF, 0x2000, int(MapFlag.READ)).pack(), DetachRequest(8, 2).pack()]
    reqs += [bytes([0x7F]) + bytes(15)]  # unknown type: used length 0
    return reqs


def post(q: DriverQueue, reqs: list[bytes]) -> list[tuple[int, int]]:
    """Make the requests available; return (tail GPA, writable length) of each."""
    heads, outs = [], []
    for raw in reqs:
        wlen = PROBE_WLEN if raw[0] == 5 else 4
        h, (o,) = q.add([raw], [wlen], publish=False)
        heads.append(h)
        outs.append((o, wlen))
    q.publish(*heads)
    return outs


def table(r: Relay) -> dict[int, list[tuple[int, int, int, int]]]:
    return {d: [(m.start, m.end, m.phys, m.flags) for m in r.mappings(d)] for d in r.domain_ids()}


def test_ring_and_door_recorded_in_order_and_replayed(memory: GuestMemory) -> None:
    r, q = relay_with_queue(memory)
    r.start_recording()
    reqs = mixed_stream()
    outs = post(q, reqs)
    assert r.process_queue() == len(reqs)
    direct = MapRequest(7, 2 << 30, (2 << 30) + 0xFFF, 0x3000, RW).pack()
    assert r.handle_request(direct, 4) == bytes(4)
    rec = r.take_recording()

    # Everything, in completion order, with exactly what the device wrote.
    assert [e.request for e in rec] == reqs + [direct]
    assert [e.writable_len for e in rec] == [w for _, w in outs] + [4]
    for e, (o, w) in zip(rec, outs):
        written = memory.read(o, w)
        assert e.reply == (written if e.reply else b""), e
    statuses = [Status(e.reply[-1 - 3]) if e.reply else None for e in rec]
    assert statuses[:3] == [Status.OK] * 3 and len(rec[2].reply) == PROBE_WLEN
    assert statuses[303:306] == [Status.INVAL, Status.NOENT, Status.FAULT]
    assert statuses[306:308] == [Status.OK, Status.RANGE]  # the second straddles a mapping
    assert statuses[308] == Status.INVAL  # framing
    assert statuses[-2] is None and rec[-2].reply == b""  # unknown type: used length 0
    assert r.take_recording() == []  # taken

    # Replayed request by request on a fresh relay: the same replies, the same table.
    with GuestMemory() as m2:
        m2.add_region(0, RAM)
        r2 = Relay(m2)
        r2.add_endpoint(1)
        r2.add_endpoint(2)
        assert [r2.handle_request(e.request, e.writable_len) for e in rec] == [e.reply for e in rec]
        assert table(r2) == table(r)
        r2.close()
    r.close()


def test_recording_does_not_change_an_outcome(memory: GuestMemory) -> None:
    """The ring's general walk (recording) and its fast run (not) answer alike."""
    replies = []
    for recording in (False, True):
        with GuestMemory() as m:
            m.add_region(0, RAM)
            r, q = relay_with_queue(m)
            if recording:
                r.start_recording()
            outs = post(q, mixed_stream())
            r.process_queue()
            replies.append(([m.read(o, w) for o, w in outs], table(r), [u.len for u in q.used()]))
            r.close()
    assert replies[0] == replies[1]


def test_more_records_than_the_walker_holds(memory: GuestMemory) -> None:
    # 500 requests (two descriptors each) in one kick: the C walker hands
    # its records over every 256.
    r, q = relay_with_queue(memory)
    r.start_recording()
    reqs = [AttachRequest(7, 1).pack()]
    for i in range(250):
        reqs += [MapRequest(7, i << 12, (i << 12) + 0xFFF, 0, RW).pack(), UnmapRequest(7, i << 12, (i << 12) + 0xFFF).pack()]
    post(q, reqs[:500])
    assert r.process_queue() == 500
    rec = r.stop_recording()
    assert [e.request for e in rec] == reqs[:500]
    assert all(e.reply == bytes(4) for e in rec)


def test_stop_and_reset_and_setup_while_recording(memory: GuestMemory) -> None:
    r, q = relay_with_queue(memory)
    assert r.stop_recording() == []  # not recording: nothing
    r.start_recording()
    r.start_recording()  # already: nothing changes
    post(q, [AttachRequest(7, 1).pack()])
    r.process_queue()
    # A device reset drops the queues; the ones set up again are recorded too.
    r.reset()
    q2 = DriverQueue(memory, RING + 0x100000, 64, data_size=1 << 20)
    r.set_queue(0, size=q2.size, desc=q2.desc, avail=q2.avail, used=q2.used_ring)
    post(q2, [AttachRequest(7, 1).pack(), MapRequest(7, 0, 0xFFF, 0, RW).pack()])
    r.process_queue()
    rec = r.stop_recording()
    assert [e.request[0] for e in rec] == [1, 1, 3]
    assert all(isinstance(e, RecordedRequest) for e in rec)
    # Stopped: the door is the relay's own again, and nothing more is kept.
    assert "handle_request" not in vars(r) or r.handle_request.__name__ != "recording_door"
    r.handle_request(UnmapRequest(7, 0, 0xFFF).pack(), 4)
    assert r.take_recording() == []
    r.close()
