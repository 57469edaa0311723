"""handle_request's native door (cext/pydoor/hr_pydoor.c): the same answers as the Python method."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator, Sequence

import pytest

from hostrelay import GuestMemory, Relay
from hostrelay.dataplane.table import Mapping
from hostrelay.model.wire import AttachRequest, MapFlag, MapRequest, ProbeRequest, Status, UnmapRequest, pack_tail

RW = int(MapFlag.READ | MapFlag.WRITE)
MiB = 1 << 20
OK = pack_tail(Status.OK)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory() as m:
        m.add_region(0, 16 * MiB)
        yield m


def attached(memory: GuestMemory, **kw: object) -> Relay:
    r = Relay(memory, bypass=False, **kw)  # type: ignore[arg-type]
    r.add_endpoint(1)
    assert r.handle_request(AttachRequest(1, 1).pack(), 4) == OK
    return r


def test_the_facade_binds_the_native_door(memory: GuestMemory) -> None:
    r = attached(memory)
    assert type(r.handle_request).__name__ == "builtin_function_or_method"
    assert r.handle_request(MapRequest(1, 0x1000, 0x1FFF, 0, RW).pack(), 4) == OK
    assert r.mappings(1) == [Mapping(0x1000, 0x1FFF, 0, RW)]
    assert r.handle_request(UnmapRequest(1, 0x1000, 0x1FFF).pack(), 4) == OK
    assert r.mapping_count(1) == 0


def test_a_subclass_override_still_wins(memory: GuestMemory) -> None:
    seen: list[bytes] = []

    class Mine(Relay):
        def handle_request(self, readable: bytes | bytearray | memoryview, writable_len: int) -> bytes:
            seen.append(bytes(readable))
            return super().handle_request(readable, writable_len)

    r = Mine(memory)
    r.add_endpoint(1)
    assert r.handle_request(AttachRequest(1, 1).pack(), 4) == OK
    assert seen == [AttachRequest(1, 1).pack()]


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, lambda b: type("B", (bytes,), {})(b)])
def test_every_readable_type_gets_the_same_answers(memory: GuestMemory, wrap: object) -> None:
    r = attached(memory)
    conv = wrap  # type: ignore[assignment]
    assert r.handle_request(conv(MapRequest(1, 0x1000, 0x1FFF, 0, RW).pack()), 4) == OK  # type: ignore[operator]
    assert r.handle_request(conv(MapRequest(1, 0x1000, 0x1FFF, 0, RW).pack()), 4) == pack_tail(Status.INVAL)  # type: ignore[operator]
    assert r.handle_request(conv(UnmapRequest(1, 0x1000, 0x1FFF).pack()), 4) == OK  # type: ignore[operator]


def test_keywords_and_odd_lengths_take_the_python_method(memory: GuestMemory) -> None:
    r = attached(memory)
    m = MapRequest(1, 0x1000, 0x1FFF, 0, RW).pack()
    assert r.handle_request(readable=m, writable_len=4) == OK
    assert r.handle_request(UnmapRequest(1, 0x1000, 0x1FFF).pack(), writable_len=4) == OK
    assert r.handle_request(m, True) == r._requests.handle_request(m, True)  # a bool is not an exact int
    assert r.mapping_count(1) == 0
    # A writable part too long for a tail reply, or of another size, is the full path's.
    assert r.handle_request(m, 8) == bytes(4) + pack_tail(Status.INVAL)
    assert r.handle_request(m, 1 << 70) == r._requests.handle_request(m, 1 << 70)
    assert r.handle_request(m, -1) == r._requests.handle_request(m, -1)
    with pytest.raises(TypeError):
        r.handle_request(m)  # type: ignore[call-arg]


def test_control_plane_requests_go_through_the_door(memory: GuestMemory) -> None:
    r = attached(memory)
    probe = ProbeRequest(1).pack()
    assert r.handle_request(probe, 4 + r.config().probe_size) == r._requests.handle_request(probe, 4 + r.config().probe_size)
    assert r.handle_request(b"\x99" + bytes(7), 4) == b""


def test_new_guest_ram_is_seen_before_the_next_map(memory: GuestMemory) -> None:
    r = attached(memory)
    far = MapRequest(1, 0x1000, 0x1FFF, 64 * MiB, RW).pack()
    assert r.handle_request(far, 4) == pack_tail(Status.FAULT)
    memory.add_region(64 * MiB, MiB)  # a new generation: the door must not use C's stale copy
    assert r.handle_request(far, 4) == OK


def test_a_custom_backend_domain_is_served_in_python(memory: GuestMemory) -> None:
    class Backend:
        def __init__(self) -> None:
            self.live: list[tuple[int, int]] = []

        def map(self, mapping: Mapping) -> None:
            self.live.append((mapping.start, mapping.end))

        def unmap(self, mappings: Sequence[Mapping]) -> None:
            for m in mappings:
                self.live.remove((m.start, m.end))

    b = Backend()
    r = Relay(memory, bypass=False)
    r.add_endpoint(1, backend=b)
    assert r.handle_request(AttachRequest(1, 1).pack(), 4) == OK
    assert r.handle_request(MapRequest(1, 0x1000, 0x1FFF, 0, RW).pack(), 4) == OK
    assert b.live == [(0x1000, 0x1FFF)]
    assert r.handle_request(UnmapRequest(1, 0x1000, 0x1FFF).pack(), 4) == OK
    assert b.live == []


def test_the_door_releases_the_gil_and_the_lock(memory: GuestMemory) -> None:
    # Another thread holds the relay's lock: the door's C call waits for it
    # without the GIL, so this thread's Python can let it go.
    r = attached(memory)
    started, done = threading.Event(), threading.Event()
    out: list[bytes] = []

    def worker() -> None:
        started.set()
        out.append(r.handle_request(MapRequest(1, 0x1000, 0x1FFF, 0, RW).pack(), 4))
        done.set()

    with r._lock:
        t = threading.Thread(target=worker)
        t.start()
        started.wait()
        assert not done.wait(0.2)  # blocked on the lock, not on the GIL
    t.join(10)
    assert out == [OK]


def test_a_relay_with_its_door_is_collected(memory: GuestMemory) -> None:
    r = attached(memory)
    ref = weakref.ref(r._requests)
    del r
    gc.collect()
    assert ref() is None
