"""The vhost-user wire format, sans IO (QEMU docs/interop/vhost-user.rst).

A message is a 12-byte header -- ``request`` u32, ``flags`` u32 (bits 0-1
the version, 1; bit 2 *reply*; bit 3 *need_reply*), ``size`` u32 -- and
``size`` bytes of payload in the host's byte order, with file descriptors
as SCM_RIGHTS ancillary data on the same ``sendmsg``.  This module turns
bytes and fds into typed :class:`Message` values and back, and checks
everything a front end controls: the version and flag bits, that the
request is one the document defines, that the payload has exactly the size
its layout has (never more than the largest layout, :data:`MAX_PAYLOAD`),
and that exactly the fds the request carries came with it.  Any mismatch is
a :class:`VhostUserError` naming the message; the caller then disconnects.
A message that raised owns no fd any more: :func:`decode` closes what came
with it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

__all__ = [
    "CONFIG_HDR",
    "FLAG_NEED_REPLY",
    "FLAG_REPLY",
    "HEADER",
    "MAX_CONFIG_SIZE",
    "MAX_FDS",
    "MAX_PAYLOAD",
    "MAX_REGIONS",
    "VERSION",
    "VRING_NOFD",
    "ConfigMsg",
    "Header",
    "Inflight",
    "IotlbMsg",
    "LogMsg",
    "MemRegion",
    "MemTable",
    "Message",
    "ProtocolFeature",
    "Request",
    "VhostUserError",
    "VringAddr",
    "VringState",
    "close_fds",
    "decode",
    "encode",
    "parse_header",
]

HEADER = struct.Struct("=III")
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
_KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

#: VHOST_MEMORY_BASELINE_NREGIONS: SET_MEM_TABLE carries at most 8 regions (and 8 fds).
MAX_REGIONS = 8
MAX_FDS = MAX_REGIONS
#: VHOST_USER_MAX_CONFIG_SIZE (QEMU hw/virtio/vhost-user.c).
MAX_CONFIG_SIZE = 256
#: Bit 8 of SET_VRING_KICK/CALL/ERR's u64: no fd came (the front end polls).
VRING_NOFD = 1 << 8
_VRING_IDX_MASK = 0xFF

_U64 = struct.Struct("=Q")
_STATE = struct.Struct("=II")  # struct vhost_vring_state
_ADDR = struct.Struct("=IIQQQQ")  # struct vhost_vring_addr: index, flags, desc, used, avail, log
_MEM_HDR = struct.Struct("=II")  # nregions, padding
_REGION = struct.Struct("=QQQQ")  # guest address, size, user address, mmap offset
_SINGLE_REGION = struct.Struct("=QQQQQ")  # padding, then a region
CONFIG_HDR = struct.Struct("=III")  # offset, size, flags
_LOG = struct.Struct("=QQ")  # mmap size, mmap offset
_IOTLB = struct.Struct("=QQQBB6x")  # struct vhost_iotlb_msg (padded to 32 as in <linux/vhost_types.h>)
_INFLIGHT = struct.Struct("=QQHH4x")  # VhostUserInflight (padded to 24)
_AREA = struct.Struct("=QQQ")  # vring area: u64 index/flags, size, offset
_DEVICE_STATE = struct.Struct("=II")  # VhostUserTransferDeviceState: direction, phase
_UUID = 16

#: The largest payload the protocol defines: a config message of 256 bytes.
MAX_PAYLOAD = CONFIG_HDR.size + MAX_CONFIG_SIZE


class VhostUserError(Exception):
    """A vhost-user message that is malformed, unknown, unsupported or out of order.

    ``request`` names the message (a :class:`Request` or the raw number).
    The connection it came on cannot be trusted to be in step any more: the
    back end disconnects.
    """

    def __init__(self, request: Request | int | None, why: str) -> None:
        self.request = request
        self.why = why
        super().__init__(f"{_name(request)}: {why}")


def _name(request: Request | int | None) -> str:
    if request is None:
        return "vhost-user message"
    if isinstance(request, Request):
        return f"VHOST_USER_{request.name}"
    try:
        return f"VHOST_USER_{Request(request).name}"
    except ValueError:
        return f"vhost-user request {request}"


class Request(IntEnum):
    """Front-end message types (vhost-user.rst "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44


class ProtocolFeature(IntFlag):
    """``VHOST_USER_PROTOCOL_F_*`` bits (vhost-user.rst "Protocol features")."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19
    SHMEM = 1 << 20


# --- payloads ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VringState:
    """``struct vhost_vring_state``: a ring index and a number."""

    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    """``struct vhost_vring_addr``: the rings' front-end user addresses."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True, slots=True)
class MemRegion:
    """One region of the memory table: guest-physical and user addresses of an fd's bytes."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class MemTable:
    """The memory regions description (SET_MEM_TABLE), its fds in :attr:`Message.fds`."""

    regions: tuple[MemRegion, ...]


@dataclass(frozen=True, slots=True)
class ConfigMsg:
    """The virtio device config space message (GET_CONFIG / SET_CONFIG)."""

    offset: int
    size: int
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class LogMsg:
    """The log description (SET_LOG_BASE with LOG_SHMFD)."""

    size: int
    offset: int


@dataclass(frozen=True, slots=True)
class IotlbMsg:
    """``struct vhost_iotlb_msg``."""

    iova: int
    size: int
    user_addr: int
    perm: int
    type: int


@dataclass(frozen=True, slots=True)
class Inflight:
    """The inflight description (GET/SET_INFLIGHT_FD)."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


Payload = int | VringState | VringAddr | MemTable | MemRegion | ConfigMsg | LogMsg | IotlbMsg | Inflight | bytes | None


@dataclass(slots=True)
class Message:
    """One decoded front-end message.  ``fds`` are owned by whoever holds the message."""

    request: Request
    flags: int
    payload: Payload
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        """The front end asked for a REPLY_ACK."""
        return bool(self.flags & FLAG_NEED_REPLY)


@dataclass(frozen=True, slots=True)
class Header:
    """A checked message header."""

    request: int
    flags: int
    size: int


def close_fds(fds: Sequence[int]) -> None:
    """Close every fd of ``fds`` (those that are already gone are skipped)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def parse_header(data: bytes) -> Header:
    """Check a 12-byte header: version 1, no unknown flag, not a reply, a size the protocol allows."""
    if len(data) != HEADER.size:
        raise VhostUserError(None, f"header of {len(data)} bytes, not {HEADER.size}")
    request, flags, size = HEADER.unpack(data)
    if flags & VERSION_MASK != VERSION:
        raise VhostUserError(request, f"protocol version {flags & VERSION_MASK}, only {VERSION} exists")
    if flags & ~_KNOWN_FLAGS:
        raise VhostUserError(request, f"unknown flag bits {flags & ~_KNOWN_FLAGS:#x}")
    if flags & FLAG_REPLY:
        raise VhostUserError(request, "a reply where a request was due")
    if size > MAX_PAYLOAD:
        raise VhostUserError(request, f"payload of {size} bytes, more than any message has ({MAX_PAYLOAD})")
    return Header(request, flags, size)


# Requests by payload layout, and the fds each carries.
_EMPTY = frozenset({
    Request.GET_FEATURES, Request.SET_OWNER, Request.RESET_OWNER, Request.GET_PROTOCOL_FEATURES,
    Request.GET_QUEUE_NUM, Request.POSTCOPY_ADVISE, Request.POSTCOPY_LISTEN, Request.POSTCOPY_END,
    Request.RESET_DEVICE, Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS, Request.CHECK_DEVICE_STATE,
    Request.GET_SHMEM_CONFIG, Request.SET_LOG_FD, Request.SET_BACKEND_REQ_FD, Request.GPU_SET_SOCKET,
})  # fmt: skip
_U64_REQS = frozenset({
    Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES, Request.SET_VRING_KICK, Request.SET_VRING_CALL,
    Request.SET_VRING_ERR, Request.SEND_RARP, Request.NET_SET_MTU, Request.SET_STATUS,
    Request.CLOSE_CRYPTO_SESSION,
})  # fmt: skip
_STATE_REQS = frozenset({
    Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE, Request.SET_VRING_ENABLE,
    Request.SET_VRING_ENDIAN, Request.VRING_KICK,
})  # fmt: skip
_ONE_FD = frozenset({
    Request.SET_LOG_FD, Request.SET_BACKEND_REQ_FD, Request.GPU_SET_SOCKET, Request.SET_LOG_BASE,
    Request.SET_INFLIGHT_FD, Request.SET_DEVICE_STATE_FD, Request.ADD_MEM_REG,
})  # fmt: skip
_VRING_FD = frozenset({Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR})


def decode(header: Header, payload: bytes, fds: list[int]) -> Message:
    """The message ``header`` announced, from its payload and the fds that came with it.

    Raises :class:`VhostUserError` (after closing ``fds``) for an unknown
    request, a payload that is not its layout's size, or fds the request
    does not carry.
    """
    try:
        return _decode(header, payload, fds)
    except BaseException:
        close_fds(fds)
        raise


def _size(req: Request, payload: bytes, want: int) -> None:
    if len(payload) != want:
        raise VhostUserError(req, f"payload of {len(payload)} bytes, its layout has {want}")


def _decode(header: Header, payload: bytes, fds: list[int]) -> Message:
    if len(payload) != header.size:
        raise VhostUserError(header.request, f"payload of {len(payload)} bytes, the header said {header.size}")
    try:
        req = Request(header.request)
    except ValueError:
        raise VhostUserError(header.request, "unknown request") from None
    body: Payload
    if req in _EMPTY:
        _size(req, payload, 0)  # QEMU 11.1 sends them with size 0 (vhost_user_get_u64 and friends)
        body = None
    elif req in _U64_REQS:
        _size(req, payload, _U64.size)
        body = _U64.unpack(payload)[0]
    elif req in _STATE_REQS:
        _size(req, payload, _STATE.size)
        body = VringState(*_STATE.unpack(payload))
    elif req == Request.SET_VRING_ADDR:
        _size(req, payload, _ADDR.size)
        body = VringAddr(*_ADDR.unpack(payload))
    elif req == Request.SET_MEM_TABLE:
        body = _mem_table(req, payload)
    elif req in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
        _size(req, payload, _SINGLE_REGION.size)
        body = MemRegion(*_SINGLE_REGION.unpack(payload)[1:])
    elif req in (Request.GET_CONFIG, Request.SET_CONFIG):
        body = _config(req, payload)
    elif req == Request.SET_LOG_BASE:
        _size(req, payload, _LOG.size)
        body = LogMsg(*_LOG.unpack(payload))
    elif req == Request.IOTLB_MSG:
        _size(req, payload, _IOTLB.size)
        body = IotlbMsg(*_IOTLB.unpack(payload))
    elif req in (Request.GET_INFLIGHT_FD, Request.SET_INFLIGHT_FD):
        _size(req, payload, _INFLIGHT.size)
        body = Inflight(*_INFLIGHT.unpack(payload))
    elif req == Request.SET_DEVICE_STATE_FD:
        _size(req, payload, _DEVICE_STATE.size)
        body = payload
    elif req == Request.GET_SHARED_OBJECT:
        _size(req, payload, _UUID)
        body = payload
    else:  # CREATE_CRYPTO_SESSION: a layout of its own, for crypto devices only
        raise VhostUserError(req, "not a virtio-iommu message (crypto sessions)")
    _check_fds(req, body, len(fds))
    return Message(req, header.flags, body, fds)


def _mem_table(req: Request, payload: bytes) -> MemTable:
    if len(payload) < _MEM_HDR.size:
        raise VhostUserError(req, f"payload of {len(payload)} bytes, shorter than the region count")
    n, _pad = _MEM_HDR.unpack_from(payload)
    if n > MAX_REGIONS:
        raise VhostUserError(req, f"{n} regions, at most {MAX_REGIONS}")
    _size(req, payload, _MEM_HDR.size + n * _REGION.size)
    regions = tuple(MemRegion(*_REGION.unpack_from(payload, _MEM_HDR.size + i * _REGION.size)) for i in range(n))
    return MemTable(regions)


def _config(req: Request, payload: bytes) -> ConfigMsg:
    if len(payload) < CONFIG_HDR.size:
        raise VhostUserError(req, f"payload of {len(payload)} bytes, shorter than the config header")
    offset, size, flags = CONFIG_HDR.unpack_from(payload)
    if size > MAX_CONFIG_SIZE:
        raise VhostUserError(req, f"config size {size}, at most {MAX_CONFIG_SIZE}")
    _size(req, payload, CONFIG_HDR.size + size)
    if flags not in (0, 1):
        raise VhostUserError(req, f"config flags {flags:#x} (0: front end, 1: migration)")
    return ConfigMsg(offset, size, flags, payload[CONFIG_HDR.size :])


def _check_fds(req: Request, body: Payload, nfds: int) -> None:
    if req == Request.SET_MEM_TABLE:
        assert isinstance(body, MemTable)
        want = len(body.regions)
    elif req in _VRING_FD:
        assert isinstance(body, int)
        if body & ~(_VRING_IDX_MASK | VRING_NOFD):
            raise VhostUserError(req, f"u64 {body:#x} has bits besides the index and the no-fd flag")
        want = 0 if body & VRING_NOFD else 1
    elif req in _ONE_FD:
        want = 1
    elif req == Request.REM_MEM_REG:
        # "No file descriptors SHOULD be passed ... the back-end MAY accept
        # messages with one file descriptor" (and closes it).
        if nfds <= 1:
            return
        want = 0
    else:
        want = 0
    if nfds != want:
        raise VhostUserError(req, f"{nfds} file descriptors came, it carries {want}")


# --- encoding (replies, and a front end's requests for tests and tools) --------------------


def encode(request: Request | int, payload: bytes = b"", *, reply: bool = False, need_reply: bool = False) -> bytes:
    """A whole message: header and payload."""
    flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(int(request), flags, len(payload)) + payload


def u64(value: int) -> bytes:
    """The ``u64`` payload."""
    return _U64.pack(value)


def unpack_u64(payload: bytes) -> int:
    """A ``u64`` payload's value (a reply's)."""
    if len(payload) != _U64.size:
        raise VhostUserError(None, f"u64 payload of {len(payload)} bytes")
    return int(_U64.unpack(payload)[0])


def vring_state(index: int, num: int) -> bytes:
    """The vring state payload."""
    return _STATE.pack(index, num)


def unpack_vring_state(payload: bytes) -> VringState:
    """A vring state payload (a reply's)."""
    if len(payload) != _STATE.size:
        raise VhostUserError(None, f"vring state payload of {len(payload)} bytes")
    return VringState(*_STATE.unpack(payload))


def vring_addr(index: int, desc: int, used: int, avail: int, *, flags: int = 0, log: int = 0) -> bytes:
    """The vring address payload."""
    return _ADDR.pack(index, flags, desc, used, avail, log)


def mem_table(regions: Sequence[MemRegion]) -> bytes:
    """The memory regions payload (its fds go in the ancillary data, in the same order)."""
    return _MEM_HDR.pack(len(regions), 0) + b"".join(
        _REGION.pack(r.guest_addr, r.size, r.user_addr, r.mmap_offset) for r in regions
    )


def config_msg(offset: int, data: bytes, *, flags: int = 0) -> bytes:
    """The config space payload."""
    return CONFIG_HDR.pack(offset, len(data), flags) + data


def unpack_config(payload: bytes) -> ConfigMsg:
    """A config payload (a GET_CONFIG reply's; an empty one is the back end's error)."""
    return _config(Request.GET_CONFIG, payload)
