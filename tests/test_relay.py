"""Relay semantics beyond the conformance sequences: config, bypass, faults,
translation, limits, the status table and the backend hooks."""

from __future__ import annotations

import errno
from collections.abc import Iterator, Sequence

import pytest

from hostrelay import GuestMemory, Relay
from hostrelay.dataplane.table import Mapping
from hostrelay.model.wire import (
    TAIL_SIZE,
    AttachFlag,
    AttachRequest,
    DetachRequest,
    Fault,
    FaultFlag,
    FaultReason,
    Feature,
    MapFlag,
    MapRequest,
    ProbeRequest,
    ResvMemType,
    Status,
    UnmapRequest,
    pack_tail,
    parse_properties,
    unpack_resv_mem,
)
from hostrelay.relay import TranslationFault
from hostrelay.dataplane.handle import status_for
from hostrelay.model.status import DeviceFailure, InvalidRequest

U64_MAX = (1 << 64) - 1
R, W, RW = int(MapFlag.READ), int(MapFlag.WRITE), int(MapFlag.READ | MapFlag.WRITE)
MiB = 1 << 20



# Every test runs twice: through handle_request and through the C ring walker.
pytestmark = pytest.mark.usefixtures("transport")

@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory() as m:
        m.add_region(0, 16 * MiB)
        yield m


@pytest.fixture
def relay(memory: GuestMemory) -> Relay:
    r = Relay(memory)
    for ep in (8, 9, 10):
        r.add_endpoint(ep)
    return r


def send(r: Relay, req: AttachRequest | DetachRequest | MapRequest | UnmapRequest) -> Status:
    out = r.handle_request(req.pack(), 4)
    assert len(out) == 4 and out[1:] == b"\0\0\0"
    return Status(out[0])


# --- config and features --------------------------------------------------------------


def test_features(memory: GuestMemory) -> None:
    f = Relay(memory).device_features
    for bit in (Feature.VERSION_1, Feature.MAP_UNMAP, Feature.PROBE, Feature.BYPASS_CONFIG,
                Feature.INPUT_RANGE, Feature.DOMAIN_RANGE, Feature.MMIO):
        assert f & bit
    assert not f & Feature.BYPASS  # D-02
    g = Relay(memory, mmio=False, probe=False).device_features
    assert not g & Feature.MMIO and not g & Feature.PROBE


def test_config_reflects_options(memory: GuestMemory) -> None:
    r = Relay(memory, page_size_mask=0x201000, input_range=(0x1000, (1 << 39) - 1),
              domain_range=(1, 100), probe_size=256, bypass=False)
    c = r.config()
    assert (c.page_size_mask, c.input_start, c.input_end) == (0x201000, 0x1000, (1 << 39) - 1)
    assert (c.domain_start, c.domain_end, c.probe_size, c.bypass) == (1, 100, 256, 0)
    assert r.config_bytes() == c.pack()
    with pytest.raises(ValueError):
        Relay(memory, page_size_mask=0)  # D-03


def test_write_config_only_bypass_and_only_0_or_1(relay: Relay) -> None:
    before = relay.config_bytes()
    relay.write_config(0, b"\xff" * 8)  # page_size_mask is read-only
    assert relay.config_bytes() == before
    relay.write_config(36, b"\x00")
    assert relay.config_bytes()[36] == 0 and not relay.bypass
    relay.write_config(36, b"\x02")  # D-05: never present 2
    assert relay.config_bytes()[36] == 0
    relay.write_config(32, b"\0\0\0\0\x01\0\0\0")  # wider write covering bypass
    assert relay.config_bytes()[36] == 1
    assert relay.config_bytes()[32:36] == before[32:36]


def test_bypass_write_needs_negotiated_feature(relay: Relay) -> None:
    relay.ack_features(Feature.VERSION_1 | Feature.MAP_UNMAP)
    relay.write_config(36, b"\x00")
    assert relay.bypass
    relay.ack_features(relay.device_features)
    relay.write_config(36, b"\x00")
    assert not relay.bypass


