"""Random and mutated request bytes through ``handle_request``.

Whatever the bytes, the device must answer (never raise, never hit its
internal-error path) with either nothing (used length 0) or exactly
``writable_len`` bytes ending in a tail with zero reserved bytes, and a
rejected request must leave every domain, membership and mapping unchanged.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostrelay import GuestMemory, Relay
from hostrelay.model.wire import (
    AttachRequest,
    DetachRequest,
    MapRequest,
    ProbeRequest,
    Status,
    UnmapRequest,
)

PROBE_SIZE = 64
SEEDS: list[bytes] = [
    AttachRequest(1, 0).pack(),
    AttachRequest(2, 1, 1).pack(),
    DetachRequest(1, 0).pack(),
    MapRequest(1, 0x4000, 0x4FFF, 0x1000, 3).pack(),
    MapRequest(1, 0x1000, 0x1FFF, 0x2000, 1).pack(),
    UnmapRequest(1, 0, 0x1FFF).pack(),
    UnmapRequest(1, 0x1000, 0x2FFF).pack(),
    ProbeRequest(0).pack(),
]

Snapshot = dict[int, tuple[bool, tuple[int, ...], tuple[tuple[int, int, int, int], ...]]]


def snapshot(r: Relay) -> Snapshot:
    return {
        d: (r.domain_is_bypass(d), tuple(r.domain_endpoints(d)), tuple(tuple(m) for m in r.mappings(d)))
        for d in r.domain_ids()
    }


class Harness:
    def __init__(self) -> None:
        self.memory = GuestMemory()
        self.memory.add_region(0, 1 << 20)
        self.relay = Relay(self.memory, probe_size=PROBE_SIZE)
        for ep in (0, 1, 2):
            self.relay.add_endpoint(ep)
        self.errors: list[logging.LogRecord] = []

    def populate(self) -> None:
        r = self.relay
        for req in (AttachRequest(1, 0), AttachRequest(1, 2), AttachRequest(3, 1)):
            assert r.handle_request(req.pack(), 4) == bytes(4)
        for i in range(6):
            m = MapRequest(1, i * 0x2000, i * 0x2000 + 0xFFF, i * 0x1000, 3)
            assert r.handle_request(m.pack(), 4) == bytes(4)

    def check(self, readable: bytes, writable_len: int) -> None:
        before = snapshot(self.relay)
        out = self.relay.handle_request(readable, writable_len)
        assert isinstance(out, bytes)
        if out:
            assert len(out) == writable_len
            assert out[-3:] == b"\0\0\0"
            status = out[-4]
            assert status in set(Status)
            assert status != Status.DEVERR, "no request may reach an internal error"
        if not out or out[-4] != Status.OK:
            assert snapshot(self.relay) == before, "a rejected request changed the state"


@pytest.fixture
def harness(caplog: pytest.LogCaptureFixture) -> Iterator[Harness]:
    h = Harness()
    h.populate()
    with caplog.at_level(logging.WARNING, logger="hostrelay"):
        yield h
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "internal errors were logged"
    h.memory.close()


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(6)
        if choice == 0 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif choice == 1 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif choice == 2:
            del b[rng.randrange(len(b) + 1) :]
        elif choice == 3:
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif choice == 4 and len(b) >= 8:
            # Interesting integers where the address and ID fields are.
            off = rng.randrange(4, len(b) - 3)
            b[off : off + 4] = rng.choice([b"\xff" * 4, b"\0" * 4, b"\x00\xf0\xff\xff"])
        elif b:
            b[0] = rng.randrange(8)  # another (or an unknown) request type
    return bytes(b)


def writable(rng: random.Random, readable: bytes) -> int:
    natural = PROBE_SIZE + 4 if readable[:1] == b"\x05" else 4
    return rng.choice([natural, natural, natural, 0, 3, 5, natural - 1, natural + 4, 1 << 16])


def test_mutated_requests(harness: Harness) -> None:
    rng = random.Random(0x5EED)
    for _ in range(20000):
        raw = mutate(rng, rng.choice(SEEDS))
        harness.check(raw, writable(rng, raw))


def test_random_bytes(harness: Harness) -> None:
    rng = random.Random(0xF022)
    for _ in range(5000):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
        harness.check(raw, rng.randrange(0, 200))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=96),
        st.tuples(st.sampled_from(SEEDS), st.integers(0, 71), st.binary(min_size=1, max_size=8)).map(
            lambda t: (t[0][: t[1] % len(t[0])] + t[2] + t[0][t[1] % len(t[0]) + len(t[2]) :])[: len(t[0]) + 4]
        ),
    ),
    st.integers(0, PROBE_SIZE + 12),
)
def test_hypothesis_bytes(harness: Harness, raw: bytes, writable_len: int) -> None:
    harness.check(raw, writable_len)


def test_non_bytes_input_does_not_escape(harness: Harness) -> None:
    inval = bytes([Status.INVAL, 0, 0, 0])
    assert harness.relay.handle_request(memoryview(SEEDS[3]), 4) == inval  # overlaps a mapping
    assert harness.relay.handle_request(bytearray(b"\x03\0\0\0"), 4) == inval  # body missing
    assert harness.relay.handle_request(bytearray(b"\x03"), 4) == b""  # no whole head
    assert harness.relay.handle_request(b"\x03" + bytes(35), -1) == b""
