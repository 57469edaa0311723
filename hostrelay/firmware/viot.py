"""The ACPI Virtual I/O Translation Table (VIOT): build and parse, sans-IO.

A VIOT tells the guest which PCI function is a virtio-iommu and which
endpoints it manages (the ACPI specification's "Virtual I/O Translation
Table (VIOT)" section, new in ACPI 6.4).
Without one, Linux binds the virtio-iommu driver but puts no endpoint behind
it.  QEMU generates the table itself for its own ``virtio-iommu-pci``; a
virtio-iommu served out of process (vhost-user) needs one given with
``-acpitable file=``, which is what :func:`build` writes.

Layout (all little endian; offsets from the start of the table / node):

- the System Description Table Header, 36 bytes: signature ``VIOT`` (0, 4),
  length (4, 4), revision (8, 1), checksum (9, 1), OEM ID (10, 6), OEM table
  ID (16, 8), OEM revision (24, 4), creator ID (28, 4), creator revision
  (32, 4);
- node count (36, 2), node offset (38, 2), reserved (40, 8): 48 bytes;
- the nodes, each starting with type (0, 1), reserved (1, 1), length (2, 2):

  - type 3, virtio-pci IOMMU, 16 bytes: PCI segment (4, 2), PCI BDF (6, 2),
    reserved (8, 8);
  - type 1, PCI range, 24 bytes: endpoint start (4, 4), PCI segment start
    (8, 2) and end (10, 2), PCI BDF start (12, 2) and end (14, 2), output
    node (16, 2: the offset of the IOMMU node from the start of the table),
    reserved (18, 6).

  Types 2 (MMIO endpoint) and 4 (virtio-mmio IOMMU) exist too; this module
  handles PCI only, as q35 guests have nothing else.

The same layout as ACPICA's ``struct acpi_table_viot`` / ``acpi_viot_*`` in
Linux's include/acpi/actbl3.h (since 5.13).  How Linux 6.12 reads it
(drivers/acpi/viot.c) decides what :func:`parse` refuses: a node must start
at or after the 48-byte header and end inside the table, be at least as long
as its type's structure, and a range's output node must be an IOMMU node;
an endpoint inside a range gets the endpoint ID
``((segment - segment_start) << 16) + bdf - bdf_start + endpoint_start``.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field, replace

SIGNATURE = b"VIOT"
# The ACPI System Description Table Header (ACPI 6.4 §5.2.6, unchanged since ACPI 1.0).
ACPI_HEADER_SIZE = 36
# That header plus node count, node offset and 8 reserved bytes.
VIOT_HEADER_SIZE = 48
# The one revision of the table ACPI 6.4 and 6.5 define; QEMU 7.2 emits it.
REVISION = 0

NODE_PCI_RANGE = 1
NODE_MMIO = 2
NODE_VIRTIO_IOMMU_PCI = 3
NODE_VIRTIO_IOMMU_MMIO = 4
NODE_HEADER_SIZE = 4
PCI_RANGE_SIZE = 24
VIRTIO_IOMMU_PCI_SIZE = 16

_ACPI_HEADER = struct.Struct("<4sIBB6s8sI4sI")
_VIOT_FIELDS = struct.Struct("<HH8s")
_NODE_HEADER = struct.Struct("<BBH")
_IOMMU_PCI = struct.Struct("<BBHHH8s")
_PCI_RANGE = struct.Struct("<BBHIHHHHH6s")
assert _ACPI_HEADER.size == ACPI_HEADER_SIZE and ACPI_HEADER_SIZE + _VIOT_FIELDS.size == VIOT_HEADER_SIZE
assert _IOMMU_PCI.size == VIRTIO_IOMMU_PCI_SIZE and _PCI_RANGE.size == PCI_RANGE_SIZE

# The identification hostrelay's tables carry.  They are not QEMU's
# ("BOCHS " / "BXPC"), so a guest's boot log (`ACPI: VIOT 0x... (v00 HRELAY
# HRVIOT ...)`) shows whose table it read.  Padded with spaces as QEMU pads
# its own; the creator revision counts changes to this builder's output.
DEFAULT_OEM_ID = "HRELAY"
DEFAULT_OEM_TABLE_ID = "HRVIOT"
DEFAULT_OEM_REVISION = 1
DEFAULT_CREATOR_ID = "HRLY"
DEFAULT_CREATOR_REVISION = 1

_NODE_NAMES = {NODE_PCI_RANGE: "PCI range", NODE_MMIO: "MMIO endpoint",
               NODE_VIRTIO_IOMMU_PCI: "virtio-pci IOMMU", NODE_VIRTIO_IOMMU_MMIO: "virtio-mmio IOMMU"}  # fmt: skip


class ViotError(ValueError):
    """A VIOT that cannot be built, or bytes that are not a valid VIOT; the message says which field and why."""


_BDF_RE = re.compile(r"^(?:(?P<seg>[0-9a-fA-F]{1,4}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<dev>[0-9a-fA-F]{1,2})\.(?P<fn>[0-7])$")


@dataclass(frozen=True, order=True)
class Bdf:
    """A PCI function's address: segment (domain), bus, device, function."""

    segment: int
    bus: int
    device: int
    function: int

    def __post_init__(self) -> None:
        for name, value, top in (("segment", self.segment, 0xFFFF), ("bus", self.bus, 0xFF),
                                 ("device", self.device, 0x1F), ("function", self.function, 7)):  # fmt: skip
            if not 0 <= value <= top:
                raise ViotError(f"PCI {name} {value:#x} is out of range (0..{top:#x})")

    @classmethod
    def parse(cls, text: str) -> Bdf:
        """``[SSSS:]BB:DD.F`` in hex, as lspci and sysfs write it; the segment defaults to 0."""
        m = _BDF_RE.match(text.strip())
        if m is None:
            raise ViotError(f"{text!r} is not a PCI address: expected [SSSS:]BB:DD.F in hex (e.g. 0000:00:03.0)")
        return cls(int(m["seg"] or "0", 16), int(m["bus"], 16), int(m["dev"], 16), int(m["fn"]))

    @classmethod
    def from_id(cls, segment: int, bdf: int) -> Bdf:
        """From a segment and a 16-bit ``bus << 8 | device << 3 | function``."""
        if not 0 <= bdf <= 0xFFFF:
            raise ViotError(f"PCI BDF {bdf:#x} is out of range (0..0xffff)")
        return cls(segment, bdf >> 8, (bdf >> 3) & 0x1F, bdf & 7)

    @property
    def bdf(self) -> int:
        """The 16-bit ``bus << 8 | devfn``: the PCI requester ID, which is also the endpoint ID
        QEMU 7.2's virtio-iommu uses for a function on segment 0 (``PCI_BUILD_BDF``)."""
        return self.bus << 8 | self.device << 3 | self.function

    def __str__(self) -> str:
        return f"{self.segment:04x}:{self.bus:02x}:{self.device:02x}.{self.function:x}"


