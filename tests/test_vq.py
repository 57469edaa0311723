"""The C split-virtqueue walker (cext/hr_vq.c) against a driver-side queue."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostrelay._native import ffi, lib
from hostrelay.backends.memory import GuestMemory
from hostrelay.drivers.virtqueue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DriverQueue

RAM = 4 << 20
QSIZE = 16


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory() as m:
        m.add_region(0, RAM // 2)
        m.add_region(RAM // 2, RAM // 2)  # two regions: chains may cross memfds
        yield m


def _gmem(memory: GuestMemory) -> Any:
    g = ffi.new("struct hr_gmem *")
    regions = ffi.new("struct hr_gmem_region[]", len(memory.regions))
    for i, r in enumerate(memory.regions):
        regions[i].gpa, regions[i].size, regions[i].hva = r.gpa, r.size, r.hva
    assert lib.hr_gmem_set(g, regions, len(memory.regions)) == 0
    return g


class Device:
    """The device side, straight on the C functions."""

    def __init__(self, memory: GuestMemory, q: DriverQueue) -> None:
        self.gmem = _gmem(memory)
        self.vq = ffi.new("struct hr_vq *")
        assert lib.hr_vq_setup(self.vq, self.gmem, q.size, q.desc, q.avail, q.used_ring) == 0
        self.chain = ffi.new("struct hr_chain *")
        self.why = ffi.new("int *")

    def pop(self) -> tuple[int, bytes, int, int]:
        """(rc, readable bytes, writable length, why)."""
        rc = lib.hr_vq_pop(self.vq, self.chain, self.why)
        if rc != 1:
            return rc, b"", 0, self.why[0]
        buf = ffi.new("char[]", max(self.chain.read_len, 1))
        n = lib.hr_chain_read(self.chain, buf, self.chain.read_len)
        return rc, bytes(ffi.buffer(buf, n)), int(self.chain.write_len), 0

    def reply(self, data: bytes) -> None:
        assert lib.hr_chain_write(self.chain, data, len(data)) == min(len(data), self.chain.write_len)
        lib.hr_vq_push(self.vq, self.chain.head, len(data))


@pytest.mark.parametrize("indirect", [False, True])
def test_chain_round_trip(memory: GuestMemory, indirect: bool) -> None:
    q = DriverQueue(memory, 0x1000, QSIZE)
    dev = Device(memory, q)
    head, (out_gpa,) = q.add([b"hello ", b"world"], [8], indirect=indirect)
    assert lib.hr_vq_pending(dev.vq) == 1
    rc, data, wlen, _ = dev.pop()
    assert (rc, data, wlen) == (1, b"hello world", 8)
    dev.reply(b"ANSWER!!")
    assert [(u.id, u.len) for u in q.used()] == [(head, 8)]
    assert memory.read(out_gpa, 8) == b"ANSWER!!"
    assert dev.pop()[0] == 0  # nothing more


def test_used_ring_reports_head_and_length(memory: GuestMemory) -> None:
    q = DriverQueue(memory, 0x1000, QSIZE)
    dev = Device(memory, q)
    heads = [q.add([bytes([i]) * 4], [4], publish=False)[0] for i in range(3)]
    q.publish(*heads)
    for i in range(3):
        rc, data, _, _ = dev.pop()
        assert rc == 1 and data == bytes([i]) * 4
        dev.reply(b"ok%02d" % i)
    used = q.used()
    assert [(u.id, u.len) for u in used] == [(h, 4) for h in heads]


def test_ring_wraps_past_16_bit_index(memory: GuestMemory) -> None:
    q = DriverQueue(memory, 0x1000, 4)
    dev = Device(memory, q)
    for i in range(70000 // 1000):  # many laps; the 16-bit indices wrap below
        for _ in range(3):
            q.add([b"x"], [1])
            assert dev.pop()[0] == 1
            dev.reply(b"y")
        assert len(q.used()) == 3


def _malformed(memory: GuestMemory, build: Any) -> int:
    q = DriverQueue(memory, 0x1000, QSIZE)
    dev = Device(memory, q)
    head = build(q)
    q.publish(head)
    rc, _, _, why = dev.pop()
    assert rc == -1
    assert dev.chain.head == head
    lib.hr_vq_push(dev.vq, dev.chain.head, 0)  # the relay completes it with length 0
    assert [(u.id, u.len) for u in q.used()] == [(head, 0)]
    return int(why)


def test_bad_head_index_breaks_the_queue(memory: GuestMemory) -> None:
    # No used element may name a descriptor that does not exist: the queue
    # stops (the device needs a reset) instead of completing it.
    q = DriverQueue(memory, 0x1000, QSIZE)
    dev = Device(memory, q)
    q.publish(QSIZE + 3)
    q.add([b"x"], [1])
    rc, _, _, why = dev.pop()
    assert (rc, why) == (-1, lib.HR_VQ_BAD_HEAD)
    assert dev.vq.broken == 1
    assert dev.chain.head >= QSIZE, "the head handed back names no descriptor"
    assert lib.hr_vq_pending(dev.vq) == 0, "nothing more is served from a broken queue"
    assert dev.pop()[0] == 0
    assert q.used() == []


def test_bad_next_index(memory: GuestMemory) -> None:
    def build(q: DriverQueue) -> int:
        q.write_desc(0, q.data, 4, DESC_F_NEXT, QSIZE + 1)
        return 0

    assert _malformed(memory, build) == lib.HR_VQ_BAD_NEXT


def test_descriptor_loop_terminates(memory: GuestMemory) -> None:
    def build(q: DriverQueue) -> int:
        q.write_desc(0, q.data, 4, DESC_F_NEXT, 1)
        q.write_desc(1, q.data, 4, DESC_F_NEXT, 0)
        return 0

    assert _malformed(memory, build) == lib.HR_VQ_LOOP


def test_readable_after_writable_is_refused(memory: GuestMemory) -> None:
    def build(q: DriverQueue) -> int:
        q.write_desc(0, q.data, 4, DESC_F_WRITE | DESC_F_NEXT, 1)
        q.write_desc(1, q.data, 4, 0)
        return 0

    assert _malformed(memory, build) == lib.HR_VQ_ORDER


@pytest.mark.parametrize("addr,length", [(RAM - 2, 4), (RAM + 0x1000, 4), (2**64 - 2, 4)])
def test_buffer_outside_guest_memory(memory: GuestMemory, addr: int, length: int) -> None:
    def build(q: DriverQueue) -> int:
        q.write_desc(0, addr, length, 0)
        return 0

    assert _malformed(memory, build) == lib.HR_VQ_BAD_ADDR


def test_buffer_crossing_regions_is_refused_not_misread(memory: GuestMemory) -> None:
    # One descriptor must map to one host range; a buffer straddling two
    # memfds is not contiguous in host memory.
    def build(q: DriverQueue) -> int:
        q.write_desc(0, RAM // 2 - 2, 4, 0)
        return 0

    assert _malformed(memory, build) == lib.HR_VQ_BAD_ADDR


@pytest.mark.parametrize("case", ["nested", "with_next", "bad_len", "outside"])
def test_bad_indirect(memory: GuestMemory, case: str) -> None:
    def build(q: DriverQueue) -> int:
        table = q.alloc(64)
        q.write_desc(0, q.data, 4, 0, table=table)
        flags, length, addr = DESC_F_INDIRECT, 32, table
        if case == "nested":
            q.write_desc(0, table, 16, DESC_F_INDIRECT, table=table)
        elif case == "with_next":
            flags |= DESC_F_NEXT
        elif case == "bad_len":
            length = 20
        else:
            addr = RAM + 0x1000
        q.write_desc(0, addr, length, flags, 1)
        return 0

    assert _malformed(memory, build) == lib.HR_VQ_BAD_INDIRECT


def test_indirect_loop_terminates(memory: GuestMemory) -> None:
    def build(q: DriverQueue) -> int:
        table = q.alloc(32)
        q.write_desc(0, q.data, 4, DESC_F_NEXT, 1, table=table)
        q.write_desc(1, q.data, 4, DESC_F_NEXT, 0, table=table)
        q.write_desc(0, table, 32, DESC_F_INDIRECT)
        return 0

    assert _malformed(memory, build) == lib.HR_VQ_LOOP


def test_setup_rejects_bad_geometry(memory: GuestMemory) -> None:
    g = _gmem(memory)
    vq = ffi.new("struct hr_vq *")
    assert lib.hr_vq_setup(vq, g, 12, 0x1000, 0x2000, 0x3000) < 0  # not a power of two
    assert lib.hr_vq_setup(vq, g, 16, 0x1008, 0x2000, 0x3000) < 0  # desc misaligned
    assert lib.hr_vq_setup(vq, g, 16, 0x1000, 0x2000, 0x3002) < 0  # used misaligned
    assert lib.hr_vq_setup(vq, g, 16, RAM, 0x2000, 0x3000) < 0  # outside memory
    assert lib.hr_vq_pending(vq) == 0  # a refused queue is not ready


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 7),
                          st.integers(0, 0xFFFF)), min_size=QSIZE, max_size=QSIZE),
       st.integers(0, 0xFFFF))  # fmt: skip
def test_random_descriptor_tables_never_crash_or_hang(descs: list[tuple[int, int, int, int]], head: int) -> None:
    with GuestMemory() as m:
        m.add_region(0, 1 << 20)
        q = DriverQueue(m, 0, QSIZE, data_size=4096)
        for i, (addr, length, flags, nxt) in enumerate(descs):
            # Half the time point into RAM so deeper paths are reached.
            if addr & 1:
                addr = (addr >> 1) % (1 << 20)
            q.write_desc(i, addr, length % (1 << 21) if nxt & 1 else length, flags, nxt % (QSIZE + 2))
        dev = Device(m, q)
        q.publish(head % (QSIZE + 2))
        rc, _, _, _ = dev.pop()
        assert rc in (1, -1)
        if rc == 1:
            assert dev.chain.nread + dev.chain.nwrite <= lib.HR_CHAIN_MAX_SEGS


def test_avail_index_moved_past_the_ring_breaks_the_queue(memory: GuestMemory) -> None:
    # A driver cannot have more than `size` chains outstanding (§2.7.6); an
    # index that says so is impossible, and would let a guest keep the walker
    # busy forever by rewriting it.
    q = DriverQueue(memory, 0x1000, QSIZE)
    dev = Device(memory, q)
    q.add([b"x"], [1])
    assert lib.hr_vq_pending(dev.vq) == 1
    memory.write(q.avail + 2, (QSIZE + 1).to_bytes(2, "little"))
    assert lib.hr_vq_pending(dev.vq) == 0
    assert dev.vq.broken == 1
    assert dev.pop()[0] == 0