def test_bypass_survives_device_reset_not_system_reset(relay: Relay) -> None:
    relay.write_config(36, b"\x00")
    assert send(relay, AttachRequest(1, 8)) == Status.OK
    assert send(relay, MapRequest(1, 0, 0xFFF, 0, R)) == Status.OK
    relay.reset()
    assert relay.domain_ids() == [] and relay.endpoint_domain(8) is None  # D-06
    assert not relay.bypass  # D-04
    relay.system_reset()
    assert relay.bypass


# --- ATTACH / DETACH ----------------------------------------------------------------


def test_move_keeps_old_domain_if_others_remain(relay: Relay) -> None:
    assert send(relay, AttachRequest(1, 8)) == Status.OK
    assert send(relay, AttachRequest(1, 9)) == Status.OK
    assert send(relay, MapRequest(1, 0, 0xFFF, 0x1000, R)) == Status.OK
    assert send(relay, AttachRequest(2, 8)) == Status.OK
    assert relay.domain_endpoints(1) == [9]
    assert relay.domain_endpoints(2) == [8]
    assert len(relay.mappings(1)) == 1 and relay.mappings(2) == []
    # endpoint 8 no longer reaches domain 1's mapping (D-22)
    with pytest.raises(TranslationFault):
        relay.translate(8, 0, 4, write=False)
    assert relay.translate(9, 0x10, 4, write=False) == 0x1010


def test_reattach_same_domain_keeps_mappings(relay: Relay) -> None:
    assert send(relay, AttachRequest(1, 8)) == Status.OK
    assert send(relay, MapRequest(1, 0, 0xFFF, 0x1000, R)) == Status.OK
    assert send(relay, AttachRequest(1, 8)) == Status.OK
    assert len(relay.mappings(1)) == 1


def test_detach_never_attached_endpoint_is_inval(relay: Relay) -> None:
    assert send(relay, DetachRequest(1, 8)) == Status.INVAL
    assert send(relay, DetachRequest(1, 77)) == Status.NOENT


def test_detach_ignores_reserved(relay: Relay) -> None:
    assert send(relay, AttachRequest(1, 8)) == Status.OK
    assert send(relay, DetachRequest(1, 8, b"\xff" * 8)) == Status.OK  # D-19


def test_domain_range_is_enforced(memory: GuestMemory) -> None:
    r = Relay(memory, domain_range=(1, 10))
    r.add_endpoint(8)
    assert send(r, AttachRequest(0, 8)) == Status.RANGE
    assert send(r, AttachRequest(11, 8)) == Status.RANGE
    assert send(r, AttachRequest(10, 8)) == Status.OK
    assert send(r, MapRequest(11, 0, 0xFFF, 0, R)) == Status.RANGE
    assert send(r, UnmapRequest(0, 0, 0xFFF)) == Status.RANGE


def test_domain_limit_is_nomem(memory: GuestMemory) -> None:
    r = Relay(memory, max_domains=1)
    r.add_endpoint(8)
    r.add_endpoint(9)
    assert send(r, AttachRequest(1, 8)) == Status.OK
    assert send(r, AttachRequest(2, 9)) == Status.NOMEM
    assert send(r, AttachRequest(2, 8)) == Status.OK  # moving frees domain 1 first
    assert r.domain_ids() == [2]


def test_attach_incompatible_reserved_region_is_unsupp(memory: GuestMemory) -> None:
    r = Relay(memory)
    r.add_endpoint(8)
    r.add_endpoint(9, reserved=[(0x10000, 0x1FFFF)])
    assert send(r, AttachRequest(1, 8)) == Status.OK
    assert send(r, MapRequest(1, 0x10000, 0x10FFF, 0, R)) == Status.OK
    assert send(r, AttachRequest(1, 9)) == Status.UNSUPP  # D-17
    assert r.endpoint_domain(9) is None
    assert send(r, UnmapRequest(1, 0x10000, 0x10FFF)) == Status.OK
    assert send(r, AttachRequest(1, 9)) == Status.OK
    # Now the domain refuses MAPs into 9's reserved region (D-44).
    assert send(r, MapRequest(1, 0x10000, 0x10FFF, 0, R)) == Status.INVAL


