"""Relay.set_queue / process_queue: the request and event queues walked in C."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hostrelay import GuestMemory, Relay
from hostrelay.protocol import AttachRequest, MapFlag, MapRequest, ProbeRequest, Status, UnmapRequest
from hostrelay.virtqueue import DESC_F_NEXT, DESC_F_WRITE, DriverQueue

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


@pytest.mark.parametrize("kind", ["bad_head", "loop", "outside", "writable_first"])
def test_malformed_chains_get_used_length_zero_and_change_nothing(
    setup: tuple[Relay, DriverQueue], memory: GuestMemory, kind: str
) -> None:
    r, q = setup
    assert r.handle_request(AttachRequest(3, 1).pack(), 4) == bytes(4)
    buf = q.alloc(64)
    memory.write(buf, MapRequest(3, 0, 0xFFF, 0, R).pack())
    if kind == "bad_head":
        head = q.size + 5
    else:
        head, nxt = q.reserve(2)
        if kind == "loop":
            q.write_desc(head, buf, 36, DESC_F_NEXT, nxt)
            q.write_desc(nxt, buf, 4, DESC_F_NEXT | DESC_F_WRITE, head)
        elif kind == "outside":
            q.write_desc(head, RAM - 8, 36, DESC_F_NEXT, nxt)
            q.write_desc(nxt, buf + 40, 4, DESC_F_WRITE)
        else:
            q.write_desc(head, buf + 40, 4, DESC_F_WRITE | DESC_F_NEXT, nxt)
            q.write_desc(nxt, buf, 36, 0)
    q.publish(head)
    _, (ok,) = q.add([MapRequest(3, 0x1000, 0x1FFF, 0x1000, R).pack()], [4])  # the ring keeps working
    assert r.process_queue() == 2
    used = q.used()
    assert (used[0].id, used[0].len) == (head, 0)
    assert used[1].len == 4 and tail_of(memory, ok) == Status.OK
    assert [m.start for m in r.mappings(3)] == [0x1000], "the malformed MAP changed nothing"


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
