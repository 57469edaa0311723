"""The driver side of a split virtqueue in guest memory (virtio 1.2 §2.7).

hostrelay is the *device*; this is what a guest driver (or a VMM's test
harness) does on the other side of the ring: lay out the descriptor table and
the available/used rings in :class:`~hostrelay.backends.memory.GuestMemory`, put
request buffers in guest RAM, publish chains, and read completions.  Tests and
examples use it to feed :meth:`hostrelay.relay.Relay.process_queue` exactly as
a guest would; it also builds malformed chains on purpose.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from hostrelay.backends.memory import GuestMemory

__all__ = ["DESC_F_INDIRECT", "DESC_F_NEXT", "DESC_F_WRITE", "DriverQueue", "Used"]

# virtio 1.2 §2.7.5 descriptor flags (the values of <linux/virtio_ring.h>).
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4

_DESC = struct.Struct("<QIHH")


@dataclass(frozen=True)
class Used:
    """One used-ring element: the chain's head and how many bytes the device wrote."""

    id: int
    len: int


def _align(value: int, to: int) -> int:
    return (value + to - 1) & ~(to - 1)


def _view(address: int, size: int) -> memoryview:
    """Bytes at a host address, without holding the mapping open (the queue
    is only usable while its GuestMemory is, like any view of guest memory)."""
    return memoryview((ctypes.c_char * size).from_address(address)).cast("B")