# --- MAP / UNMAP details ------------------------------------------------------------


def test_map_checks(relay: Relay) -> None:
    assert send(relay, AttachRequest(1, 8)) == Status.OK
    assert send(relay, MapRequest(1, 0, 0xFFF, 0, 0x8)) == Status.INVAL  # D-25
    assert send(relay, MapRequest(1, 0x1000, 0xFFF, 0, R)) == Status.INVAL  # inverted
    assert send(relay, MapRequest(1, 0, 0xFFF, 32 * MiB, R)) == Status.FAULT  # not guest RAM
    assert send(relay, MapRequest(1, 0, 0x1FFF, 16 * MiB - 0x1000, R)) == Status.FAULT  # runs off
    assert send(relay, MapRequest(1, 0, 0xFFF, (1 << 64) - 0x2000, R)) == Status.FAULT
    assert send(relay, MapRequest(1, 0, 0x1FFF, (1 << 64) - 0x1000, R)) == Status.RANGE  # phys wraps
    assert send(relay, MapRequest(1, 0, 0xFFF, 32 * MiB, R | MapFlag.MMIO)) == Status.OK
    assert relay.mappings(1) == [Mapping(0, 0xFFF, 32 * MiB, R | MapFlag.MMIO)]


def test_mmio_flag_unknown_without_feature(memory: GuestMemory) -> None:
    r = Relay(memory, mmio=False)
    r.add_endpoint(8)
    assert send(r, AttachRequest(1, 8)) == Status.OK
    assert send(r, MapRequest(1, 0, 0xFFF, 0, R | MapFlag.MMIO)) == Status.INVAL


def test_input_range_is_enforced_for_map(memory: GuestMemory) -> None:
    r = Relay(memory, input_range=(0x1000, (1 << 39) - 1))
    r.add_endpoint(8)
    assert send(r, AttachRequest(1, 8)) == Status.OK
    assert send(r, MapRequest(1, 0, 0xFFF, 0, R)) == Status.RANGE
    assert send(r, MapRequest(1, 1 << 39, (1 << 39) + 0xFFF, 0, R)) == Status.RANGE
    assert send(r, MapRequest(1, 0x1000, 0x1FFF, 0, R)) == Status.OK
    # UNMAP may spill outside input_range: holes are fine (D-33).
    assert send(r, UnmapRequest(1, 0, U64_MAX)) == Status.OK


def test_byte_granule_allows_single_byte_map(memory: GuestMemory) -> None:
    r = Relay(memory, page_size_mask=1)
    r.add_endpoint(8)
    assert send(r, AttachRequest(1, 8)) == Status.OK
    assert send(r, MapRequest(1, 7, 7, 0x100, R)) == Status.OK
    assert relay_translate(r, 8, 7) == 0x100


def relay_translate(r: Relay, ep: int, iova: int) -> int:
    return r.translate(ep, iova, 1, write=False)


def test_unmap_reserved_nonzero_is_inval_and_keeps_mappings(relay: Relay) -> None:
    assert send(relay, AttachRequest(1, 8)) == Status.OK
    assert send(relay, MapRequest(1, 0, 0xFFF, 0, R)) == Status.OK
    assert send(relay, UnmapRequest(1, 0, 0xFFF, b"\0\0\0\1")) == Status.INVAL  # D-29
    assert len(relay.mappings(1)) == 1


