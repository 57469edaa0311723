"""vfio-user wire format (sans-IO): bytes in, dataclasses out, and back.

Layouts are those of QEMU's ``docs/interop/vfio-user.rst`` (protocol 0.0, the
version QEMU 10.1/11.x's ``vfio-user-pci`` client proposes), whose payloads
reuse ``<linux/vfio.h>``'s ``struct vfio_device_info``, ``vfio_region_info``,
``vfio_irq_info`` and ``vfio_irq_set``.  Everything is in host byte order
("all data is in the endianness of the host system"), which for every host
this project runs on is little-endian, so the structs say ``<``.

Two kinds of bad input, two exceptions:

- :class:`MalformedMessage`: the bytes do not form the message (a size that
  disagrees with the layout, a flag bit the protocol does not define, a JSON
  capability of the wrong type).  The stream cannot be trusted after it: the
  server disconnects.
- :class:`RequestError`: a well-formed request the device refuses (an
  unknown region, an access beyond it, an overlapping DMA map).  It carries
  the errno of the error reply, as the ioctl it mirrors would fail; the
  connection stays up.
"""

from __future__ import annotations

import errno
import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any, Self

from hostrelay.kernel import uapi
from hostrelay.model.wire import ProtocolError

__all__ = [
    "Command",
    "DEVICE_INFO",
    "DeviceInfo",
    "DmaMap",
    "DmaUnmap",
    "HEADER_SIZE",
    "Header",
    "HeaderFlag",
    "IrqInfo",
    "IrqSet",
    "IrqSetFlag",
    "MalformedMessage",
    "RegionAccess",
    "RegionInfo",
    "RequestError",
    "Version",
    "pack_message",
]


class MalformedMessage(ProtocolError):
    """Bytes that are not a vfio-user message: the connection is dropped."""


class RequestError(Exception):
    """A well-formed request refused with ``errno`` in the error reply."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(f"{errno.errorcode.get(err, str(err))}: {message}")
        self.errno = err


class Command(IntEnum):
    """Message command IDs (vfio-user.rst "Commands")."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14  # QEMU's protocol.h; gone from the current doc
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class HeaderFlag(IntFlag):
    """Header ``flags``: bits 0-3 the type, bit 4 No_reply, bit 5 Error."""

    REPLY = 0x1
    NO_REPLY = 0x10
    ERROR = 0x20


TYPE_MASK = 0xF
TYPE_COMMAND = 0x0
TYPE_REPLY = 0x1
# Plain ints: ~ of an IntFlag complements within its defined bits only.
_FLAGS_KNOWN = int(TYPE_MASK | HeaderFlag.NO_REPLY | HeaderFlag.ERROR)

_HEADER = struct.Struct("<HHIII")
HEADER_SIZE = _HEADER.size  # 16


@dataclass(frozen=True, slots=True)
class Header:
    """The 16-byte header every message starts with."""

    msg_id: int
    command: int
    size: int  # of the whole message, header included
    flags: int
    error: int = 0

    @classmethod
    def unpack(cls, data: bytes, max_size: int) -> Self:
        """Decode 16 bytes; a size outside ``[16, max_size]`` or an unknown type or flag is malformed."""
        if len(data) != HEADER_SIZE:
            raise MalformedMessage(f"header is {HEADER_SIZE} bytes, got {len(data)}")
        hdr = cls(*_HEADER.unpack(data))
        if hdr.size < HEADER_SIZE:
            raise MalformedMessage(f"message size {hdr.size} is smaller than its header")
        if hdr.size > max_size:
            raise MalformedMessage(f"message size {hdr.size} exceeds the limit {max_size}")
        if hdr.flags & ~_FLAGS_KNOWN:
            raise MalformedMessage(f"undefined header flag bits {hdr.flags & ~_FLAGS_KNOWN:#x}")
        if hdr.flags & TYPE_MASK not in (TYPE_COMMAND, TYPE_REPLY):
            raise MalformedMessage(f"message type {hdr.flags & TYPE_MASK} is neither command nor reply")
        return hdr

    @property
    def is_reply(self) -> bool:
        """Type bits say Reply."""
        return self.flags & TYPE_MASK == TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        """The sender asked for no reply."""
        return bool(self.flags & HeaderFlag.NO_REPLY)

    def pack(self) -> bytes:
        """Encode to 16 bytes."""
        return _HEADER.pack(self.msg_id, self.command, self.size, self.flags, self.error)