@dataclass(frozen=True)
class VirtioPciIommu:
    """A type 3 node: the virtio-iommu is this PCI function."""

    address: Bdf


@dataclass(frozen=True)
class PciRange:
    """A type 1 node: PCI functions ``bdf_start..bdf_end`` of every segment in
    ``segment_start..segment_end`` are managed by ``iommus[iommu]``, with
    endpoint IDs counted from ``endpoint_start``."""

    segment_start: int
    segment_end: int
    bdf_start: int
    bdf_end: int
    endpoint_start: int
    iommu: int = 0

    def __post_init__(self) -> None:
        for name, value, top in (("segment start", self.segment_start, 0xFFFF), ("segment end", self.segment_end, 0xFFFF),
                                 ("BDF start", self.bdf_start, 0xFFFF), ("BDF end", self.bdf_end, 0xFFFF),
                                 ("endpoint start", self.endpoint_start, 0xFFFFFFFF)):  # fmt: skip
            if not 0 <= value <= top:
                raise ViotError(f"PCI range {name} {value:#x} is out of range (0..{top:#x})")
        if self.segment_start > self.segment_end:
            raise ViotError(f"PCI range segments are inverted: {self.segment_start:#x} > {self.segment_end:#x}")
        if self.bdf_start > self.bdf_end:
            raise ViotError(f"PCI range is inverted: {Bdf.from_id(self.segment_start, self.bdf_start)} comes after "
                            f"{Bdf.from_id(self.segment_start, self.bdf_end)}")  # fmt: skip
        if self.last_endpoint > 0xFFFFFFFF:
            raise ViotError(f"PCI range endpoint IDs overflow 32 bits: {self.endpoint_start:#x} + the range's "
                            f"span ends at {self.last_endpoint:#x}")  # fmt: skip
        if self.iommu < 0:
            raise ViotError(f"PCI range output IOMMU index {self.iommu} is negative")

    @classmethod
    def between(cls, first: Bdf, last: Bdf, *, endpoint_start: int | None = None, iommu: int = 0) -> PciRange:
        """Functions ``first..last`` (inclusive, one segment).  The endpoint IDs default to the
        functions' requester IDs, what the virtio-iommu sees and QEMU 7.2 writes for its own device."""
        if first.segment != last.segment:
            raise ViotError(f"PCI range {first}-{last} spans segments: a range's BDFs apply per segment, "
                            "give one range per segment")  # fmt: skip
        if first > last:
            raise ViotError(f"PCI range is inverted: {first} comes after {last}")
        start = first.bdf if endpoint_start is None else endpoint_start
        return cls(first.segment, first.segment, first.bdf, last.bdf, start, iommu)

    @property
    def last_endpoint(self) -> int:
        """The endpoint ID of the range's last function (Linux 6.12's formula, below)."""
        return ((self.segment_end - self.segment_start) << 16) + self.bdf_end - self.bdf_start + self.endpoint_start

    def contains(self, address: Bdf) -> bool:
        """Whether ``address`` falls in this range."""
        return (self.segment_start <= address.segment <= self.segment_end
                and self.bdf_start <= address.bdf <= self.bdf_end)  # fmt: skip

    def endpoint_id(self, address: Bdf) -> int:
        """The endpoint ID the guest gives ``address`` (Linux 6.12 drivers/acpi/viot.c,
        viot_pci_dev_iommu_init): segment offset << 16 + BDF offset + endpoint start."""
        if not self.contains(address):
            raise ViotError(f"{address} is not in the PCI range {self.describe()}")
        return ((address.segment - self.segment_start) << 16) + address.bdf - self.bdf_start + self.endpoint_start

    def describe(self) -> str:
        """``SSSS:BB:DD.F-SSSS:BB:DD.F`` (with ``segments a-b`` when it spans several)."""
        first, last = Bdf.from_id(self.segment_start, self.bdf_start), Bdf.from_id(self.segment_start, self.bdf_end)
        text = f"{first}-{last}"
        if self.segment_end != self.segment_start:
            text = f"{first.bus:02x}:{first.device:02x}.{first.function:x}-{last.bus:02x}:{last.device:02x}.{last.function:x} " \
                   f"on segments {self.segment_start:04x}-{self.segment_end:04x}"  # fmt: skip
        return text

    def _overlaps(self, other: PciRange) -> bool:
        return (self.segment_start <= other.segment_end and other.segment_start <= self.segment_end
                and self.bdf_start <= other.bdf_end and other.bdf_start <= self.bdf_end)  # fmt: skip