def test_mapping_limit_is_nomem(memory: GuestMemory) -> None:
    r = Relay(memory, max_mappings=2)
    r.add_endpoint(8)
    assert send(r, AttachRequest(1, 8)) == Status.OK
    assert send(r, MapRequest(1, 0, 0xFFF, 0, R)) == Status.OK
    assert send(r, MapRequest(1, 0x1000, 0x1FFF, 0, R)) == Status.OK
    assert send(r, MapRequest(1, 0x2000, 0x2FFF, 0, R)) == Status.NOMEM
    assert r.mapping_count(1) == 2


# --- framing ----------------------------------------------------------------------


def test_inconsistent_buffers_are_inval(relay: Relay) -> None:
    raw = AttachRequest(1, 8).pack()
    out = relay.handle_request(raw + b"\0", 4)
    assert out == bytes([Status.INVAL, 0, 0, 0])
    out = relay.handle_request(raw, 8)  # tail is the last 4 writable bytes
    assert out == bytes(4) + bytes([Status.INVAL, 0, 0, 0])
    assert relay.domain_ids() == []


def test_probe_reply_and_noent(memory: GuestMemory) -> None:
    r = Relay(memory, probe_size=80, reserved_regions=[(0x100000, 0x1FFFFF)])
    r.add_endpoint(8, reserved=[(0x0, 0xFFF)])
    out = r.handle_request(ProbeRequest(8).pack(), 84)
    assert len(out) == 84 and out[-4:] == b"\0\0\0\0"
    assert out[72:80] == bytes(8)  # zero fill after three properties (D-40)
    props = [unpack_resv_mem(p) for p in parse_properties(out[:-4])]
    assert [(p.subtype, p.start, p.end) for p in props] == [
        (ResvMemType.MSI, 0xFEE00000, 0xFEEFFFFF),
        (ResvMemType.RESERVED, 0x100000, 0x1FFFFF),
        (ResvMemType.RESERVED, 0x0, 0xFFF),
    ]
    out = r.handle_request(ProbeRequest(99).pack(), 84)
    assert out == bytes(80) + bytes([Status.NOENT, 0, 0, 0])  # D-35
    assert r.handle_request(ProbeRequest(8).pack() + b"\0", 84)[-4] == Status.INVAL
    big = r.handle_request(ProbeRequest(8).pack(), 88)
    assert big == bytes(84) + bytes([Status.INVAL, 0, 0, 0])


def test_reserved_region_configuration_is_validated(memory: GuestMemory) -> None:
    with pytest.raises(ValueError):  # overlaps the MSI window (D-43)
        Relay(memory, reserved_regions=[(0xFEF00000 - 1, 0xFEF00000)])
    with pytest.raises(ValueError):  # does not fit probe_size
        Relay(memory, probe_size=24, reserved_regions=[(0, 0xFFF)])
    r = Relay(memory)
    with pytest.raises(ValueError):
        r.add_endpoint(1, reserved=[(0xFEE00000, 0xFEE00FFF)])
    r.add_endpoint(1)
    with pytest.raises(ValueError):
        r.add_endpoint(1)


# --- translation and faults ---------------------------------------------------------


def test_translate_bypass_and_domain_fault(relay: Relay) -> None:
    assert relay.translate(8, 0x1234, 8, write=True) == 0x1234  # unattached, bypass=1
    relay.write_config(36, b"\0")
    with pytest.raises(TranslationFault) as e:
        relay.translate(8, 0x1234, 8, write=True)
    assert e.value.reason == FaultReason.DOMAIN
    (rec,) = relay.pop_events()
    assert len(rec) == 24
    assert Fault.unpack(rec) == Fault(FaultReason.DOMAIN, FaultFlag.WRITE | FaultFlag.ADDRESS, 8, 0x1234)
    assert relay.pop_events() == []
    assert send(relay, AttachRequest(5, 8, AttachFlag.BYPASS)) == Status.OK
    assert relay.translate(8, 0x1234, 8, write=True) == 0x1234  # bypass domain


