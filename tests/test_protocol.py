"""The sans-IO codec against the byte layouts of virtio 5.13 (§5.13.4 config, §5.13.6 requests, PROBE properties and fault records)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostrelay.model.wire import (
    CONFIG_SIZE,
    FAULT_SIZE,
    AttachRequest,
    Config,
    DetachRequest,
    Fault,
    FaultFlag,
    FaultReason,
    Feature,
    MapFlag,
    MapRequest,
    ProbeRequest,
    ProtocolError,
    ReqType,
    ResvMem,
    ResvMemType,
    Status,
    Tail,
    UnmapRequest,
    decode_request,
    pack_properties,
    pack_tail,
    parse_properties,
    unpack_resv_mem,
)

u32 = st.integers(0, (1 << 32) - 1)
u64 = st.integers(0, (1 << 64) - 1)


def le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


def test_constants_match_spec() -> None:
    assert [int(t) for t in ReqType] == [1, 2, 3, 4, 5]
    assert [s.name for s in sorted(Status)] == [
        "OK", "IOERR", "UNSUPP", "DEVERR", "INVAL", "RANGE", "NOENT", "FAULT", "NOMEM",
    ]
    assert Feature.INPUT_RANGE == 1 and Feature.DOMAIN_RANGE == 2 and Feature.MAP_UNMAP == 4
    assert Feature.BYPASS == 8 and Feature.PROBE == 16 and Feature.MMIO == 32
    assert Feature.BYPASS_CONFIG == 64 and Feature.VERSION_1 == 1 << 32
    assert (MapFlag.READ, MapFlag.WRITE, MapFlag.MMIO) == (1, 2, 4)
    assert (FaultFlag.READ, FaultFlag.WRITE, FaultFlag.ADDRESS) == (1, 2, 0x100)


def test_attach_layout() -> None:
    raw = AttachRequest(domain=0x11223344, endpoint=0x55667788, flags=1).pack()
    assert len(raw) == 20  # 24-byte struct minus the tail
    assert raw[0] == 1 and raw[1:4] == b"\0\0\0"
    assert raw[4:8] == le(0x11223344, 4)
    assert raw[8:12] == le(0x55667788, 4)
    assert raw[12:16] == le(1, 4)
    assert raw[16:20] == b"\0" * 4


def test_detach_layout() -> None:
    raw = DetachRequest(domain=7, endpoint=9).pack()
    assert len(raw) == 20
    assert raw[0] == 2 and raw[4:8] == le(7, 4) and raw[8:12] == le(9, 4)
    assert raw[12:20] == b"\0" * 8


def test_map_layout() -> None:
    raw = MapRequest(3, 0x1000, 0x1FFF, 0xA000, 3).pack()
    assert len(raw) == 36
    assert raw[0] == 3
    assert raw[4:8] == le(3, 4)
    assert raw[8:16] == le(0x1000, 8)
    assert raw[16:24] == le(0x1FFF, 8)
    assert raw[24:32] == le(0xA000, 8)
    assert raw[32:36] == le(3, 4)


def test_unmap_layout() -> None:
    raw = UnmapRequest(3, 0x1000, 0x1FFF, b"\1\2\3\4").pack()
    assert len(raw) == 28
    assert raw[0] == 4 and raw[4:8] == le(3, 4)
    assert raw[8:16] == le(0x1000, 8) and raw[16:24] == le(0x1FFF, 8)
    assert raw[24:28] == b"\1\2\3\4"


def test_probe_layout() -> None:
    raw = ProbeRequest(0x0102).pack()
    assert len(raw) == 72
    assert raw[0] == 5 and raw[4:8] == le(0x0102, 4) and raw[8:] == b"\0" * 64


@settings(max_examples=60, deadline=None)
@given(
    st.one_of(
        st.builds(AttachRequest, u32, u32, u32, st.binary(min_size=4, max_size=4)),
        st.builds(DetachRequest, u32, u32, st.binary(min_size=8, max_size=8)),
        st.builds(MapRequest, u32, u64, u64, u64, u32),
        st.builds(UnmapRequest, u32, u64, u64, st.binary(min_size=4, max_size=4)),
        st.builds(ProbeRequest, u32, st.binary(min_size=64, max_size=64)),
    )
)
def test_request_round_trip(req: AttachRequest | DetachRequest | MapRequest | UnmapRequest | ProbeRequest) -> None:
    assert decode_request(req.pack()) == req


def test_decode_ignores_head_reserved() -> None:
    raw = bytearray(MapRequest(1, 0, 0xFFF, 0, 1).pack())
    raw[1:4] = b"\xff\xff\xff"  # D-09: the device ignores head.reserved
    assert decode_request(bytes(raw)) == MapRequest(1, 0, 0xFFF, 0, 1)


@pytest.mark.parametrize("raw", [b"", b"\x01\0\0", b"\x09\0\0\0", MapRequest(1, 0, 1, 0, 0).pack()[:-1],
                                 MapRequest(1, 0, 1, 0, 0).pack() + b"\0"])
def test_decode_rejects_bad_bytes(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_request(raw)


def test_tail() -> None:
    assert pack_tail(Status.RANGE) == b"\x05\0\0\0"
    assert Tail.unpack(b"\x06\0\0\0") == Tail(Status.NOENT)
    assert Tail(4).pack() == b"\x04\0\0\0"
    with pytest.raises(ProtocolError):
        Tail.unpack(b"\0")


def test_resv_mem_property_layout() -> None:
    raw = ResvMem(ResvMemType.MSI, 0xFEE00000, 0xFEEFFFFF).pack()
    assert len(raw) == 24
    assert raw[0:2] == le(1, 2)  # type RESV_MEM, reserved bits zero
    assert raw[2:4] == le(20, 2)  # length excludes the 4-byte header (D-38)
    assert raw[4] == 1 and raw[5:8] == b"\0\0\0"
    assert raw[8:16] == le(0xFEE00000, 8) and raw[16:24] == le(0xFEEFFFFF, 8)


def test_properties_pack_and_parse() -> None:
    props = [ResvMem(1, 0xFEE00000, 0xFEEFFFFF), ResvMem(0, 0x1000, 0x1FFF)]
    area = pack_properties(props, 100)
    assert len(area) == 100
    assert area[48:] == bytes(52)  # zero fill (D-40)
    parsed = parse_properties(area)
    assert [unpack_resv_mem(p) for p in parsed] == props
    with pytest.raises(ProtocolError):
        pack_properties(props, 47)


def test_parse_properties_follows_length_and_reserved_bits() -> None:
    # An unknown property of length 3 is skipped by length + 4 (D-38).
    area = le(0x7 | (0x2 << 12), 2) + le(3, 2) + b"abc" + ResvMem(0, 5, 6).pack() + bytes(4)
    parsed = parse_properties(area)
    assert [(p.type, p.reserved_bits) for p in parsed] == [(7, 2), (1, 0)]
    assert parsed[0].value == b"abc"
    with pytest.raises(ProtocolError):
        parse_properties(le(1, 2) + le(20, 2) + bytes(10))


def test_config_layout() -> None:
    cfg = Config(
        page_size_mask=0xFFFFF000,
        input_start=0x1000,
        input_end=(1 << 48) - 1,
        domain_start=1,
        domain_end=0xFFFF,
        probe_size=512,
        bypass=1,
    )
    raw = cfg.pack()
    assert len(raw) == CONFIG_SIZE == 40
    assert raw[0:8] == le(0xFFFFF000, 8)
    assert raw[8:16] == le(0x1000, 8)
    assert raw[16:24] == le((1 << 48) - 1, 8)
    assert raw[24:28] == le(1, 4) and raw[28:32] == le(0xFFFF, 4)
    assert raw[32:36] == le(512, 4)
    assert raw[36] == 1 and raw[37:40] == b"\0\0\0"
    assert Config.unpack(raw) == cfg


def test_fault_layout() -> None:
    f = Fault(FaultReason.MAPPING, FaultFlag.WRITE | FaultFlag.ADDRESS, 0x0108, 0xDEAD000)
    raw = f.pack()
    assert len(raw) == FAULT_SIZE == 24
    assert raw[0] == 2 and raw[1:4] == b"\0\0\0"
    assert raw[4:8] == le(0x102, 4)
    assert raw[8:12] == le(0x0108, 4)
    assert raw[12:16] == b"\0" * 4  # reserved1 (D-46)
    assert raw[16:24] == le(0xDEAD000, 8)
    assert Fault.unpack(raw) == f
