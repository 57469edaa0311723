"""virtio-iommu wire format (sans-IO): bytes in, dataclasses out, and back.

Every layout is the one in the OASIS virtio specification v1.2–v1.4,
section "IOMMU Device" (5.13 in v1.2/v1.3), all little-endian.  Nothing here
knows about domains or state; :mod:`hostrelay.relay` gives the requests their
meaning.

Framing (5.13.6): a request is one descriptor chain whose device-readable part
is ``head + body`` and whose device-writable part is the ``tail`` (preceded,
for PROBE, by ``probe_size`` bytes of properties).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar, Self

DEVICE_ID = 23  # 5.13.1
REQUESTQ = 0  # 5.13.2
EVENTQ = 1

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1


class Feature(IntFlag):
    """Feature bits (5.13.3) plus the transport bit the device must offer."""

    INPUT_RANGE = 1 << 0
    DOMAIN_RANGE = 1 << 1
    MAP_UNMAP = 1 << 2
    BYPASS = 1 << 3  # legacy; superseded by BYPASS_CONFIG (D-02)
    PROBE = 1 << 4
    MMIO = 1 << 5
    BYPASS_CONFIG = 1 << 6
    VERSION_1 = 1 << 32  # VIRTIO_F_VERSION_1 (6 "Reserved Feature Bits")


class ReqType(IntEnum):
    """``virtio_iommu_req_head.type`` (5.13.6)."""

    ATTACH = 1
    DETACH = 2
    MAP = 3
    UNMAP = 4
    PROBE = 5


class Status(IntEnum):
    """``virtio_iommu_req_tail.status`` (5.13.6)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2
    DEVERR = 3
    INVAL = 4
    RANGE = 5
    NOENT = 6
    FAULT = 7
    NOMEM = 8


class AttachFlag(IntFlag):
    """ATTACH ``flags`` (5.13.6.3)."""

    BYPASS = 1 << 0


ATTACH_F_MASK = int(AttachFlag.BYPASS)