def test_translate_permissions_and_faults(relay: Relay) -> None:
    assert send(relay, AttachRequest(1, 8)) == Status.OK
    assert send(relay, MapRequest(1, 0x1000, 0x1FFF, 0x4000, R)) == Status.OK
    assert send(relay, MapRequest(1, 0x2000, 0x2FFF, 0x5000, W)) == Status.OK
    assert relay.translate(8, 0x1100, 0x10, write=False) == 0x4100
    with pytest.raises(TranslationFault):
        relay.translate(8, 0x1100, 0x10, write=True)  # D-28: no F_WRITE
    with pytest.raises(TranslationFault):
        relay.translate(8, 0x2100, 0x10, write=False)  # write-only refuses reads
    with pytest.raises(TranslationFault):
        relay.translate(8, 0x1F00, 0x200, write=False)  # second mapping lacks READ
    assert relay.translate(8, 0x2100, 0x10, write=True) == 0x5100
    records = [Fault.unpack(b) for b in relay.pop_events()]
    assert records == [
        Fault(FaultReason.MAPPING, FaultFlag.WRITE | FaultFlag.ADDRESS, 8, 0x1100),
        Fault(FaultReason.MAPPING, FaultFlag.READ | FaultFlag.ADDRESS, 8, 0x2100),
        Fault(FaultReason.MAPPING, FaultFlag.READ | FaultFlag.ADDRESS, 8, 0x2000),
    ]


def test_translate_msi_window_is_identity(relay: Relay) -> None:
    assert send(relay, AttachRequest(1, 8)) == Status.OK
    assert relay.translate(8, 0xFEE00004, 4, write=True) == 0xFEE00004
    with pytest.raises(TranslationFault):
        relay.translate(8, 0xFEDFFFFC, 8, write=True)  # only partly in the window


def test_event_queue_drops_when_full(memory: GuestMemory) -> None:
    r = Relay(memory, bypass=False, event_limit=3)
    r.add_endpoint(8)
    for i in range(5):
        with pytest.raises(TranslationFault):
            r.translate(8, i, 1, write=False)
    assert [Fault.unpack(b).address for b in r.pop_events()] == [0, 1, 2]
    assert r.dropped_events == 2


def test_translate_rejects_bad_arguments(relay: Relay) -> None:
    with pytest.raises(ValueError):
        relay.translate(8, 0, 0, write=False)
    with pytest.raises(ValueError):
        relay.translate(8, U64_MAX, 2, write=False)
    with pytest.raises(ValueError):
        relay.translate(1234, 0, 1, write=False)


# --- the status table -----------------------------------------------------------


def test_status_table() -> None:
    assert status_for(InvalidRequest()) == Status.INVAL
    assert status_for(DeviceFailure()) == Status.DEVERR
    assert status_for(OSError(errno.ENOSPC, "x")) == Status.NOMEM
    assert status_for(OSError(errno.EEXIST, "x")) == Status.INVAL
    assert status_for(OSError(errno.EIO, "x")) == Status.DEVERR
    assert status_for(MemoryError()) == Status.NOMEM
    assert status_for(RuntimeError()) == Status.DEVERR