class DriverQueue:
    """A split virtqueue of ``size`` entries at ``base`` in guest memory.

    Layout from ``base``: descriptor table, available ring, used ring (each
    aligned as §2.7 requires), then a data area of ``data_size`` bytes from
    which request buffers are carved.  Descriptors are handed out round-robin;
    the caller completes a batch (:meth:`used`) before reusing a slot.  Like
    any view of guest memory, a queue is usable while ``memory`` is open.
    """

    def __init__(self, memory: GuestMemory, base: int, size: int, *, data_size: int = 1 << 20) -> None:
        if size <= 0 or size & (size - 1) or size > 32768:
            raise ValueError("queue size must be a power of two <= 32768")
        self.memory = memory
        self.size = size
        self.desc = _align(base, 16)
        self.avail = self.desc + 16 * size
        self.used_ring = _align(self.avail + 6 + 2 * size, 4)
        self.data = _align(self.used_ring + 6 + 8 * size, 64)
        self.data_end = self.data + data_size
        memory.require(self.desc, self.data_end - self.desc)
        memory.write(self.desc, bytes(self.data - self.desc))
        self._next_desc = 0
        self._data_pos = self.data
        self.avail_idx = 0
        self.last_used = 0
        # The ring indexes as direct views when each lies in one region, so
        # publishing and counting completions cost a few stores and loads, as
        # in a real driver (under TCG the driver shares the vCPU with the
        # device: its Python would otherwise be charged to the device).
        # memoryviews, not ctypes calls: a slice store is one memcpy inside
        # the interpreter, where ctypes.memmove is a libffi call (measured
        # under TCG: the leaner driver cost the ring ~0.01x raw less).
        self._ring: memoryview | None = None  # the avail ring's entries, as bytes
        self._avail_idx: memoryview | None = None  # avail->idx, one u16
        self._used_idx: memoryview | None = None  # used->idx, one u16
        if len(memory.spans(self.avail, 4 + 2 * size)) == 1 and len(memory.spans(self.used_ring, 4)) == 1:
            self._ring = _view(memory.host_address(self.avail + 4), 2 * size)
            self._avail_idx = _view(memory.host_address(self.avail + 2), 2).cast("H")
            self._used_idx = _view(memory.host_address(self.used_ring + 2), 2).cast("H")

    # -- raw access (also for building malformed chains) ------------------
    def write_desc(self, index: int, addr: int, length: int, flags: int, next_index: int = 0,
                   table: int | None = None) -> None:  # fmt: skip
        """Write descriptor ``index`` of the ring's table (or of an indirect ``table``)."""
        base = self.desc if table is None else table
        self.memory.write(base + 16 * index, _DESC.pack(addr, length, flags, next_index))

    def publish(self, *heads: int) -> None:
        """Put chain heads in the available ring and expose them (one index update).

        The ring slots are written in at most two runs (the ring may wrap), so
        a burst costs the driver side two memory writes, not one per chain.
        """
        self.publish_packed(self.pack_heads(*heads))

    @staticmethod
    def pack_heads(*heads: int) -> bytes:
        """Chain heads as avail-ring entries, for :meth:`publish_packed`.

        A driver that posts the same chains again and again (event buffers,
        a benchmark's batch) packs them once.
        """
        return struct.pack(f"<{len(heads)}H", *heads)

    def publish_packed(self, entries: bytes) -> None:
        """:meth:`publish` for heads packed by :meth:`pack_heads`."""
        n = len(entries) // 2
        start = self.avail_idx % self.size
        first = min(n, self.size - start)
        self.avail_idx = (self.avail_idx + n) & 0xFFFF
        if self._ring is not None and self._avail_idx is not None:
            self._ring[2 * start : 2 * (start + first)] = entries[: 2 * first]
            if first < n:
                self._ring[: 2 * (n - first)] = entries[2 * first :]
            self._avail_idx[0] = self.avail_idx  # after the entries (x86 stores stay in order)
            return
        self.memory.write(self.avail + 4 + 2 * start, entries[: 2 * first])
        if first < n:
            self.memory.write(self.avail + 4, entries[2 * first :])
        self.memory.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def alloc(self, size: int, align: int = 16) -> int:
        """Carve ``size`` bytes of guest memory from the data area (wraps around)."""
        pos = _align(self._data_pos, align)
        if pos + size > self.data_end:
            pos = self.data
            if pos + size > self.data_end:
                raise ValueError("data area too small")
        self._data_pos = pos + size
        return pos

    # -- the normal driver path --------------------------------------------
    def add(self, readable: Sequence[bytes], writable: Sequence[int], *, indirect: bool = False,
            publish: bool = True) -> tuple[int, list[int]]:  # fmt: skip
        """Add one chain: readable buffers, then writable ones of the given sizes.

        Returns the head index and the GPAs of the writable buffers.  With
        ``indirect`` the chain is one ring descriptor pointing at an indirect
        table (§2.7.5.3).
        """
        segs: list[tuple[int, int, int]] = []
        for data in readable:
            gpa = self.alloc(max(len(data), 1))
            self.memory.write(gpa, data)
            segs.append((gpa, len(data), 0))
        out = []
        for n in writable:
            gpa = self.alloc(max(n, 1))
            self.memory.write(gpa, bytes(n))
            segs.append((gpa, n, DESC_F_WRITE))
            out.append(gpa)
        if indirect:
            table = self.alloc(16 * len(segs))
            for i, (gpa, n, flags) in enumerate(segs):
                last = i == len(segs) - 1
                self.write_desc(i, gpa, n, flags | (0 if last else DESC_F_NEXT), i + 1, table=table)
            head = self._take(1)[0]
            self.write_desc(head, table, 16 * len(segs), DESC_F_INDIRECT)
        else:
            idx = self._take(len(segs))
            head = idx[0]
            for i, (gpa, n, flags) in enumerate(segs):
                last = i == len(segs) - 1
                self.write_desc(idx[i], gpa, n, flags | (0 if last else DESC_F_NEXT), 0 if last else idx[i + 1])
        if publish:
            self.publish(head)
        return head, out

    def reserve(self, count: int) -> list[int]:
        """Descriptor indices for a chain the caller writes itself (:meth:`write_desc`)."""
        return self._take(count)

    def _take(self, count: int) -> list[int]:
        if count > self.size:
            raise ValueError("chain longer than the queue")
        out = [(self._next_desc + i) % self.size for i in range(count)]
        self._next_desc = (self._next_desc + count) % self.size
        return out

    def consume(self) -> int:
        """Count and skip the used elements since the last call, without decoding them."""
        if self._used_idx is not None:
            idx: int = self._used_idx[0]
        else:
            idx = struct.unpack("<H", self.memory.read(self.used_ring + 2, 2))[0]
        count = (idx - self.last_used) & 0xFFFF
        self.last_used = idx
        return count

    def used(self) -> list[Used]:
        """The used-ring elements completed since the last call."""
        idx = struct.unpack("<H", self.memory.read(self.used_ring + 2, 2))[0]
        count = (idx - self.last_used) & 0xFFFF
        if not count:
            return []
        start = self.last_used % self.size
        first = min(count, self.size - start)
        raw = self.memory.read(self.used_ring + 4 + 8 * start, 8 * first)
        if first < count:
            raw += self.memory.read(self.used_ring + 4, 8 * (count - first))
        self.last_used = idx
        return [Used(i, n) for i, n in struct.iter_unpack("<II", raw)]