class MapFlag(IntFlag):
    """MAP ``flags`` (5.13.6.5)."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMIO = 1 << 2


MAP_F_MASK = int(MapFlag.READ | MapFlag.WRITE | MapFlag.MMIO)


class ProbeType(IntEnum):
    """Property types (5.13.6.8)."""

    NONE = 0
    RESV_MEM = 1


PROBE_T_MASK = 0xFFF  # type is 12 bits; bits 12..15 are reserved


class ResvMemType(IntEnum):
    """RESV_MEM subtypes (5.13.6.8.1)."""

    RESERVED = 0
    MSI = 1


class FaultReason(IntEnum):
    """Fault ``reason`` (5.13.6.9)."""

    UNKNOWN = 0
    DOMAIN = 1
    MAPPING = 2


class FaultFlag(IntFlag):
    """Fault ``flags`` (5.13.6.9)."""

    READ = 1 << 0
    WRITE = 1 << 1
    ADDRESS = 1 << 8


class ProtocolError(ValueError):
    """Bytes that do not form the structure asked for."""


# --- structures -----------------------------------------------------------

_HEAD = struct.Struct("<B3s")
_TAIL = struct.Struct("<B3s")
HEAD_SIZE = _HEAD.size  # 4
TAIL_SIZE = _TAIL.size  # 4


def pack_head(req_type: int) -> bytes:
    """A request head with zero reserved bytes."""
    return _HEAD.pack(req_type, b"\0\0\0")


def unpack_head(data: bytes) -> int:
    """The request type from the first 4 bytes; head.reserved is ignored (D-09)."""
    if len(data) < HEAD_SIZE:
        raise ProtocolError("request shorter than its head")
    return int(data[0])


def pack_tail(status: int) -> bytes:
    """A request tail; reserved bytes are zero (D-09)."""
    return _TAIL.pack(status, b"\0\0\0")


@dataclass(frozen=True, slots=True)
class Tail:
    """``struct virtio_iommu_req_tail``."""

    status: int
    reserved: bytes = b"\0\0\0"

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        """Decode exactly 4 bytes."""
        if len(data) != TAIL_SIZE:
            raise ProtocolError(f"tail must be {TAIL_SIZE} bytes, got {len(data)}")
        status, reserved = _TAIL.unpack(data)
        return cls(status, reserved)

    def pack(self) -> bytes:
        """Encode to 4 bytes."""
        return _TAIL.pack(self.status, self.reserved)


class _Request:
    """Shared codec for the fixed-layout requests.

    ``BODY`` is the body after the head; the device-readable part of a request
    is ``HEAD_SIZE + BODY.size`` bytes and its device-writable part is the tail.
    """

    __slots__ = ()

    TYPE: ClassVar[ReqType]
    BODY: ClassVar[struct.Struct]

    @classmethod
    def readable_size(cls) -> int:
        """Size of the device-readable part (head + body)."""
        return HEAD_SIZE + cls.BODY.size


@dataclass(frozen=True, slots=True)
class AttachRequest(_Request):
    """``struct virtio_iommu_req_attach`` (5.13.6.3)."""

    domain: int
    endpoint: int
    flags: int = 0
    reserved: bytes = b"\0" * 4

    TYPE: ClassVar[ReqType] = ReqType.ATTACH
    BODY: ClassVar[struct.Struct] = struct.Struct("<III4s")

    @classmethod
    def unpack(cls, body: bytes) -> Self:
        """Decode the body (the bytes after the head)."""
        return cls(*cls.BODY.unpack(body))

    def pack(self) -> bytes:
        """Head + body: the device-readable part."""
        return pack_head(self.TYPE) + self.BODY.pack(
            self.domain, self.endpoint, self.flags, self.reserved
        )


@dataclass(frozen=True, slots=True)
class DetachRequest(_Request):
    """``struct virtio_iommu_req_detach`` (5.13.6.4)."""

    domain: int
    endpoint: int
    reserved: bytes = b"\0" * 8

    TYPE: ClassVar[ReqType] = ReqType.DETACH
    BODY: ClassVar[struct.Struct] = struct.Struct("<II8s")

    @classmethod
    def unpack(cls, body: bytes) -> Self:
        """Decode the body (the bytes after the head)."""
        return cls(*cls.BODY.unpack(body))

    def pack(self) -> bytes:
        """Head + body: the device-readable part."""
        return pack_head(self.TYPE) + self.BODY.pack(self.domain, self.endpoint, self.reserved)


@dataclass(frozen=True, slots=True)
class MapRequest(_Request):
    """``struct virtio_iommu_req_map`` (5.13.6.5); ``virt_end`` is inclusive."""

    domain: int
    virt_start: int
    virt_end: int
    phys_start: int
    flags: int

    TYPE: ClassVar[ReqType] = ReqType.MAP
    BODY: ClassVar[struct.Struct] = struct.Struct("<IQQQI")

    @classmethod
    def unpack(cls, body: bytes) -> Self:
        """Decode the body (the bytes after the head)."""
        return cls(*cls.BODY.unpack(body))

    def pack(self) -> bytes:
        """Head + body: the device-readable part."""
        return pack_head(self.TYPE) + self.BODY.pack(
            self.domain, self.virt_start, self.virt_end, self.phys_start, self.flags
        )


@dataclass(frozen=True, slots=True)
class UnmapRequest(_Request):
    """``struct virtio_iommu_req_unmap`` (5.13.6.6); ``virt_end`` is inclusive."""

    domain: int
    virt_start: int
    virt_end: int
    reserved: bytes = b"\0" * 4

    TYPE: ClassVar[ReqType] = ReqType.UNMAP
    BODY: ClassVar[struct.Struct] = struct.Struct("<IQQ4s")

    @classmethod
    def unpack(cls, body: bytes) -> Self:
        """Decode the body (the bytes after the head)."""
        return cls(*cls.BODY.unpack(body))

    def pack(self) -> bytes:
        """Head + body: the device-readable part."""
        return pack_head(self.TYPE) + self.BODY.pack(
            self.domain, self.virt_start, self.virt_end, self.reserved
        )


@dataclass(frozen=True, slots=True)
class ProbeRequest(_Request):
    """``struct virtio_iommu_req_probe`` (5.13.6.7), device-readable part.

    The device-writable part is ``probe_size`` bytes of properties + tail.
    """

    endpoint: int
    reserved: bytes = b"\0" * 64

    TYPE: ClassVar[ReqType] = ReqType.PROBE
    BODY: ClassVar[struct.Struct] = struct.Struct("<I64s")

    @classmethod
    def unpack(cls, body: bytes) -> Self:
        """Decode the body (the bytes after the head)."""
        return cls(*cls.BODY.unpack(body))

    def pack(self) -> bytes:
        """Head + body: the device-readable part."""
        return pack_head(self.TYPE) + self.BODY.pack(self.endpoint, self.reserved)


Request = AttachRequest | DetachRequest | MapRequest | UnmapRequest | ProbeRequest

REQUEST_CLASSES: dict[int, type[Request]] = {
    ReqType.ATTACH: AttachRequest,
    ReqType.DETACH: DetachRequest,
    ReqType.MAP: MapRequest,
    ReqType.UNMAP: UnmapRequest,
    ReqType.PROBE: ProbeRequest,
}


def decode_request(readable: bytes) -> Request:
    """Decode a whole device-readable part (head + body).

    Raises :class:`ProtocolError` for an unknown type or a body whose size is
    not the one the spec defines for that type.
    """
    req_type = unpack_head(readable)
    cls = REQUEST_CLASSES.get(req_type)
    if cls is None:
        raise ProtocolError(f"unknown request type {req_type}")
    if len(readable) != cls.readable_size():
        raise ProtocolError(
            f"{cls.TYPE.name} readable part is {len(readable)} bytes, expected {cls.readable_size()}"
        )
    return cls.unpack(readable[HEAD_SIZE:])


# --- PROBE properties -------------------------------------------------------

_PROP_HEAD = struct.Struct("<HH")
PROP_HEAD_SIZE = _PROP_HEAD.size  # 4
_RESV_MEM = struct.Struct("<B3sQQ")
RESV_MEM_LENGTH = _RESV_MEM.size  # 20: the value, without the 4-byte header (D-38)
RESV_MEM_SIZE = PROP_HEAD_SIZE + RESV_MEM_LENGTH  # 24


@dataclass(frozen=True, slots=True)
class ResvMem:
    """``struct virtio_iommu_probe_resv_mem`` (5.13.6.8.1); ``end`` inclusive."""

    subtype: int
    start: int
    end: int

    def pack(self) -> bytes:
        """Header (type RESV_MEM, length 20) + value; reserved bits zero (D-37, D-41)."""
        return _PROP_HEAD.pack(ProbeType.RESV_MEM, RESV_MEM_LENGTH) + _RESV_MEM.pack(
            self.subtype, b"\0\0\0", self.start, self.end
        )

    def overlaps(self, start: int, end: int) -> bool:
        """True if ``[start, end]`` intersects this region."""
        return start <= self.end and self.start <= end


@dataclass(frozen=True, slots=True)
class ProbeProperty:
    """A property as a driver would parse it: type, raw value."""

    type: int
    value: bytes
    reserved_bits: int = 0


def pack_properties(props: list[ResvMem], size: int) -> bytes:
    """Properties back to back, zero-filled to exactly ``size`` bytes (D-40).

    Raises :class:`ProtocolError` if they do not fit.
    """
    out = b"".join(p.pack() for p in props)
    if len(out) > size:
        raise ProtocolError(f"properties need {len(out)} bytes, probe_size is {size}")
    return out + bytes(size - len(out))


def parse_properties(data: bytes) -> list[ProbeProperty]:
    """Walk a properties area the way 5.13.6.7 tells a driver to.

    Stops at a property of type NONE or at the end of the area; a property
    whose value would run past the end raises :class:`ProtocolError`.
    """
    props: list[ProbeProperty] = []
    off = 0
    while off + PROP_HEAD_SIZE <= len(data):
        raw_type, length = _PROP_HEAD.unpack_from(data, off)
        ptype = raw_type & PROBE_T_MASK
        if ptype == ProbeType.NONE:
            break
        value_end = off + PROP_HEAD_SIZE + length
        if value_end > len(data):
            raise ProtocolError("property runs past the end of the properties area")
        props.append(ProbeProperty(ptype, data[off + PROP_HEAD_SIZE : value_end], raw_type >> 12))
        off = value_end  # next property is length + 4 after this one (D-38)
    return props


def unpack_resv_mem(prop: ProbeProperty) -> ResvMem:
    """Decode a RESV_MEM property value."""
    if prop.type != ProbeType.RESV_MEM or len(prop.value) < RESV_MEM_LENGTH:
        raise ProtocolError("not a RESV_MEM property")
    subtype, _reserved, start, end = _RESV_MEM.unpack_from(prop.value)
    return ResvMem(subtype, start, end)


# --- config space -----------------------------------------------------------

_CONFIG = struct.Struct("<QQQIIIB3s")
CONFIG_SIZE = _CONFIG.size  # 40
CONFIG_BYPASS_OFFSET = 36


@dataclass(frozen=True, slots=True)
class Config:
    """``struct virtio_iommu_config`` (5.13.4), 40 bytes."""

    page_size_mask: int
    input_start: int = 0
    input_end: int = U64_MAX
    domain_start: int = 0
    domain_end: int = U32_MAX
    probe_size: int = 0
    bypass: int = 0

    def pack(self) -> bytes:
        """Encode; reserved bytes are zero."""
        return _CONFIG.pack(
            self.page_size_mask,
            self.input_start,
            self.input_end,
            self.domain_start,
            self.domain_end,
            self.probe_size,
            self.bypass,
            b"\0\0\0",
        )

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        """Decode exactly 40 bytes."""
        if len(data) != CONFIG_SIZE:
            raise ProtocolError(f"config is {CONFIG_SIZE} bytes, got {len(data)}")
        fields = _CONFIG.unpack(data)
        return cls(*fields[:7])


# --- fault reports ------------------------------------------------------------

_FAULT = struct.Struct("<B3sIIIQ")
FAULT_SIZE = _FAULT.size  # 24


@dataclass(frozen=True, slots=True)
class Fault:
    """``struct virtio_iommu_fault`` (5.13.6.9), 24 bytes on the event queue."""

    reason: int
    flags: int
    endpoint: int
    address: int = 0

    def pack(self) -> bytes:
        """Encode; ``reserved`` and ``reserved1`` are zero (D-46)."""
        return _FAULT.pack(self.reason, b"\0\0\0", self.flags, self.endpoint, 0, self.address)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        """Decode exactly 24 bytes (reserved fields are dropped)."""
        if len(data) != FAULT_SIZE:
            raise ProtocolError(f"fault record is {FAULT_SIZE} bytes, got {len(data)}")
        reason, _r, flags, endpoint, _r1, address = _FAULT.unpack(data)
        return cls(reason, flags, endpoint, address)