def test_internal_error_becomes_deverr(relay: Relay, monkeypatch: pytest.MonkeyPatch, transport: str) -> None:
    def boom(req: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setitem(relay._requests.control.handlers, 1, boom)
    assert send(relay, AttachRequest(1, 8)) == Status.DEVERR
    if transport == "ring":
        return  # the rest is handle_request's own reply to a failure of its own
    # The reply still fills the writable part (zeros, then the tail), and a
    # writable length that is no length at all gets used length 0.
    def broken_handle(readable: bytes, writable_len: int) -> bytes:
        raise RuntimeError("bug")

    monkeypatch.setattr(relay._requests.control, "handle", broken_handle)
    assert relay.handle_request(AttachRequest(1, 8).pack(), 12) == bytes(8) + pack_tail(Status.DEVERR)
    assert relay.handle_request(AttachRequest(1, 8).pack(), "4") == b""  # type: ignore[arg-type]


# --- backend hooks (where VFIO plugs in) -----------------------------------


class FakeBackend:
    def __init__(self, fail_map_at: int | None = None, fail_unmap: bool = False) -> None:
        self.live: set[tuple[int, int]] = set()
        self.calls: list[tuple[str, tuple[tuple[int, int], ...]]] = []
        self.fail_map_at = fail_map_at
        self.fail_unmap = fail_unmap

    def map(self, mapping: Mapping) -> None:
        if self.fail_map_at is not None and mapping.start == self.fail_map_at:
            raise OSError(errno.ENOSPC, "dma_entry_limit")
        key = (mapping.start, mapping.end)
        assert key not in self.live
        self.live.add(key)
        self.calls.append(("map", (key,)))

    def unmap(self, mappings: Sequence[Mapping]) -> None:
        if self.fail_unmap:
            raise OSError(errno.EIO, "unmap")
        keys = tuple((m.start, m.end) for m in mappings)
        for k in keys:
            self.live.remove(k)
        self.calls.append(("unmap", keys))


def test_backend_sees_map_unmap_attach_detach(memory: GuestMemory) -> None:
    r = Relay(memory)
    shared = FakeBackend()
    r.add_endpoint(1, backend=shared)
    r.add_endpoint(2, backend=shared)  # same group: one backend
    other = FakeBackend()
    r.add_endpoint(3, backend=other)
    assert send(r, AttachRequest(1, 1)) == Status.OK
    assert send(r, MapRequest(1, 0, 0xFFF, 0, R)) == Status.OK
    assert send(r, AttachRequest(1, 2)) == Status.OK
    assert shared.calls == [("map", ((0, 0xFFF),))], "a shared backend is not replayed twice"
    assert send(r, AttachRequest(1, 3)) == Status.OK
    assert other.live == {(0, 0xFFF)}, "ATTACH replays the domain into a new backend"
    assert send(r, MapRequest(1, 0x1000, 0x1FFF, 0, R)) == Status.OK
    assert shared.live == other.live == {(0, 0xFFF), (0x1000, 0x1FFF)}
    assert send(r, UnmapRequest(1, 0, 0x1FFF)) == Status.OK
    assert shared.live == other.live == set()
    assert send(r, MapRequest(1, 0x4000, 0x4FFF, 0, R)) == Status.OK
    assert send(r, DetachRequest(1, 3)) == Status.OK
    assert other.live == set(), "DETACH removes the domain's mappings (D-22)"
    assert send(r, DetachRequest(1, 1)) == Status.OK
    assert shared.live == {(0x4000, 0x4FFF)}, "endpoint 2 still uses the shared backend"


def test_backend_failure_rolls_back_map(memory: GuestMemory) -> None:
    r = Relay(memory)
    good, bad = FakeBackend(), FakeBackend(fail_map_at=0x1000)
    r.add_endpoint(1, backend=good)
    r.add_endpoint(2, backend=bad)
    assert send(r, AttachRequest(1, 1)) == Status.OK
    assert send(r, AttachRequest(1, 2)) == Status.OK
    assert send(r, MapRequest(1, 0x1000, 0x1FFF, 0, R)) == Status.NOMEM  # ENOSPC
    assert good.live == set() and bad.live == set()
    assert r.mappings(1) == []


def test_backend_unmap_failure_keeps_table(memory: GuestMemory) -> None:
    r = Relay(memory)
    b = FakeBackend()
    r.add_endpoint(1, backend=b)
    assert send(r, AttachRequest(1, 1)) == Status.OK
    assert send(r, MapRequest(1, 0, 0xFFF, 0, R)) == Status.OK
    b.fail_unmap = True
    assert send(r, UnmapRequest(1, 0, 0xFFF)) == Status.DEVERR
    assert len(r.mappings(1)) == 1, "table and backend still agree"
    assert send(r, UnmapRequest(1, 0, 0x7FF)) == Status.RANGE  # straddle found before the backend


def test_backend_replay_failure_leaves_endpoint_detached(memory: GuestMemory) -> None:
    r = Relay(memory)
    r.add_endpoint(1)
    bad = FakeBackend(fail_map_at=0x2000)
    r.add_endpoint(2, backend=bad)
    assert send(r, AttachRequest(1, 1)) == Status.OK
    assert send(r, MapRequest(1, 0x1000, 0x1FFF, 0, R)) == Status.OK
    assert send(r, MapRequest(1, 0x2000, 0x2FFF, 0, R)) == Status.OK
    assert send(r, AttachRequest(1, 2)) == Status.NOMEM
    assert bad.live == set(), "the partial replay was undone"
    assert r.endpoint_domain(2) is None
    assert r.domain_endpoints(1) == [1]


# --- the facade keeps its old contract --------------------------------------------------


def test_a_subclass_override_of_the_hot_doors_is_honoured(memory: GuestMemory) -> None:
    # The facade's methods are the API: a subclass (or a test patching the
    # class, as the ring transport does) that overrides them is what runs.
    class Counting(Relay):
        seen = 0

        def handle_request(self, readable: bytes | bytearray | memoryview, writable_len: int) -> bytes:
            Counting.seen += 1
            return super().handle_request(readable, writable_len)

    class Stopped(Relay):
        def process_queue(self, index: int = 0) -> int:
            return -1

    r = Counting(memory)
    r.add_endpoint(1)
    assert r.handle_request(AttachRequest(1, 1).pack(), TAIL_SIZE) == pack_tail(Status.OK)
    assert Counting.seen == 1
    assert Stopped(memory).process_queue(0) == -1


def test_dropped_events_can_be_reset_by_the_vmm(memory: GuestMemory) -> None:
    r = Relay(memory, bypass=False, event_limit=1)
    r.add_endpoint(8)
    for i in range(3):
        with pytest.raises(TranslationFault):
            r.translate(8, i, 1, write=False)
    assert r.dropped_events == 2
    r.dropped_events = 0
    with pytest.raises(TranslationFault):
        r.translate(8, 9, 1, write=False)
    assert r.dropped_events == 1


def test_a_bypass_write_leaves_a_custom_backend_alone(memory: GuestMemory) -> None:
    # Config bypass drives the identity map of the VFIO containers the relay
    # opened; a VMM's own backend sees its mappings only through ATTACH/DETACH.
    class WithIdentity(FakeBackend):
        def __init__(self) -> None:
            super().__init__()
            self.identity: list[bool] = []

        def set_identity(self, on: bool) -> None:
            self.identity.append(on)

    b = WithIdentity()
    r = Relay(memory)
    r.add_endpoint(1, backend=b)
    r.write_config(36, b"\0")
    r.write_config(36, b"\1")
    assert r.bypass and b.identity == []


def test_the_ring_transport_goes_through_the_ring(relay: Relay, transport: str) -> None:
    # The ring half of every transport-parametrized test patches the class's
    # handle_request; if the facade stopped calling its own method, those
    # tests would quietly test handle_request twice.
    assert send(relay, AttachRequest(1, 8)) == Status.OK
    assert hasattr(relay, "_test_ring") == (transport == "ring")


def test_reserved_regions_from_a_one_shot_iterable_reach_every_endpoint(memory: GuestMemory) -> None:
    # The option is read once: a generator's regions must not be used up
    # before the endpoints get them.
    r = Relay(memory, reserved_regions=(x for x in [(0x10000, 0x1FFFF)]))
    r.add_endpoint(8)
    assert (0x10000, 0x1FFFF) in [(x.start, x.end) for x in r.reserved_regions(8)]