def pack_message(msg_id: int, command: int, payload: bytes = b"", *, reply: bool = True, error: int = 0,
                 no_reply: bool = False) -> bytes:  # fmt: skip
    """Header + payload.  An error reply carries only the header (vfio-user.rst "Header")."""
    flags = TYPE_REPLY if reply else TYPE_COMMAND
    if error:
        flags |= HeaderFlag.ERROR
        payload = b""
    if no_reply:
        flags |= HeaderFlag.NO_REPLY
    return Header(msg_id, command, HEADER_SIZE + len(payload), flags, error).pack() + payload


def _exact(body: bytes, size: int, what: str) -> None:
    if len(body) != size:
        raise MalformedMessage(f"{what} payload is {size} bytes, got {len(body)}")


# --- VERSION ----------------------------------------------------------------------------

_VERSION = struct.Struct("<HH")

# Capability value types (vfio-user.rst "Version"; "migration" from QEMU's
# hw/vfio-user/protocol.h, which still sends it).  bool is checked apart:
# in Python it is an int, in JSON it is not a number.
_NUMBER_CAPS = ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes")
_MIGRATION_CAPS = ("pgsize", "max_bitmap_size")


def _number(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise MalformedMessage(f"capability {name} must be a u64 number, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Version:
    """``VFIO_USER_VERSION`` request or reply: a version and the ``capabilities`` object."""

    major: int
    minor: int
    capabilities: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def unpack(cls, body: bytes) -> Self:
        """Decode; the JSON is optional but, when present, NUL-terminated UTF-8 with typed members."""
        if len(body) < _VERSION.size:
            raise MalformedMessage(f"VERSION payload is at least {_VERSION.size} bytes, got {len(body)}")
        major, minor = _VERSION.unpack_from(body)
        text = body[_VERSION.size:]
        if not text:
            return cls(major, minor)
        if text[-1] != 0 or 0 in text[:-1]:
            raise MalformedMessage("VERSION data is not one NUL-terminated string")
        try:
            doc = json.loads(text[:-1].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise MalformedMessage(f"VERSION data is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise MalformedMessage("VERSION data is not a JSON object")
        caps = doc.get("capabilities", {})
        if not isinstance(caps, dict):
            raise MalformedMessage("VERSION capabilities is not an object")
        for name in _NUMBER_CAPS:
            if name in caps:
                _number(caps[name], name)
        if "migration" in caps:
            migration = caps["migration"]
            if not isinstance(migration, dict):
                raise MalformedMessage("capability migration is not an object")
            for name in _MIGRATION_CAPS:
                if name in migration:
                    _number(migration[name], f"migration.{name}")
        for name in ("write_multiple",):
            if name in caps and not isinstance(caps[name], bool):
                raise MalformedMessage(f"capability {name} must be a boolean")
        if "twin_socket" in caps and not isinstance(caps["twin_socket"], dict):
            raise MalformedMessage("capability twin_socket is not an object")
        return cls(major, minor, caps)

    def pack(self) -> bytes:
        """Encode with compact JSON and its terminating NUL."""
        text = json.dumps({"capabilities": self.capabilities}, separators=(",", ":")).encode()
        return _VERSION.pack(self.major, self.minor) + text + b"\0"


# --- DMA_MAP / DMA_UNMAP -----------------------------------------------------------------

DMA_READ_FLAG = 0x1  # "readable": the server may read the region
DMA_WRITE_FLAG = 0x2  # "writeable"
_DMA_MAP = struct.Struct("<IIQQQ")
DMA_MAP_SIZE = _DMA_MAP.size  # 32
# <linux/vfio.h>'s own unmap flags (QEMU sends ALL).
UNMAP_GET_DIRTY_BITMAP = uapi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP
UNMAP_ALL = uapi.VFIO_DMA_UNMAP_FLAG_ALL
_DMA_UNMAP = struct.Struct("<IIQQ")
DMA_UNMAP_SIZE = _DMA_UNMAP.size  # 24
U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class DmaMap:
    """``VFIO_USER_DMA_MAP``: client memory ``[address, address + size)`` at ``offset`` of the sent fd."""

    argsz: int
    flags: int
    offset: int
    address: int
    size: int

    @classmethod
    def unpack(cls, body: bytes) -> Self:
        """Decode exactly 32 bytes; unknown flags, an empty or wrapping span are malformed."""
        _exact(body, DMA_MAP_SIZE, "DMA_MAP")
        m = cls(*_DMA_MAP.unpack(body))
        if m.argsz < DMA_MAP_SIZE:
            raise MalformedMessage(f"DMA_MAP argsz {m.argsz} is smaller than the structure")
        if m.flags & ~(DMA_READ_FLAG | DMA_WRITE_FLAG):
            raise MalformedMessage(f"DMA_MAP undefined flags {m.flags:#x}")
        if m.size == 0 or m.address + m.size - 1 > U64 or m.offset + m.size - 1 > U64:
            raise MalformedMessage(f"DMA_MAP span {m.address:#x}+{m.size:#x} at offset {m.offset:#x} is empty or wraps")
        return m

    def pack(self) -> bytes:
        """Encode to 32 bytes."""
        return _DMA_MAP.pack(self.argsz, self.flags, self.offset, self.address, self.size)


@dataclass(frozen=True, slots=True)
class DmaUnmap:
    """``VFIO_USER_DMA_UNMAP``: the exact span of an earlier map, or every map with ``UNMAP_ALL``."""

    argsz: int
    flags: int
    address: int
    size: int

    @classmethod
    def unpack(cls, body: bytes) -> Self:
        """Decode exactly 24 bytes (QEMU sends no dirty bitmap)."""
        _exact(body, DMA_UNMAP_SIZE, "DMA_UNMAP")
        u = cls(*_DMA_UNMAP.unpack(body))
        if u.flags & ~(UNMAP_GET_DIRTY_BITMAP | UNMAP_ALL):
            raise MalformedMessage(f"DMA_UNMAP undefined flags {u.flags:#x}")
        if u.flags & UNMAP_ALL and (u.address or u.size):
            raise MalformedMessage("DMA_UNMAP of all maps with an address or size")
        if not u.flags & UNMAP_ALL and (u.size == 0 or u.address + u.size - 1 > U64):
            raise MalformedMessage(f"DMA_UNMAP span {u.address:#x}+{u.size:#x} is empty or wraps")
        return u

    def pack(self) -> bytes:
        """Encode to 24 bytes (the reply echoes the request's entry)."""
        return _DMA_UNMAP.pack(self.argsz, self.flags, self.address, self.size)


# --- DEVICE_GET_INFO / GET_REGION_INFO / GET_IRQ_INFO ------------------------------------

_DEVICE_INFO = struct.Struct("<IIII")
DEVICE_INFO = _DEVICE_INFO.size  # 16
DEVICE_FLAGS_RESET = uapi.VFIO_DEVICE_FLAGS_RESET
DEVICE_FLAGS_PCI = uapi.VFIO_DEVICE_FLAGS_PCI
# The message keeps the struct's first four fields: the kernel's struct
# goes on with cap_offset (Debian's 6.1 headers: 20 bytes; 6.12 adds a pad:
# 24), which vfio-user's DEVICE_GET_INFO does not carry (QEMU 10.1-11.1
# hw/vfio-user/protocol.h).
uapi.check_layout(_DEVICE_INFO, "struct vfio_device_info", ("argsz", "flags", "num_regions", "num_irqs"), prefix=True)


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """``struct vfio_device_info`` (argsz, flags, num_regions, num_irqs)."""

    argsz: int
    flags: int = 0
    num_regions: int = 0
    num_irqs: int = 0

    @classmethod
    def unpack(cls, body: bytes) -> Self:
        """Decode exactly 16 bytes."""
        _exact(body, DEVICE_INFO, "DEVICE_GET_INFO")
        return cls(*_DEVICE_INFO.unpack(body))

    def pack(self) -> bytes:
        """Encode to 16 bytes."""
        return _DEVICE_INFO.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)


_REGION_INFO = struct.Struct("<IIIIQQ")
REGION_INFO_SIZE = _REGION_INFO.size  # 32
REGION_READ_FLAG = uapi.VFIO_REGION_INFO_FLAG_READ
REGION_WRITE_FLAG = uapi.VFIO_REGION_INFO_FLAG_WRITE
uapi.check_layout(_REGION_INFO, "struct vfio_region_info", ("argsz", "flags", "index", "cap_offset", "size", "offset"))


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """``struct vfio_region_info`` (argsz, flags, index, cap_offset, size, offset)."""

    argsz: int
    flags: int
    index: int
    cap_offset: int = 0
    size: int = 0
    offset: int = 0

    @classmethod
    def unpack(cls, body: bytes) -> Self:
        """Decode exactly 32 bytes."""
        _exact(body, REGION_INFO_SIZE, "DEVICE_GET_REGION_INFO")
        return cls(*_REGION_INFO.unpack(body))

    def pack(self) -> bytes:
        """Encode to 32 bytes."""
        return _REGION_INFO.pack(self.argsz, self.flags, self.index, self.cap_offset, self.size, self.offset)


_IRQ_INFO = struct.Struct("<IIII")
IRQ_INFO_SIZE = _IRQ_INFO.size  # 16
IRQ_INFO_EVENTFD = uapi.VFIO_IRQ_INFO_EVENTFD
IRQ_INFO_MASKABLE = uapi.VFIO_IRQ_INFO_MASKABLE
IRQ_INFO_AUTOMASKED = uapi.VFIO_IRQ_INFO_AUTOMASKED
IRQ_INFO_NORESIZE = uapi.VFIO_IRQ_INFO_NORESIZE
uapi.check_layout(_IRQ_INFO, "struct vfio_irq_info", ("argsz", "flags", "index", "count"))


@dataclass(frozen=True, slots=True)
class IrqInfo:
    """``struct vfio_irq_info`` (argsz, flags, index, count)."""

    argsz: int
    flags: int
    index: int
    count: int = 0

    @classmethod
    def unpack(cls, body: bytes) -> Self:
        """Decode exactly 16 bytes."""
        _exact(body, IRQ_INFO_SIZE, "DEVICE_GET_IRQ_INFO")
        return cls(*_IRQ_INFO.unpack(body))

    def pack(self) -> bytes:
        """Encode to 16 bytes."""
        return _IRQ_INFO.pack(self.argsz, self.flags, self.index, self.count)


# --- DEVICE_SET_IRQS ---------------------------------------------------------------------


class IrqSetFlag(IntFlag):
    """``vfio_irq_set.flags``: one DATA_* and one ACTION_* bit."""

    DATA_NONE = uapi.VFIO_IRQ_SET_DATA_NONE
    DATA_BOOL = uapi.VFIO_IRQ_SET_DATA_BOOL
    DATA_EVENTFD = uapi.VFIO_IRQ_SET_DATA_EVENTFD
    ACTION_MASK = uapi.VFIO_IRQ_SET_ACTION_MASK
    ACTION_UNMASK = uapi.VFIO_IRQ_SET_ACTION_UNMASK
    ACTION_TRIGGER = uapi.VFIO_IRQ_SET_ACTION_TRIGGER


_DATA_FLAGS = int(IrqSetFlag.DATA_NONE | IrqSetFlag.DATA_BOOL | IrqSetFlag.DATA_EVENTFD)
_ACTION_FLAGS = int(IrqSetFlag.ACTION_MASK | IrqSetFlag.ACTION_UNMASK | IrqSetFlag.ACTION_TRIGGER)
_IRQ_SET = struct.Struct("<IIIII")
IRQ_SET_SIZE = _IRQ_SET.size  # 20
uapi.check_layout(_IRQ_SET, "struct vfio_irq_set", ("argsz", "flags", "index", "start", "count"))


@dataclass(frozen=True, slots=True)
class IrqSet:
    """``struct vfio_irq_set``; ``data`` is the DATA_BOOL array (eventfds travel as SCM_RIGHTS)."""

    argsz: int
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""

    @classmethod
    def unpack(cls, body: bytes) -> Self:
        """Decode; exactly one DATA and one ACTION flag, DATA_BOOL with ``count`` bytes, nothing else."""
        if len(body) < IRQ_SET_SIZE:
            raise MalformedMessage(f"DEVICE_SET_IRQS payload is at least {IRQ_SET_SIZE} bytes, got {len(body)}")
        argsz, flags, index, start, count = _IRQ_SET.unpack_from(body)
        data = body[IRQ_SET_SIZE:]
        if flags & ~(_DATA_FLAGS | _ACTION_FLAGS):
            raise MalformedMessage(f"DEVICE_SET_IRQS undefined flags {flags:#x}")
        if (flags & _DATA_FLAGS).bit_count() != 1 or (flags & _ACTION_FLAGS).bit_count() != 1:
            raise MalformedMessage(f"DEVICE_SET_IRQS flags {flags:#x} need one DATA and one ACTION bit")
        if start + count > 0xFFFFFFFF:
            raise MalformedMessage("DEVICE_SET_IRQS start + count wraps")
        expected = count if flags & IrqSetFlag.DATA_BOOL else 0
        if len(data) != expected:
            raise MalformedMessage(f"DEVICE_SET_IRQS carries {len(data)} data bytes, expected {expected}")
        return cls(argsz, flags, index, start, count, data)

    def pack(self) -> bytes:
        """Encode (header fields + BOOL data)."""
        return _IRQ_SET.pack(self.argsz, self.flags, self.index, self.start, self.count) + self.data


# --- REGION_READ / REGION_WRITE ----------------------------------------------------------

_REGION_ACCESS = struct.Struct("<QII")
REGION_ACCESS_SIZE = _REGION_ACCESS.size  # 16


@dataclass(frozen=True, slots=True)
class RegionAccess:
    """``REGION_READ``/``REGION_WRITE`` (offset, region, count, data)."""

    offset: int
    region: int
    count: int
    data: bytes = b""

    @classmethod
    def unpack_read(cls, body: bytes, max_xfer: int) -> Self:
        """A read request: exactly 16 bytes, ``count`` at most ``max_xfer``."""
        _exact(body, REGION_ACCESS_SIZE, "REGION_READ")
        access = cls(*_REGION_ACCESS.unpack(body))
        if access.count > max_xfer:
            raise MalformedMessage(f"REGION_READ count {access.count} exceeds max_data_xfer_size {max_xfer}")
        return access

    @classmethod
    def unpack_write(cls, body: bytes, max_xfer: int) -> Self:
        """A write request: 16 bytes and exactly ``count`` data bytes."""
        if len(body) < REGION_ACCESS_SIZE:
            raise MalformedMessage(f"REGION_WRITE payload is at least {REGION_ACCESS_SIZE} bytes, got {len(body)}")
        offset, region, count = _REGION_ACCESS.unpack_from(body)
        if count > max_xfer:
            raise MalformedMessage(f"REGION_WRITE count {count} exceeds max_data_xfer_size {max_xfer}")
        data = body[REGION_ACCESS_SIZE:]
        if len(data) != count:
            raise MalformedMessage(f"REGION_WRITE count {count} but {len(data)} data bytes")
        return cls(offset, region, count, bytes(data))

    def pack(self) -> bytes:
        """Encode (a read reply carries ``data``; a write reply none)."""
        return _REGION_ACCESS.pack(self.offset, self.region, self.count) + self.data
