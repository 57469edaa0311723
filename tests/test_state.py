"""Relay.save_state / restore_state without a kernel: emulated endpoints and a stateful fake backend.

The VFIO side (both backends, the kernel's mappings and the devices' DMA) is
in tests/test_state_vfio.py; this file covers the format, every refusal and
the fuzzing, where thousands of restores must be cheap.
"""

from __future__ import annotations

import errno
import json
import random
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from hostrelay import GuestMemory, Relay
from hostrelay.drivers.virtqueue import DriverQueue
from hostrelay.errors import StateError
from hostrelay.model import state as st
from hostrelay.model.mapping import Mapping
from hostrelay.model.wire import (
    TAIL_SIZE,
    AttachFlag,
    AttachRequest,
    FaultReason,
    MapFlag,
    MapRequest,
    Status,
    UnmapRequest,
)
from state_blobs import mutate, refusals

MIB = 1 << 20
PAGE = 0x1000
RW = int(MapFlag.READ | MapFlag.WRITE)
RAM = 16 * MIB
RING = 12 * MIB  # the driver's request queue lives here
E1, E2, E3 = 0x8, 0x10, 0x18


class FakeBackend:
    """A host address space that remembers what it holds (a stand-in for a kernel)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.live: dict[int, Mapping] = {}
        self.fail_after = fail_after

    def map(self, mapping: Mapping) -> None:
        if self.fail_after is not None and len(self.live) >= self.fail_after:
            raise OSError(errno.ENOSPC, "fake: no DMA entries left")
        assert mapping.start not in self.live
        self.live[mapping.start] = mapping

    def unmap(self, mappings: Sequence[Mapping]) -> None:
        for m in mappings:
            del self.live[m.start]


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory() as m:
        m.add_region(0, 8 * MIB)
        m.add_region(8 * MIB, 8 * MIB)  # a MAP across 8 MiB is two pieces
        yield m


def send(r: Relay, req: AttachRequest | MapRequest | UnmapRequest) -> Status:
    out = r.handle_request(req.pack(), TAIL_SIZE)
    return Status(out[0])


def new_relay(memory: GuestMemory, backend: FakeBackend | None = None, **options: object) -> Relay:
    r = Relay(memory, bypass=False, **options)  # type: ignore[arg-type]
    r.add_endpoint(E1)
    r.add_endpoint(E2)
    r.add_endpoint(E3, backend=backend)
    return r


def build(memory: GuestMemory, backend: FakeBackend | None = None, *, mappings: int = 1000) -> tuple[Relay, DriverQueue]:
    """Two domains, three endpoints, config bypass on, ``mappings`` mappings, a ring with requests in flight."""
    r = new_relay(memory, backend)
    r.ack_features(r.device_features)
    r.write_config(36, b"\1")
    q = DriverQueue(memory, RING, 256, data_size=2 * MIB)
    r.set_queue(0, size=q.size, desc=q.desc, avail=q.avail, used=q.used_ring)
    assert send(r, AttachRequest(1, E1)) == Status.OK
    assert send(r, AttachRequest(1, E2)) == Status.OK
    assert send(r, AttachRequest(2, E3)) == Status.OK
    for i in range(mappings):
        dom = 1 if i % 2 else 2
        iova = 0x1000_0000 + i * 2 * PAGE
        assert send(r, MapRequest(dom, iova, iova + PAGE - 1, (i * PAGE) % (12 * MIB), RW)) == Status.OK
    # One mapping across the two RAM regions, and ring traffic: 3 served, 2 in flight.
    assert send(r, MapRequest(2, 0x4000_0000, 0x4000_0000 + 2 * PAGE - 1, 8 * MIB - PAGE, RW)) == Status.OK
    for i in range(3):
        q.add([MapRequest(1, 0x5000_0000 + i * PAGE, 0x5000_0000 + i * PAGE + PAGE - 1, i * PAGE, RW).pack()], [4])
    assert r.process_queue() == 3
    q.used()
    with pytest.raises(Exception):
        r.translate(E1, 0x7000_0000, 4, write=True)  # a fault record left pending
    return r, q


def post_in_flight(q: DriverQueue) -> list[int]:
    """Two requests the driver made available and the device has not taken."""
    outs = []
    for req in (UnmapRequest(1, 0x5000_0000, 0x5000_0FFF), MapRequest(1, 0x6000_0000, 0x6000_0FFF, 0, RW)):
        _, (o,) = q.add([req.pack()], [4])
        outs.append(o)
    return outs


def tables(r: Relay) -> dict[int, list[Mapping]]:
    return {d: r.mappings(d) for d in r.domain_ids()}


def assert_empty(r: Relay, backend: FakeBackend | None = None, *, bypass: bool = False) -> None:
    assert r.domain_ids() == []
    assert r.bypass is bypass
    assert r.pop_events() == [] and r.dropped_events == 0
    with pytest.raises(ValueError):
        r.queue_position(0)
    assert r.endpoint_domain(E1) is None
    if backend is not None:
        assert backend.live == {}, "the backend holds nothing of the state"
    # Still a new relay: a second restore is not refused for having state.
    assert r.config().bypass == int(bypass)


def test_round_trip_two_domains_three_endpoints_1000_mappings_ring_in_flight(memory: GuestMemory) -> None:
    fake = FakeBackend()
    r, q = build(memory, fake)
    outs = post_in_flight(q)
    blob = r.save_state()
    want = tables(r)
    pos = r.queue_position(0)
    assert pos.next_avail == 3 and pos.used == 3
    events = r.pop_events()
    assert len(events) == 1
    r.close()

    fake2 = FakeBackend()
    r2 = new_relay(memory, fake2)
    saved = r2.restore_state(blob)
    assert saved.mapping_count() == 1000 + 1 + 3
    assert tables(r2) == want
    assert r2.domain_endpoints(1) == [E1, E2] and r2.domain_endpoints(2) == [E3]
    assert r2.bypass is True
    assert {m.start: m for m in want[2]} == fake2.live, "the backend holds exactly domain 2's mappings"
    assert r2.queue_position(0) == pos
    assert r2.pop_events() == events, "the pending fault record survives"
    # The emulated endpoints translate through their domain again, and fault elsewhere.
    m = want[1][0]
    assert r2.translate(E2, m.start + 8, 4, write=True) == m.phys + 8
    with pytest.raises(Exception):
        r2.translate(E2, want[2][0].start, 4, write=False)
    # The ring continues with the next request: the two in flight, nothing replayed.
    assert r2.process_queue() == 2
    assert [Status(memory.read(o, 1)[0]) for o in outs] == [Status.OK, Status.OK]
    assert [x.start for x in r2.mappings(1) if x.start >= 0x5000_0000] == [0x5000_1000, 0x5000_2000, 0x6000_0000]
    assert r2.queue_position(0).next_avail == 5
    # Config, features and bypass as the driver saw them.
    assert r2.config_bytes() == r.config_bytes()
    with pytest.raises(StateError, match="already has state"):
        r2.restore_state(blob)


def test_saved_state_is_self_describing(memory: GuestMemory) -> None:
    r, _ = build(memory, mappings=10)
    blob = r.save_state()
    header, body = st.header_of(blob)
    assert header["version"] == st.FORMAT_VERSION and header["format"] == st.FORMAT_NAME
    assert header["config"]["bypass"] is True
    t = header["tables"]["mappings"]
    recs = list(struct.iter_unpack(t["record"], body[t["offset"]:t["offset"] + t["count"] * struct.calcsize(t["record"])]))
    assert len(recs) == 10 + 1 + 3
    assert dict(zip(t["fields"], recs[0]))["virt_start"] in {m.start for m in r.mappings(1) + r.mappings(2)}
    assert st.decode(blob) == st.decode(r.save_state()), "saving twice gives the same state"


def test_every_refusal_leaves_the_relay_empty(memory: GuestMemory) -> None:
    fake = FakeBackend()
    r, q = build(memory, fake, mappings=40)
    post_in_flight(q)
    blob = r.save_state()
    seen = set()
    for name, bad, why in refusals(blob):
        fake2 = FakeBackend()
        r2 = new_relay(memory, fake2)
        with pytest.raises(StateError, match=why):
            r2.restore_state(bad)
        assert_empty(r2, fake2)
        r2.restore_state(blob)  # ...and it is still a new relay that takes the good state
        assert fake2.live, name
        seen.add(name)
    assert len(seen) == 10


def test_restoring_onto_a_relay_with_state_is_refused_and_changes_nothing(memory: GuestMemory) -> None:
    r, _ = build(memory, mappings=4)
    blob = r.save_state()
    r2 = new_relay(memory)
    assert send(r2, AttachRequest(5, E1)) == Status.OK
    assert send(r2, MapRequest(5, 0, PAGE - 1, 0, RW)) == Status.OK
    with pytest.raises(StateError, match="already has state"):
        r2.restore_state(blob)
    assert r2.domain_ids() == [5] and len(r2.mappings(5)) == 1 and r2.bypass is False
    r3 = new_relay(memory)
    r3.ack_features(r3.device_features)
    with pytest.raises(StateError, match="acknowledged features"):
        r3.restore_state(blob)


def test_a_failure_half_way_is_undone(memory: GuestMemory) -> None:
    """The backend refuses the 11th mapping: every earlier step is undone."""
    r, _ = build(memory, FakeBackend(), mappings=40)
    blob = r.save_state()
    fake = FakeBackend(fail_after=10)
    r2 = new_relay(memory, fake)
    with pytest.raises(StateError, match="undone|refused"):
        r2.restore_state(blob)
    assert_empty(r2, fake)
    # A limit the new relay has and the old did not: refused the same way.
    r3 = new_relay(memory, FakeBackend(), max_mappings=5)
    with pytest.raises(StateError, match="NOMEM"):
        r3.restore_state(blob)
    assert_empty(r3)


def test_queue_used_index_must_match_guest_memory(memory: GuestMemory) -> None:
    r, q = build(memory, mappings=2)
    blob = r.save_state()
    # Guest memory moved on after the save (not the memory the state was saved with).
    memory.write(q.used_ring + 2, struct.pack("<H", 9))
    r2 = new_relay(memory)
    with pytest.raises(StateError, match="used index"):
        r2.restore_state(blob)
    assert_empty(r2)


def test_bypass_domain_and_unattached_bypass(memory: GuestMemory) -> None:
    r = new_relay(memory)
    r.write_config(36, b"\1")
    assert send(r, AttachRequest(4, E1, AttachFlag.BYPASS)) == Status.OK
    blob = r.save_state()
    r2 = new_relay(memory)
    r2.restore_state(blob)
    assert r2.domain_is_bypass(4) and r2.domain_endpoints(4) == [E1]
    assert r2.translate(E1, 0x1234, 4, write=True) == 0x1234, "bypass domain: identity"
    assert r2.translate(E2, 0x2000, 4, write=True) == 0x2000, "unattached with config bypass on: identity"


def test_fuzzed_blobs_never_crash_and_never_map_anything_invalid(memory: GuestMemory) -> None:
    r, q = build(memory, FakeBackend(), mappings=16)
    post_in_flight(q)
    blob = r.save_state()
    rng = random.Random(16)
    counts = {"refused": 0, "restored": 0}
    r2, fake = new_relay(memory, FakeBackend()), None
    for n in range(10_000):
        bad = mutate(blob, rng)
        if fake is None:
            fake = FakeBackend()
            r2 = new_relay(memory, fake)
        try:
            state = r2.restore_state(bad)
        except StateError:
            counts["refused"] += 1
            assert r2.domain_ids() == [] and fake.live == {}, f"blob {n}: a refusal left state behind"
            continue
        counts["restored"] += 1
        # Accepted: it is a valid state, and exactly it is what the relay holds.
        got = {d: r2.mappings(d) for d in r2.domain_ids()}
        assert got == {d.id: list(d.mappings) for d in state.domains}, f"blob {n}"
        for maps in got.values():
            for m in maps:
                assert m.flags & MapFlag.MMIO or memory.contains(m.phys, m.size), f"blob {n}: {m} is not guest RAM"
        e3 = [d for d in state.domains if E3 in d.endpoints]
        assert fake.live == ({m.start: m for m in e3[0].mappings} if e3 else {}), f"blob {n}: the backend differs"
        r2.close()
        fake = None
    print(counts)
    assert counts["refused"] > 5000 and counts["restored"] > 50, counts


def test_fault_records_and_dropped_count_survive(memory: GuestMemory) -> None:
    r = new_relay(memory, event_limit=2)
    for a in range(3):
        with pytest.raises(Exception):
            r.translate(E1, a * PAGE, 4, write=False)
    blob = r.save_state()
    r2 = new_relay(memory, event_limit=2)
    r2.restore_state(blob)
    assert r2.dropped_events == 1
    recs = r2.pop_events()
    assert len(recs) == 2 and recs == r.pop_events()
    assert recs[0][0] == FaultReason.DOMAIN


def test_a_host_with_more_page_sizes_presents_the_saved_config(memory: GuestMemory) -> None:
    """type1 -> iommufd: the new host maps any multiple of 4 KiB; the driver keeps the sizes it was shown."""
    shown = 0x1000 | 0x200000 | 0x40000000
    r = Relay(memory, bypass=False, page_size_mask=shown, input_range=(0, (1 << 39) - 1))
    r.add_endpoint(E1)
    assert send(r, AttachRequest(1, E1)) == Status.OK
    assert send(r, MapRequest(1, 0x200000, 0x3FFFFF, 0, RW)) == Status.OK
    blob = r.save_state()
    r2 = Relay(memory, bypass=False, page_size_mask=~0xFFF & ((1 << 64) - 1))
    r2.add_endpoint(E1)
    r2.restore_state(blob)
    assert r2.page_size_mask == shown and r2.config_bytes() == r.config_bytes()
    assert send(r2, MapRequest(1, (1 << 39), (1 << 39) + 0xFFF, 0, RW)) == Status.RANGE, "the saved input range holds"
    r3 = Relay(memory, bypass=False, page_size_mask=0x1000 | 0x200000)
    r3.add_endpoint(E1)
    with pytest.raises(StateError, match="page_size_mask differs"):
        r3.restore_state(blob)
    assert r3.page_size_mask == 0x1000 | 0x200000, "a refusal leaves the config as it was"


def test_a_mapping_over_a_reserved_region_of_the_new_relay_is_refused(memory: GuestMemory) -> None:
    r = Relay(memory, bypass=False, msi_window=None)
    r.add_endpoint(E1)
    assert send(r, AttachRequest(1, E1)) == Status.OK
    for iova in (0x10000, 0x20000, 0x30000):
        assert send(r, MapRequest(1, iova, iova + PAGE - 1, 0, RW)) == Status.OK
    blob = r.save_state()
    for lo, hi, refused in ((0x21000, 0x2FFFF, False), (0x20FFF, 0x20FFF, True), (0x30000, 0x30000, True),
                            (0, 0x10000, True), (0x31000, 0x31FFF, False)):  # fmt: skip
        r2 = Relay(memory, bypass=False, msi_window=None)
        r2.add_endpoint(E1, reserved=[(lo, hi)])
        if refused:
            with pytest.raises(StateError, match="overlaps a reserved region"):
                r2.restore_state(blob)
            assert r2.domain_ids() == []
        else:
            r2.restore_state(blob)
            assert len(r2.mappings(1)) == 3


def test_the_c_record_check_agrees_with_the_python_one() -> None:
    """hr_state_check (what restore_state uses) and check_records (the codec's own) on 20 000 tables."""
    from hostrelay.dataplane.snapshot import _check_records

    rng = random.Random(7)
    for _ in range(20_000):
        ms = []
        at = rng.choice([0, (1 << 64) - 0x10000])
        for _ in range(rng.randint(0, 6)):
            start = min(at + rng.choice([0, 1, 0x1000, -0x1000]), (1 << 64) - 1) if at else rng.randrange(1 << 20)
            end = min(max(start + rng.choice([0xFFF, -1, 0x1FFF]), 0), (1 << 64) - 1)
            phys = rng.choice([0, 0x1000, (1 << 64) - 0x800])
            flags = rng.choice([1, 3, 4, 7, 8])
            ms.append(Mapping(max(start, 0), end, phys, flags))
            at = end + 1 if end < (1 << 64) - 1 else 0
        raw = bytearray(st.DomainState.pack(ms))
        if raw and rng.random() < 0.1:
            raw[rng.randrange(len(raw) // 32) * 32 + 29] = 1  # padding
        view = memoryview(bytes(raw))
        assert _check_records(view, len(ms)) == st.check_records(view, len(ms)), ms


def test_state_show_checks_a_blob_and_says_what_it_holds(memory: GuestMemory, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from hostrelay.cli import main

    r, _ = build(memory, mappings=6)
    good, bad = tmp_path / "state.bin", tmp_path / "cut.bin"
    blob = r.save_state()
    good.write_bytes(blob)
    bad.write_bytes(blob[:-5])
    out = CliRunner().invoke(main, ["state", "show", str(good)])
    assert out.exit_code == 0, out.output
    assert "valid" in out.output and "domain 1: endpoints 0x8, 0x10; 6 mappings" in out.output
    assert "queue 0: size 256, next avail 3, used 3" in out.output and "1 pending" in out.output
    out = CliRunner().invoke(main, ["state", "show", "--json", str(good)])
    assert out.exit_code == 0 and json.loads(out.output)["tables"]["mappings"]["count"] == 6 + 1 + 3
    out = CliRunner().invoke(main, ["state", "show", str(bad)])
    assert out.exit_code == 1 and "not a valid state: truncated" in out.output
