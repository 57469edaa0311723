"""Send requests through the C request-queue walker instead of handle_request.

``use_ring(monkeypatch)`` replaces :meth:`Relay.handle_request` for the test
with a driver that writes the request into a split virtqueue in the relay's
guest memory (a ring region of its own, far above the test's RAM), kicks
:meth:`Relay.process_queue` and returns exactly the bytes the device wrote
(used length), so every existing assertion checks the ring path unchanged.
"""

from __future__ import annotations

import pytest

from hostrelay import Relay
from hostrelay.drivers.virtqueue import DriverQueue

RING_GPA = 1 << 44
RING_SIZE = 8 << 20
QUEUE_ENTRIES = 64


def _ring_handle_request(self: Relay, readable: bytes | bytearray | memoryview, writable_len: int) -> bytes:
    q: DriverQueue | None = getattr(self, "_test_ring", None)
    if q is None:
        if not any(r.gpa == RING_GPA for r in self.memory.regions):
            self.memory.add_region(RING_GPA, RING_SIZE)
        q = DriverQueue(self.memory, RING_GPA, QUEUE_ENTRIES, data_size=RING_SIZE - 0x10000)
        self.set_queue(0, size=q.size, desc=q.desc, avail=q.avail, used=q.used_ring)
        self._test_ring = q  # type: ignore[attr-defined]
    _, outs = q.add([bytes(readable)], [writable_len] if writable_len else [])
    assert self.process_queue(0) == 1
    used = q.used()
    assert len(used) == 1
    if not used[0].len:
        return b""
    return self.memory.read(outs[0], used[0].len)


def use_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Relay, "handle_request", _ring_handle_request)