def _ident(name: str, value: str, width: int) -> str:
    try:
        value.encode("ascii")
    except UnicodeEncodeError:
        raise ViotError(f"{name} {value!r} is not ASCII") from None
    if len(value) > width:
        raise ViotError(f"{name} {value!r} is longer than its {width} bytes")
    return value.ljust(width)


@dataclass(frozen=True)
class ViotTable:
    """A whole VIOT: its IOMMUs, the PCI ranges they manage, the header's identification.

    The identification strings are padded with spaces to their ACPI widths
    (6, 8 and 4 bytes), so a table parsed back compares equal to the one built.
    """

    iommus: tuple[VirtioPciIommu, ...]
    ranges: tuple[PciRange, ...] = ()
    oem_id: str = DEFAULT_OEM_ID
    oem_table_id: str = DEFAULT_OEM_TABLE_ID
    oem_revision: int = DEFAULT_OEM_REVISION
    creator_id: str = DEFAULT_CREATOR_ID
    creator_revision: int = DEFAULT_CREATOR_REVISION
    revision: int = field(default=REVISION)

    def __post_init__(self) -> None:
        object.__setattr__(self, "iommus", tuple(self.iommus))
        object.__setattr__(self, "ranges", tuple(self.ranges))
        object.__setattr__(self, "oem_id", _ident("OEM ID", self.oem_id, 6))
        object.__setattr__(self, "oem_table_id", _ident("OEM table ID", self.oem_table_id, 8))
        object.__setattr__(self, "creator_id", _ident("creator ID", self.creator_id, 4))
        for name, value in (("OEM revision", self.oem_revision), ("creator revision", self.creator_revision)):
            if not 0 <= value <= 0xFFFFFFFF:
                raise ViotError(f"{name} {value:#x} does not fit 32 bits")
        if self.revision != REVISION:
            raise ViotError(f"VIOT revision {self.revision} is not the one ACPI defines ({REVISION})")
        if not self.iommus:
            raise ViotError("a VIOT needs at least one IOMMU node")
        seen: dict[Bdf, int] = {}
        for i, iommu in enumerate(self.iommus):
            if iommu.address in seen:
                raise ViotError(f"IOMMU {iommu.address} is described twice (IOMMU nodes {seen[iommu.address]} and {i})")
            seen[iommu.address] = i
        for r in self.ranges:
            if r.iommu >= len(self.iommus):
                raise ViotError(f"PCI range {r.describe()} points to IOMMU {r.iommu}, but the table has "
                                f"{len(self.iommus)}")  # fmt: skip
        # Linux 6.12 keeps the ranges in a list and takes the first that
        # matches, in reverse table order (list_add): an endpoint in two
        # ranges would get whichever the guest happens to try first.
        for i, a in enumerate(self.ranges):
            for b in self.ranges[i + 1:]:
                if a._overlaps(b):
                    raise ViotError(f"PCI ranges {a.describe()} and {b.describe()} overlap: an endpoint would have two IOMMUs or IDs")

    def ranges_containing_iommus(self) -> list[tuple[PciRange, VirtioPciIommu]]:
        """(range, IOMMU) pairs where a range covers an IOMMU's own function.

        Linux 6.12 ignores such an entry for the IOMMU itself ("We're not
        translating ourself", viot_dev_iommu_init) and QEMU 7.2 emits one (its
        range covers the whole root bus, the virtio-iommu included), but a
        table written by hand that does so is more likely a mistake.
        """
        return [(r, i) for r in self.ranges for i in self.iommus if r.contains(i.address)]

    def endpoint_id(self, address: Bdf) -> tuple[int, VirtioPciIommu] | None:
        """The endpoint ID and IOMMU the guest gives ``address``, or None if no range covers it."""
        for r in self.ranges:
            if r.contains(address):
                return r.endpoint_id(address), self.iommus[r.iommu]
        return None

    def node_offsets(self) -> tuple[list[int], list[int]]:
        """Where :func:`build` puts each IOMMU node and each range node (IOMMUs first, as QEMU does)."""
        iommu_at = [VIOT_HEADER_SIZE + VIRTIO_IOMMU_PCI_SIZE * i for i in range(len(self.iommus))]
        first_range = VIOT_HEADER_SIZE + VIRTIO_IOMMU_PCI_SIZE * len(self.iommus)
        return iommu_at, [first_range + PCI_RANGE_SIZE * i for i in range(len(self.ranges))]

    @property
    def length(self) -> int:
        """The table's length in bytes, header included."""
        return VIOT_HEADER_SIZE + VIRTIO_IOMMU_PCI_SIZE * len(self.iommus) + PCI_RANGE_SIZE * len(self.ranges)


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` (with its checksum byte zero) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def build(table: ViotTable, *, allow_iommu_in_range: bool = False) -> bytes:
    """The complete VIOT, header and checksum included, for ``-acpitable file=``.

    QEMU 7.2's ``-acpitable file=`` takes the file's own header and warns when
    its length field differs from the file's size (hw/acpi/core.c,
    acpi_table_install), so the length here is exact.  A range that covers
    an IOMMU's own function is refused unless ``allow_iommu_in_range`` (see
    :meth:`ViotTable.ranges_containing_iommus`).
    """
    if not allow_iommu_in_range:
        clash = table.ranges_containing_iommus()
        if clash:
            r, iommu = clash[0]
            raise ViotError(f"PCI range {r.describe()} contains the IOMMU {iommu.address} itself: "
                            "the virtio-iommu cannot translate its own DMA")  # fmt: skip
    iommu_at, _ = table.node_offsets()
    body = bytearray(_VIOT_FIELDS.pack(len(table.iommus) + len(table.ranges), VIOT_HEADER_SIZE, bytes(8)))
    for iommu in table.iommus:
        body += _IOMMU_PCI.pack(NODE_VIRTIO_IOMMU_PCI, 0, VIRTIO_IOMMU_PCI_SIZE, iommu.address.segment,
                                iommu.address.bdf, bytes(8))  # fmt: skip
    for r in table.ranges:
        body += _PCI_RANGE.pack(NODE_PCI_RANGE, 0, PCI_RANGE_SIZE, r.endpoint_start, r.segment_start, r.segment_end,
                                r.bdf_start, r.bdf_end, iommu_at[r.iommu], bytes(6))  # fmt: skip
    header = _ACPI_HEADER.pack(SIGNATURE, ACPI_HEADER_SIZE + len(body), table.revision, 0,
                               table.oem_id.encode("ascii"), table.oem_table_id.encode("ascii"), table.oem_revision,
                               table.creator_id.encode("ascii"), table.creator_revision)  # fmt: skip
    data = bytearray(header + body)
    data[9] = checksum(data)
    assert len(data) == table.length
    return bytes(data)


def _ascii(name: str, raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise ViotError(f"{name} {raw!r} is not ASCII") from None


def parse(data: bytes) -> ViotTable:
    """Decode and check a VIOT: signature, length, checksum, revision, every node's
    type, length, bounds and reserved bytes, every output node.  Raises :class:`ViotError`."""
    data = bytes(data)
    if len(data) < ACPI_HEADER_SIZE:
        raise ViotError(f"{len(data)} bytes is shorter than the {ACPI_HEADER_SIZE}-byte ACPI table header")
    sig, length, revision, _csum, oem_id, oem_table_id, oem_rev, creator_id, creator_rev = _ACPI_HEADER.unpack_from(data)
    if sig != SIGNATURE:
        raise ViotError(f"signature {sig!r} is not {SIGNATURE!r}")
    if length != len(data):
        what = "truncated" if length > len(data) else "followed by extra bytes"
        raise ViotError(f"header length {length} differs from the {len(data)} bytes given (table {what})")
    if length < VIOT_HEADER_SIZE:
        raise ViotError(f"length {length} is shorter than the {VIOT_HEADER_SIZE}-byte VIOT header")
    if sum(data) & 0xFF:
        right = checksum(data[:9] + bytes(1) + data[10:])
        raise ViotError(f"checksum byte {data[9]:#04x} is wrong: the table sums to {sum(data) & 0xFF:#04x} mod 256, "
                        f"not 0 (it should be {right:#04x})")  # fmt: skip
    if revision != REVISION:
        raise ViotError(f"revision {revision} is unknown (ACPI defines VIOT revision {REVISION})")
    count, offset, reserved = _VIOT_FIELDS.unpack_from(data, ACPI_HEADER_SIZE)
    if any(reserved):
        raise ViotError(f"reserved bytes 40-47 of the header are not zero: {reserved.hex()}")
    if count == 0:
        raise ViotError("node count is 0: the table describes no IOMMU")
    if offset < VIOT_HEADER_SIZE:
        raise ViotError(f"node offset {offset:#x} overlaps the {VIOT_HEADER_SIZE}-byte header")
    nodes: list[tuple[int, int]] = []  # (offset, type)
    at = offset
    for i in range(count):
        if at + NODE_HEADER_SIZE > length:
            raise ViotError(f"node {i} of {count} at {at:#x} starts past the table's end ({length:#x})")
        kind, rsv, size = _NODE_HEADER.unpack_from(data, at)
        if size < NODE_HEADER_SIZE:
            raise ViotError(f"node {i} at {at:#x} has length {size}, less than its own {NODE_HEADER_SIZE}-byte header")
        if at + size > length:
            raise ViotError(f"node {i} at {at:#x} (length {size}) runs past the table's end ({length:#x})")
        if kind in (NODE_MMIO, NODE_VIRTIO_IOMMU_MMIO):
            raise ViotError(f"node {i} at {at:#x} is a {_NODE_NAMES[kind]} node (type {kind}): only PCI nodes "
                            f"(types {NODE_PCI_RANGE} and {NODE_VIRTIO_IOMMU_PCI}) are supported")  # fmt: skip
        if kind not in (NODE_PCI_RANGE, NODE_VIRTIO_IOMMU_PCI):
            raise ViotError(f"node {i} at {at:#x} has reserved type {kind}")
        want = PCI_RANGE_SIZE if kind == NODE_PCI_RANGE else VIRTIO_IOMMU_PCI_SIZE
        if size != want:
            raise ViotError(f"node {i} at {at:#x}, a {_NODE_NAMES[kind]}, has length {size}, not {want}")
        if rsv:
            raise ViotError(f"node {i} at {at:#x}: reserved byte 1 is {rsv:#04x}, not zero")
        nodes.append((at, kind))
        at += size
    if at != length:
        raise ViotError(f"{length - at} bytes follow the last of the {count} nodes (table ends at {length:#x}, "
                        f"nodes at {at:#x})")  # fmt: skip
    iommus: list[VirtioPciIommu] = []
    iommu_index: dict[int, int] = {}
    for at, kind in nodes:
        if kind == NODE_VIRTIO_IOMMU_PCI:
            _t, _r, _l, segment, bdf, rsv8 = _IOMMU_PCI.unpack_from(data, at)
            if any(rsv8):
                raise ViotError(f"virtio-pci IOMMU node at {at:#x}: reserved bytes 8-15 are not zero: {rsv8.hex()}")
            iommu_index[at] = len(iommus)
            iommus.append(VirtioPciIommu(Bdf.from_id(segment, bdf)))
    ranges: list[PciRange] = []
    for at, kind in nodes:
        if kind == NODE_PCI_RANGE:
            _t, _r, _l, ep, seg0, seg1, bdf0, bdf1, output, rsv6 = _PCI_RANGE.unpack_from(data, at)
            if any(rsv6):
                raise ViotError(f"PCI range node at {at:#x}: reserved bytes 18-23 are not zero: {rsv6.hex()}")
            if output not in iommu_index:
                targets = ", ".join(f"{o:#x}" for o in iommu_index) or "none"
                raise ViotError(f"PCI range node at {at:#x}: output node {output:#x} is not an IOMMU node "
                                f"(IOMMU nodes at: {targets})")  # fmt: skip
            try:
                ranges.append(PciRange(seg0, seg1, bdf0, bdf1, ep, iommu_index[output]))
            except ViotError as exc:
                raise ViotError(f"PCI range node at {at:#x}: {exc}") from None
    return ViotTable(tuple(iommus), tuple(ranges), _ascii("OEM ID", oem_id), _ascii("OEM table ID", oem_table_id),
                     oem_rev, _ascii("creator ID", creator_id), creator_rev, revision)  # fmt: skip


def with_ids_of(table: ViotTable, other: ViotTable) -> ViotTable:
    """``table`` with ``other``'s header identification (OEM and creator fields)."""
    return replace(table, oem_id=other.oem_id, oem_table_id=other.oem_table_id, oem_revision=other.oem_revision,
                   creator_id=other.creator_id, creator_revision=other.creator_revision)  # fmt: skip


def summary(table: ViotTable) -> list[str]:
    """Human-readable lines: the header, then each node at the offset :func:`build` gives it."""
    iommu_at, range_at = table.node_offsets()
    lines = [f"VIOT revision {table.revision}, {table.length} bytes, {len(table.iommus) + len(table.ranges)} nodes; "
             f"OEM {table.oem_id!r} {table.oem_table_id!r} rev {table.oem_revision}, "
             f"creator {table.creator_id!r} rev {table.creator_revision}"]  # fmt: skip
    for at, iommu in zip(iommu_at, table.iommus, strict=True):
        lines.append(f"  node {at:#06x}: virtio-pci IOMMU {iommu.address}")
    for at, r in zip(range_at, table.ranges, strict=True):
        lines.append(f"  node {at:#06x}: PCI range {r.describe()} -> endpoint IDs "
                     f"{r.endpoint_start:#x}-{r.last_endpoint:#x}, IOMMU {table.iommus[r.iommu].address} "
                     f"(node {iommu_at[r.iommu]:#06x})")  # fmt: skip
    return lines
