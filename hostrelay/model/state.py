"""A virtio-iommu device's state as bytes: the codec behind ``Relay.save_state``.

Sans-IO: :func:`encode` turns a :class:`DeviceState` into a blob and
:func:`decode` turns a blob back into one, refusing anything that is not a
state this version wrote (:class:`StateError`, with a message naming what is
wrong).  Nothing here knows a relay; :meth:`hostrelay.relay.Relay.restore_state`
checks the decoded state against the relay it lands in and replays it.

The format (``docs/state.md`` has it field by field), little-endian::

    magic      16 bytes   b"hostrelay-state\\n"
    version    u32        FORMAT_VERSION
    json_len   u32        length of the header
    body_len   u64        length of the binary tables
    header     json_len   UTF-8 JSON: every field by name, and the layout of
                          each binary table (offset, count, record format)
    body       body_len   the tables: mappings (32-byte records), fault records
    sha256     32 bytes   SHA-256 of everything before it

Self-describing: the JSON names every field and says where each table is
and how its records are laid out, so a reader can inspect a blob with
nothing but ``json`` and ``struct`` (``hostrelay state show`` does).  The
checksum catches corruption (storage, truncation, a bit flip); it is no
authentication.  A blob that passes it is still checked field by field here
and then request by request by the relay, so even a crafted one can only
make mappings the guest could have made itself.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from hostrelay.model.mapping import Mapping
from hostrelay.model.wire import FAULT_SIZE, MapFlag, U32_MAX, U64_MAX

__all__ = [
    "ConfigState",
    "DeviceState",
    "DomainState",
    "EndpointState",
    "FORMAT_VERSION",
    "MAGIC",
    "QueueState",
    "KNOWN_MAP_FLAGS",
    "RECORD_PROBLEMS",
    "RecordCheck",
    "StateError",
    "check_records",
    "decode",
    "encode",
    "header_of",
    "summary",
]

MAGIC = b"hostrelay-state\n"
FORMAT_VERSION = 1
FORMAT_NAME = "hostrelay virtio-iommu device state"
_PREFIX = struct.Struct("<16sIIQ")
_DIGEST = 32  # SHA-256
# One mapping: virt_start, virt_end (inclusive), phys_start, flags, padding.
_MAPPING = struct.Struct("<QQQI4x")
MAPPING_RECORD = "<QQQI4x"
MAPPING_SIZE = _MAPPING.size  # 32
MAPPING_FIELDS = ["virt_start", "virt_end", "phys_start", "flags"]
EVENT_RECORD = f"{FAULT_SIZE}s"
# Sanity bounds, far above anything a relay holds, so a corrupt length
# cannot make the reader allocate gigabytes before the checksum refuses it.
MAX_HEADER = 64 << 20
MAX_BODY = 1 << 36
ENDPOINT_KINDS = ("emulated", "vfio", "custom")
VFIO_BACKENDS = ("type1", "iommufd")


class StateError(ValueError):
    """A state blob this relay refuses: the message says what does not fit."""


@dataclass(frozen=True, slots=True)
class ConfigState:
    """Config space and features (virtio 1.2 §5.13.4) as the driver saw them."""

    page_size_mask: int
    input_range: tuple[int, int]
    domain_range: tuple[int, int]
    probe_size: int
    mmio: bool
    device_features: int
    driver_features: int | None  # None: the driver never acknowledged features
    bypass: bool


@dataclass(frozen=True, slots=True)
class EndpointState:
    """An endpoint: ``kind`` is ``emulated``, ``vfio`` (``bdf``, ``backend``) or ``custom`` (a VMM's backend)."""

    id: int
    kind: str
    bdf: str | None = None
    backend: str | None = None


@dataclass(frozen=True, slots=True)
class DomainState:
    """A live domain: its endpoints and every mapping, in IOVA order.

    ``records`` is the mapping table as the blob stores it (32 bytes a
    mapping, see :data:`MAPPING_RECORD`), so that saving and restoring 100 000
    mappings moves bytes, not objects; :attr:`mappings` decodes it.
    """

    id: int
    bypass: bool
    endpoints: tuple[int, ...]
    records: bytes = b""

    @property
    def count(self) -> int:
        """Number of mappings."""
        return len(self.records) // MAPPING_SIZE

    @property
    def mappings(self) -> tuple[Mapping, ...]:
        """The mappings, decoded."""
        return tuple(Mapping(*r) for r in _MAPPING.iter_unpack(self.records))

    def mapping(self, index: int) -> Mapping:
        """Mapping ``index``, decoded."""
        return Mapping(*_MAPPING.unpack_from(self.records, index * MAPPING_SIZE))

    @staticmethod
    def pack(mappings: Sequence[Mapping]) -> bytes:
        """``records`` for ``mappings``."""
        return b"".join(_MAPPING.pack(m.start, m.end, m.phys, m.flags) for m in mappings)


@dataclass(frozen=True, slots=True)
class QueueState:
    """A virtqueue's place in guest memory and the device's indices (vhost's vring base)."""

    index: int
    size: int
    desc: int
    avail: int
    used: int
    next_avail: int
    used_idx: int
    broken: bool


@dataclass(frozen=True, slots=True)
class DeviceState:
    """Everything a virtio-iommu device must keep across a snapshot."""

    config: ConfigState
    memory: tuple[tuple[int, int], ...]  # guest RAM as (gpa, size): what the mappings were made against
    endpoints: tuple[EndpointState, ...]
    domains: tuple[DomainState, ...]
    queues: tuple[QueueState, ...]
    events: tuple[bytes, ...]  # pending 24-byte fault records, oldest first
    dropped_events: int

    def mapping_count(self) -> int:
        """Mappings over every domain."""
        return sum(d.count for d in self.domains)


# --- encode -------------------------------------------------------------------------------------


def encode(state: DeviceState) -> bytes:
    """The blob for ``state`` (see the module docstring for the layout)."""
    c = state.config
    domains: list[dict[str, Any]] = []
    first = 0
    for d in state.domains:
        domains.append({"id": d.id, "bypass": d.bypass, "endpoints": list(d.endpoints), "mappings": [first, d.count]})
        first += d.count
    mappings = b"".join(d.records for d in state.domains)
    events = b"".join(state.events)
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": {
            "page_size_mask": c.page_size_mask,
            "input_range": list(c.input_range),
            "domain_range": list(c.domain_range),
            "probe_size": c.probe_size,
            "mmio": c.mmio,
            "device_features": c.device_features,
            "driver_features": c.driver_features,
            "bypass": c.bypass,
        },
        "memory": [list(r) for r in state.memory],
        "endpoints": [{"id": e.id, "kind": e.kind, "bdf": e.bdf, "backend": e.backend} for e in state.endpoints],
        "domains": domains,
        "queues": [
            {"index": q.index, "size": q.size, "desc": q.desc, "avail": q.avail, "used": q.used,
             "next_avail": q.next_avail, "used_idx": q.used_idx, "broken": q.broken}  # fmt: skip
            for q in state.queues
        ],
        "events": {"dropped": state.dropped_events},
        "tables": {
            "mappings": {"offset": 0, "count": first, "record": MAPPING_RECORD, "fields": MAPPING_FIELDS},
            "events": {"offset": len(mappings), "count": len(state.events), "record": EVENT_RECORD},
        },
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    body = mappings + events
    blob = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(text), len(body)) + text + body
    return blob + hashlib.sha256(blob).digest()


