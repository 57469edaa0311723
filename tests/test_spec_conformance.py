"""Conformance: the spec's UNMAP examples, QEMU's qtest sequences, strict cases.

- 5.13.6.6 (virtio v1.2+ "UNMAP request"): the seven numbered examples.
- QEMU ``tests/qtest/virtio-iommu-test.c``: ``config``, ``attach_detach`` and
  ``map_unmap``.  Those use 5- and 10-byte mappings, legal
  only with a byte granule, so they run with ``page_size_mask`` bit 0 set.
- strict cases QEMU's device does not check (each is a requirement in
  ``docs/requirements.md``).

Every request goes through ``handle_request`` as bytes, exactly as a driver
would write it: a readable part of ``sizeof(req) - 4`` and a 4-byte tail.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from hostrelay import GuestMemory, Relay
from hostrelay.model.wire import (
    AttachFlag,
    AttachRequest,
    DetachRequest,
    MapFlag,
    MapRequest,
    ProbeRequest,
    ResvMemType,
    Status,
    UnmapRequest,
    parse_properties,
    unpack_resv_mem,
)

U64_MAX = (1 << 64) - 1
R = int(MapFlag.READ)



# Every test runs twice: through handle_request and through the C ring walker.
pytestmark = pytest.mark.usefixtures("transport")

@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory() as m:
        m.add_region(0, 16 << 20)  # covers every phys address used below
        yield m


def send(relay: Relay, req: AttachRequest | DetachRequest | MapRequest | UnmapRequest) -> Status:
    out = relay.handle_request(req.pack(), 4)
    assert len(out) == 4, "the device writes exactly the tail"
    assert out[1:] == b"\0\0\0", "tail.reserved is zero (D-09)"
    return Status(out[0])


def attach(r: Relay, domain: int, ep: int, flags: int = 0) -> Status:
    return send(r, AttachRequest(domain, ep, flags))


def detach(r: Relay, domain: int, ep: int) -> Status:
    return send(r, DetachRequest(domain, ep))


def map_(r: Relay, domain: int, vs: int, ve: int, ps: int, flags: int = R) -> Status:
    return send(r, MapRequest(domain, vs, ve, ps, flags))


def unmap(r: Relay, domain: int, vs: int, ve: int) -> Status:
    return send(r, UnmapRequest(domain, vs, ve))


def ranges(r: Relay, domain: int) -> list[tuple[int, int]]:
    return [(m.start, m.end) for m in r.mappings(domain)]


def byte_relay(memory: GuestMemory) -> Relay:
    relay = Relay(memory, page_size_mask=1)
    relay.add_endpoint(0)
    return relay


# --- 5.13.6.6: the seven UNMAP examples ------------------------------------------

# (mappings to create, unmap range, expected status, mappings left)
SPEC_EXAMPLES = [
    pytest.param([], (0, 4), Status.OK, [], id="1-empty"),
    pytest.param([(0, 9)], (0, 9), Status.OK, [], id="2-exact"),
    pytest.param([(0, 4), (5, 9)], (0, 9), Status.OK, [], id="3-two"),
    pytest.param([(0, 9)], (0, 4), Status.RANGE, [(0, 9)], id="4-split"),
    pytest.param([(0, 4), (5, 9)], (0, 4), Status.OK, [(5, 9)], id="5-first"),
    pytest.param([(0, 4)], (0, 9), Status.OK, [], id="6-spill"),
    pytest.param([(0, 4), (10, 14)], (0, 14), Status.OK, [], id="7-hole"),
]


@pytest.mark.parametrize(("maps", "rng", "status", "left"), SPEC_EXAMPLES)
def test_spec_unmap_examples(
    memory: GuestMemory,
    maps: list[tuple[int, int]],
    rng: tuple[int, int],
    status: Status,
    left: list[tuple[int, int]],
) -> None:
    r = byte_relay(memory)
    assert attach(r, 1, 0) == Status.OK
    for i, (vs, ve) in enumerate(maps):
        assert map_(r, 1, vs, ve, 0x1000 * (i + 1)) == Status.OK
    assert unmap(r, 1, *rng) == status
    assert ranges(r, 1) == left


# --- QEMU qtest -----------------------------------------------------------------------


def test_qtest_config(memory: GuestMemory) -> None:
    r = Relay(memory)
    cfg = r.config_bytes()
    assert len(cfg) == 40
    (input_start,) = struct.unpack_from("<Q", cfg, 8)
    (input_end,) = struct.unpack_from("<Q", cfg, 16)
    domain_start, domain_end = struct.unpack_from("<II", cfg, 24)
    assert input_start == 0
    assert input_end >= 0xFFFFFFFF
    assert domain_start == 0
    assert domain_end == 0xFFFFFFFF
    assert cfg[36] == 1  # boot bypass


def test_qtest_attach_detach(memory: GuestMemory) -> None:
    r = byte_relay(memory)
    assert attach(r, 0, 0) == Status.OK
    assert attach(r, 0, 444) == Status.NOENT  # no such endpoint
    assert detach(r, 0, 1) == Status.NOENT
    assert attach(r, 1, 0) == Status.OK  # implicit move
    assert r.domain_ids() == [1], "domain 0 died with its last endpoint"
    assert detach(r, 0, 0) == Status.INVAL  # wrong domain
    assert detach(r, 1, 0) == Status.OK
    assert attach(r, 1, 0) == Status.OK
    assert map_(r, 1, 0x0, 0xFFF, 0xA1000) == Status.OK
    assert map_(r, 1, 0x2000, 0x2FFF, 0xB1000) == Status.OK
    assert detach(r, 1, 0) == Status.OK
    assert r.domain_ids() == [], "a domain with mappings is destroyed"
    assert r.endpoint_domain(0) is None


def test_qtest_map_unmap(memory: GuestMemory) -> None:
    r = byte_relay(memory)
    assert attach(r, 1, 0) == Status.OK
    assert map_(r, 0, 0, 0xFFF, 0xA1000) == Status.NOENT
    assert map_(r, 1, 0, 0xFFF, 0xA1000) == Status.OK
    assert map_(r, 1, 0, 0xFFFF, 0xB1000) == Status.INVAL  # overlap
    assert unmap(r, 4, 0x10, 0xFFF) == Status.NOENT
    assert unmap(r, 1, 0x10, 0xFFF) == Status.RANGE
    assert ranges(r, 1) == [(0, 0xFFF)]
    assert unmap(r, 1, 0, 0x1000) == Status.OK
    assert ranges(r, 1) == []
    # spec example 1
    assert unmap(r, 1, 0, 4) == Status.OK
    # spec example 2
    assert map_(r, 1, 0, 9, 0xA1000) == Status.OK
    assert unmap(r, 1, 0, 9) == Status.OK
    # spec example 3
    assert map_(r, 1, 0, 4, 0xB1000) == Status.OK
    assert map_(r, 1, 5, 9, 0xB2000) == Status.OK
    assert unmap(r, 1, 0, 9) == Status.OK
    # spec example 4
    assert map_(r, 1, 0, 9, 0xC1000) == Status.OK
    assert unmap(r, 1, 0, 4) == Status.RANGE
    assert unmap(r, 1, 0, 10) == Status.OK
    # spec example 5
    assert map_(r, 1, 0, 4, 0xD1000) == Status.OK
    assert map_(r, 1, 5, 9, 0xD2000) == Status.OK
    assert unmap(r, 1, 0, 4) == Status.OK
    assert unmap(r, 1, 5, 9) == Status.OK
    # spec example 6
    assert map_(r, 1, 0, 4, 0xE2000) == Status.OK
    assert unmap(r, 1, 0, 9) == Status.OK
    # spec example 7
    assert map_(r, 1, 0, 4, 0xF2000) == Status.OK
    assert map_(r, 1, 10, 14, 0xF3000) == Status.OK
    assert unmap(r, 1, 0, 14) == Status.OK
    assert ranges(r, 1) == []
    assert map_(r, 1, 10, 14, 0xF3000) == Status.OK
    assert map_(r, 1, 0, 4, 0xF2000) == Status.OK
    assert unmap(r, 1, 0, 4) == Status.OK
    assert map_(r, 1, 10, 14, 0xF3000) == Status.INVAL  # still mapped
    assert ranges(r, 1) == [(10, 14)]


# --- strict cases QEMU's device does not check ----------------------------------------


@pytest.fixture
def relay(memory: GuestMemory) -> Relay:
    r = Relay(memory)  # 4 KiB granule, MSI window at 0xfee00000
    r.add_endpoint(8)
    r.add_endpoint(9)
    return r


def test_attach_reserved_nonzero_is_inval(relay: Relay) -> None:
    assert send(relay, AttachRequest(1, 8, 0, b"\0\0\x01\0")) == Status.INVAL
    assert relay.domain_ids() == []


def test_attach_unknown_flag_is_inval(relay: Relay) -> None:
    assert attach(relay, 1, 8, 0x2) == Status.INVAL
    assert relay.domain_ids() == []


def test_misaligned_map_is_range(relay: Relay) -> None:
    assert attach(relay, 1, 8) == Status.OK
    assert map_(relay, 1, 0x800, 0x17FF, 0x1000) == Status.RANGE  # virt_start
    assert map_(relay, 1, 0x1000, 0x1FFF, 0x1800) == Status.RANGE  # phys_start
    assert map_(relay, 1, 0x1000, 0x1FFE, 0x1000) == Status.RANGE  # virt_end + 1
    assert relay.mappings(1) == []
    assert map_(relay, 1, 0x1000, 0x1FFF, 0x1000) == Status.OK


def test_map_overlapping_resv_mem_is_inval(relay: Relay) -> None:
    assert attach(relay, 1, 8) == Status.OK
    assert map_(relay, 1, 0xFEE00000, 0xFEE00FFF, 0x1000) == Status.INVAL
    assert map_(relay, 1, 0xFED00000, 0xFEE00FFF, 0x1000) == Status.INVAL  # straddles it
    assert map_(relay, 1, 0xFED00000, 0xFEDFFFFF, 0x0) == Status.OK  # just below


def test_unmap_atomic_range_over_several_mappings(relay: Relay) -> None:
    # QEMU removes a and b before it finds that c is split; the spec says
    # RANGE and nothing removed (D-32).
    assert attach(relay, 1, 8) == Status.OK
    for i in range(3):
        assert map_(relay, 1, i * 0x2000, i * 0x2000 + 0x1FFF, 0x10000) == Status.OK
    before = relay.mappings(1)
    assert unmap(relay, 1, 0, 0x4FFF) == Status.RANGE
    assert relay.mappings(1) == before


def test_unknown_type_has_used_length_zero(relay: Relay) -> None:
    for t in (0, 6, 7, 0xFF):
        assert relay.handle_request(bytes([t]) + b"\0" * 19, 4) == b""


def test_probe_with_small_buffer_is_inval(relay: Relay) -> None:
    probe_size = relay.config().probe_size
    out = relay.handle_request(ProbeRequest(8).pack(), probe_size - 24 + 4)
    assert len(out) == probe_size - 24 + 4
    assert out[-4] == Status.INVAL
    assert out[:-4] == bytes(len(out) - 4), "no property written (D-39)"


def test_probe_reports_msi_window(relay: Relay) -> None:
    probe_size = relay.config().probe_size
    out = relay.handle_request(ProbeRequest(8).pack(), probe_size + 4)
    assert out[-4] == Status.OK
    props = [unpack_resv_mem(p) for p in parse_properties(out[:-4])]
    assert [(p.subtype, p.start, p.end) for p in props] == [
        (ResvMemType.MSI, 0xFEE00000, 0xFEEFFFFF)
    ]


def test_unmap_whole_space_clears_domain(relay: Relay) -> None:
    assert attach(relay, 1, 8) == Status.OK
    assert map_(relay, 1, 0, 0xFFF, 0) == Status.OK
    assert map_(relay, 1, U64_MAX - 0xFFF, U64_MAX, 0x1000) == Status.OK
    assert unmap(relay, 1, 0, U64_MAX) == Status.OK
    assert relay.mappings(1) == []


def test_map_on_bypass_domain_is_inval(relay: Relay) -> None:
    assert attach(relay, 1, 8, AttachFlag.BYPASS) == Status.OK
    assert map_(relay, 1, 0, 0xFFF, 0) == Status.INVAL
    assert unmap(relay, 1, 0, 0xFFF) == Status.INVAL


def test_conflicting_attach_bypass_is_inval_and_keeps_endpoint(relay: Relay) -> None:
    assert attach(relay, 1, 8) == Status.OK
    assert map_(relay, 1, 0, 0xFFF, 0) == Status.OK
    assert attach(relay, 2, 9, AttachFlag.BYPASS) == Status.OK
    assert attach(relay, 1, 9, AttachFlag.BYPASS) == Status.INVAL  # 1 is not bypass
    assert attach(relay, 2, 8) == Status.INVAL  # 2 is bypass
    # Unlike QEMU, the refused ATTACH did not detach anything first.
    assert relay.endpoint_domain(8) == 1
    assert relay.endpoint_domain(9) == 2
    assert len(relay.mappings(1)) == 1


def test_probe_without_feature_has_used_length_zero(memory: GuestMemory) -> None:
    r = Relay(memory, probe=False)
    r.add_endpoint(8)
    assert not r.device_features & (1 << 4)
    assert r.handle_request(ProbeRequest(8).pack(), 4 + 512) == b""


def test_short_request_with_tail_is_inval(relay: Relay) -> None:
    full = MapRequest(1, 0, 0xFFF, 0, R).pack()
    out = relay.handle_request(full[:-1], 4)
    assert out == bytes([Status.INVAL, 0, 0, 0])


def test_request_without_tail_is_not_written(relay: Relay) -> None:
    assert relay.handle_request(AttachRequest(1, 8).pack(), 0) == b""
    assert relay.handle_request(AttachRequest(1, 8).pack(), 3) == b""
    assert relay.domain_ids() == []