# --- decode -------------------------------------------------------------------------------------


def header_of(data: bytes | bytearray | memoryview) -> tuple[dict[str, Any], memoryview]:
    """Check framing, version and checksum; return the parsed JSON header and the body.

    Raises :class:`StateError` for anything but an intact blob of a known version.
    """
    view = memoryview(data).cast("B")
    if len(view) < _PREFIX.size + _DIGEST:
        raise StateError(f"truncated: {len(view)} bytes is shorter than an empty state ({_PREFIX.size + _DIGEST})")
    magic, version, json_len, body_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise StateError("not a hostrelay state (bad magic)")
    if version != FORMAT_VERSION:
        raise StateError(f"unknown state version {version}: this hostrelay reads version {FORMAT_VERSION}")
    if json_len > MAX_HEADER or body_len > MAX_BODY:
        raise StateError(f"corrupted: header of {json_len} or body of {body_len} bytes is past any real state")
    want = _PREFIX.size + json_len + body_len + _DIGEST
    if len(view) != want:
        what = "truncated" if len(view) < want else "trailing bytes"
        raise StateError(f"{what}: {len(view)} bytes, the prefix says {want}")
    end = want - _DIGEST
    if hashlib.sha256(view[:end]).digest() != bytes(view[end:]):
        raise StateError("corrupted: the SHA-256 checksum does not match")
    try:
        header = json.loads(bytes(view[_PREFIX.size:_PREFIX.size + json_len]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise StateError(f"corrupted: the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise StateError("corrupted: the header is not a JSON object")
    return header, view[_PREFIX.size + json_len:end]


#: ``check(records, count) -> (index, why)``: the index of the first bad
#: record (``count`` if none) and what is wrong with it.  The data plane
#: passes one in C (``hr_state_check``); :func:`check_records` is the same in Python.
RecordCheck = Callable[[memoryview, int], tuple[int, str]]


def decode(data: bytes | bytearray | memoryview, check: RecordCheck | None = None) -> DeviceState:
    """The :class:`DeviceState` in ``data``; :class:`StateError` for anything else.

    Beyond framing and checksum it checks what holds for every state a relay
    can save: field types and ranges, endpoints named once, each in at most
    one domain, every domain non-empty, mappings in order, within the
    domain range, not overlapping, none in a bypass domain, queues 0 and 1 at
    most once each with a power-of-two size.
    """
    header, body = header_of(data)
    h = _Obj(header, "header")
    h.keys({"format", "version", "config", "memory", "endpoints", "domains", "queues", "events", "tables"})
    if h.text("format") != FORMAT_NAME or h.num("version", U32_MAX) != FORMAT_VERSION:
        raise StateError("header: format or version does not match the prefix")
    config = _config(h.sub("config"))
    memory = tuple(_range_list(h.items("memory"), "memory"))
    endpoints = tuple(_endpoint(e, i) for i, e in enumerate(h.items("endpoints")))
    tables = h.sub("tables")
    tables.keys({"mappings", "events"})
    mt, et = tables.sub("mappings"), tables.sub("events")
    mt.keys({"offset", "count", "record", "fields"})
    et.keys({"offset", "count", "record"})
    if mt.text("record") != MAPPING_RECORD or mt.items("fields") != MAPPING_FIELDS or et.text("record") != EVENT_RECORD:
        raise StateError("tables: record layouts are not the ones version 1 defines")
    n_map, n_ev = mt.num("count", U32_MAX), et.num("count", U32_MAX)
    off_map, off_ev = mt.num("offset", U64_MAX), et.num("offset", U64_MAX)
    if off_map != 0 or off_ev != n_map * _MAPPING.size or len(body) != off_ev + n_ev * FAULT_SIZE:
        raise StateError("tables: offsets and counts do not describe the body")
    events = tuple(bytes(body[off_ev + i * FAULT_SIZE:off_ev + (i + 1) * FAULT_SIZE]) for i in range(n_ev))
    ev = h.sub("events")
    ev.keys({"dropped"})
    dropped = ev.num("dropped", U64_MAX)
    domains = _domains(h.items("domains"), endpoints, body[:off_ev], n_map, config, check or check_records)
    queues = tuple(_queue(q, i) for i, q in enumerate(h.items("queues")))
    if len({q.index for q in queues}) != len(queues):
        raise StateError("queues: a queue is named twice")
    return DeviceState(config, memory, endpoints, domains, queues, events, dropped)


class _Obj:
    """A JSON object read strictly: exact keys, exact types, bounded integers."""

    def __init__(self, value: object, where: str) -> None:
        if not isinstance(value, dict):
            raise StateError(f"{where}: not an object")
        self.d: dict[str, Any] = value
        self.where = where

    def keys(self, expected: set[str]) -> None:
        got = set(self.d)
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            raise StateError(f"{self.where}: missing {missing} / unknown {extra} fields")

    def _get(self, key: str) -> Any:
        if key not in self.d:
            raise StateError(f"{self.where}: no field {key!r}")
        return self.d[key]

    def num(self, key: str, top: int) -> int:
        return _int(self._get(key), top, f"{self.where}.{key}")

    def opt_num(self, key: str, top: int) -> int | None:
        v = self._get(key)
        return None if v is None else _int(v, top, f"{self.where}.{key}")

    def flag(self, key: str) -> bool:
        v = self._get(key)
        if type(v) is not bool:
            raise StateError(f"{self.where}.{key}: not true/false")
        return v

    def text(self, key: str) -> str:
        v = self._get(key)
        if type(v) is not str:
            raise StateError(f"{self.where}.{key}: not a string")
        return v

    def opt_text(self, key: str) -> str | None:
        v = self._get(key)
        if v is not None and type(v) is not str:
            raise StateError(f"{self.where}.{key}: not a string")
        return v

    def items(self, key: str) -> list[Any]:
        v = self._get(key)
        if type(v) is not list:
            raise StateError(f"{self.where}.{key}: not a list")
        return v

    def sub(self, key: str) -> _Obj:
        return _Obj(self._get(key), f"{self.where}.{key}")

    def pair(self, key: str, top: int) -> tuple[int, int]:
        v = self.items(key)
        if len(v) != 2:
            raise StateError(f"{self.where}.{key}: not a [start, end] pair")
        lo, hi = _int(v[0], top, f"{self.where}.{key}"), _int(v[1], top, f"{self.where}.{key}")
        if lo > hi:
            raise StateError(f"{self.where}.{key}: start {lo:#x} is past end {hi:#x}")
        return lo, hi


def _int(v: object, top: int, where: str) -> int:
    if type(v) is not int or not 0 <= v <= top:
        raise StateError(f"{where}: {v!r} is not an integer in [0, {top:#x}]")
    return v


def _config(o: _Obj) -> ConfigState:
    o.keys({"page_size_mask", "input_range", "domain_range", "probe_size", "mmio", "device_features",
            "driver_features", "bypass"})  # fmt: skip
    mask = o.num("page_size_mask", U64_MAX)
    if mask == 0:
        raise StateError("config.page_size_mask: zero")
    return ConfigState(mask, o.pair("input_range", U64_MAX), o.pair("domain_range", U32_MAX),
                       o.num("probe_size", U32_MAX), o.flag("mmio"), o.num("device_features", U64_MAX),
                       o.opt_num("driver_features", U64_MAX), o.flag("bypass"))  # fmt: skip


def _range_list(items: Sequence[object], where: str) -> Iterator[tuple[int, int]]:
    prev_end = -1
    for i, v in enumerate(items):
        if type(v) is not list or len(v) != 2:
            raise StateError(f"{where}[{i}]: not a [gpa, size] pair")
        gpa, size = _int(v[0], U64_MAX, f"{where}[{i}]"), _int(v[1], U64_MAX, f"{where}[{i}]")
        if size == 0 or gpa + size - 1 > U64_MAX or gpa <= prev_end:
            raise StateError(f"{where}[{i}]: [{gpa:#x}, +{size:#x}] is empty, wraps or is out of order")
        prev_end = gpa + size - 1
        yield gpa, size


def _endpoint(v: object, i: int) -> EndpointState:
    o = _Obj(v, f"endpoints[{i}]")
    o.keys({"id", "kind", "bdf", "backend"})
    kind, bdf, backend = o.text("kind"), o.opt_text("bdf"), o.opt_text("backend")
    if kind not in ENDPOINT_KINDS:
        raise StateError(f"endpoints[{i}].kind: {kind!r} is none of {', '.join(ENDPOINT_KINDS)}")
    if (kind == "vfio") != (bdf is not None) or (kind == "vfio") != (backend in VFIO_BACKENDS):
        raise StateError(f"endpoints[{i}]: a VFIO endpoint and only one has a bdf and a backend")
    return EndpointState(o.num("id", U32_MAX), kind, bdf, backend)


def _domains(items: list[Any], endpoints: tuple[EndpointState, ...], table: memoryview, n_map: int,
             config: ConfigState, check: RecordCheck) -> tuple[DomainState, ...]:  # fmt: skip
    known = {e.id for e in endpoints}
    if len(known) != len(endpoints):
        raise StateError("endpoints: an endpoint is named twice")
    placed: set[int] = set()
    seen: set[int] = set()
    out: list[DomainState] = []
    next_first = 0
    lo, hi = config.domain_range
    for i, v in enumerate(items):
        o = _Obj(v, f"domains[{i}]")
        o.keys({"id", "bypass", "endpoints", "mappings"})
        dom_id, bypass = o.num("id", U32_MAX), o.flag("bypass")
        where = f"domain {dom_id}"
        if dom_id in seen:
            raise StateError(f"{where}: named twice")
        if not lo <= dom_id <= hi:
            raise StateError(f"{where}: outside the domain range [{lo}, {hi}]")
        seen.add(dom_id)
        eps = tuple(_int(e, U32_MAX, f"{where} endpoints") for e in o.items("endpoints"))
        if not eps:
            raise StateError(f"{where}: no endpoint (a domain lives only while one is attached)")
        for e in eps:
            if e not in known:
                raise StateError(f"{where}: endpoint {e:#x} is not among the state's endpoints")
            if e in placed:
                raise StateError(f"{where}: endpoint {e:#x} is in two domains")
            placed.add(e)
        span = o.items("mappings")
        if len(span) != 2:
            raise StateError(f"{where}: mappings is not a [first, count] pair")
        first, count = _int(span[0], U32_MAX, f"{where} mappings"), _int(span[1], U32_MAX, f"{where} mappings")
        if first != next_first or first + count > n_map:
            raise StateError(f"{where}: its mappings [{first}, +{count}] are not the next ones of the table")
        next_first = first + count
        if bypass and count:
            raise StateError(f"{where}: a bypass domain has {count} mappings (MAP is refused there)")
        records = table[first * MAPPING_SIZE:(first + count) * MAPPING_SIZE]
        bad, why = check(records, count)
        if bad != count:
            m = Mapping(*_MAPPING.unpack_from(records, bad * MAPPING_SIZE))
            raise StateError(f"{where}: mapping [{m.start:#x}, {m.end:#x}] -> {m.phys:#x}: {why}")
        out.append(DomainState(dom_id, bypass, eps, bytes(records)))
    if next_first != n_map:
        raise StateError(f"tables.mappings: {n_map - next_first} mappings belong to no domain")
    return tuple(out)


KNOWN_MAP_FLAGS = int(MapFlag.READ | MapFlag.WRITE | MapFlag.MMIO)
#: What :func:`check_records` and ``hr_state_check`` say of a bad record, by reason.
RECORD_PROBLEMS = {
    1: "ends before it starts",
    2: "overlaps the one before it or is out of IOVA order",
    3: "wraps guest-physical space",
    4: "has unknown flags",
    5: "has non-zero padding",
}


def check_records(records: memoryview, count: int) -> tuple[int, str]:
    """What every saved table satisfies: ``(index of the first bad record or count, why)``."""
    prev_end = -1
    for i, (start, end, phys, flags) in enumerate(_MAPPING.iter_unpack(records)):
        why = 0
        if end < start:
            why = 1
        elif start <= prev_end:
            why = 2
        elif phys + (end - start) > U64_MAX:
            why = 3
        elif flags & ~KNOWN_MAP_FLAGS:
            why = 4
        elif bytes(records[i * MAPPING_SIZE + 28:(i + 1) * MAPPING_SIZE]) != bytes(4):
            why = 5
        if why:
            return i, RECORD_PROBLEMS[why]
        prev_end = end
    return count, ""


def _queue(v: object, i: int) -> QueueState:
    o = _Obj(v, f"queues[{i}]")
    o.keys({"index", "size", "desc", "avail", "used", "next_avail", "used_idx", "broken"})
    index, size = o.num("index", 1), o.num("size", 32768)
    if size == 0 or size & (size - 1):
        raise StateError(f"queue {index}: size {size} is not a power of two")
    return QueueState(index, size, o.num("desc", U64_MAX), o.num("avail", U64_MAX), o.num("used", U64_MAX),
                      o.num("next_avail", 0xFFFF), o.num("used_idx", 0xFFFF), o.flag("broken"))  # fmt: skip


def summary(state: DeviceState) -> list[str]:
    """What a state holds, a line each (``hostrelay state show``)."""
    c = state.config
    feats = "not acknowledged" if c.driver_features is None else f"{c.driver_features:#x}"
    lines = [
        f"config: bypass {int(c.bypass)}, page_size_mask {c.page_size_mask:#x}, input_range "
        f"[{c.input_range[0]:#x}, {c.input_range[1]:#x}], driver features {feats}",
        "guest RAM: " + (", ".join(f"{g:#x}+{s:#x}" for g, s in state.memory) or "none"),
    ]
    for e in state.endpoints:
        lines.append(f"endpoint {e.id:#x}: {e.kind}" + (f" {e.bdf} ({e.backend})" if e.bdf else ""))
    for d in state.domains:
        size = sum(m.size for m in d.mappings)
        eps = ", ".join(f"{e:#x}" for e in d.endpoints)
        kind = "bypass" if d.bypass else f"{len(d.mappings)} mappings, {size:#x} bytes"
        lines.append(f"domain {d.id}: endpoints {eps}; {kind}")
    for q in state.queues:
        lines.append(f"queue {q.index}: size {q.size}, next avail {q.next_avail}, used {q.used_idx}"
                     + (", stopped (needs reset)" if q.broken else ""))  # fmt: skip
    lines.append(f"fault records: {len(state.events)} pending, {state.dropped_events} dropped")
    return lines
