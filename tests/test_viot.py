"""The ACPI VIOT builder and parser (hostrelay.firmware.viot) and ``hostrelay viot``.

The expected layouts here are written from outside the code under test:
byte offsets and sizes from the ACPI System Description Table Header and
ACPICA's VIOT structures (Linux include/acpi/actbl3.h: acpi_table_viot,
acpi_viot_header, acpi_viot_pci_range, acpi_viot_virtio_iommu_pci), and the
``iasl -d`` disassembly of QEMU-generated VIOTs posted with QEMU's VIOT
series (qemu-devel, Aug 2021).  The last test reads the VIOT QEMU 7.2 itself
generated for its virtio-iommu-pci, inside the testbed guest, and rebuilds it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from hostrelay.cli import main
from hostrelay.firmware.viot import (
    Bdf,
    PciRange,
    ViotError,
    ViotTable,
    VirtioPciIommu,
    build,
    parse,
    with_ids_of,
)

# Offsets from the start of the table (ACPI header, then VIOT's own fields).
SIG, LENGTH, REV, CSUM, OEM_ID, OEM_TABLE_ID, OEM_REV, CREATOR_ID, CREATOR_REV = 0, 4, 8, 9, 10, 16, 24, 28, 32
NODE_COUNT, NODE_OFFSET, HDR_RESERVED, FIRST_NODE = 36, 38, 40, 48


def _u16(data: bytes, at: int) -> int:
    return int(struct.unpack_from("<H", data, at)[0])


def _u32(data: bytes, at: int) -> int:
    return int(struct.unpack_from("<I", data, at)[0])


def _simple() -> ViotTable:
    return ViotTable((VirtioPciIommu(Bdf(0, 0, 2, 0)),), (PciRange.between(Bdf(0, 0, 3, 0), Bdf(0, 0, 5, 7)),))


def _acpi_table(body: bytes, *, revision: int = 0) -> bytes:
    """An ACPI table around ``body`` (which starts at offset 36), with the checksum computed here."""
    header = bytearray(b"VIOT" + struct.pack("<I", 36 + len(body)) + bytes([revision, 0]) + b"BOCHS " + b"BXPC    "
                       + struct.pack("<I", 1) + b"BXPC" + struct.pack("<I", 1))  # fmt: skip
    data = header + body
    data[CSUM] = (256 - sum(data) % 256) % 256
    return bytes(data)


def _resum(data: bytes | bytearray) -> bytes:
    """Fix the checksum after a mutation, so the check under test is the one that fires."""
    out = bytearray(data)
    out[CSUM] = 0
    out[CSUM] = (256 - sum(out) % 256) % 256
    return bytes(out)


# ------------------------------------------------------------------ layout
def test_every_field_lands_at_the_offset_acpi_gives_it() -> None:
    data = build(_simple())
    assert len(data) == 48 + 16 + 24
    assert data[SIG:SIG + 4] == b"VIOT"
    assert _u32(data, LENGTH) == len(data)
    assert data[REV] == 0
    assert sum(data) % 256 == 0
    assert data[OEM_ID:OEM_ID + 6] == b"HRELAY"
    assert data[OEM_TABLE_ID:OEM_TABLE_ID + 8] == b"HRVIOT  "
    assert _u32(data, OEM_REV) == 1
    assert data[CREATOR_ID:CREATOR_ID + 4] == b"HRLY"
    assert _u32(data, CREATOR_REV) == 1
    assert _u16(data, NODE_COUNT) == 2
    assert _u16(data, NODE_OFFSET) == FIRST_NODE
    assert data[HDR_RESERVED:HDR_RESERVED + 8] == bytes(8)
    # virtio-pci IOMMU node: type 3, reserved, length 16, segment, BDF, 8 reserved.
    iommu = data[48:64]
    assert (iommu[0], iommu[1], _u16(iommu, 2)) == (3, 0, 16)
    assert _u16(iommu, 4) == 0 and _u16(iommu, 6) == (0 << 8 | 2 << 3 | 0)
    assert iommu[8:16] == bytes(8)
    # PCI range node: type 1, reserved, length 24, endpoint start (4), segment
    # start/end, BDF start/end, output node (the IOMMU node's table offset), 6 reserved.
    rng = data[64:88]
    assert (rng[0], rng[1], _u16(rng, 2)) == (1, 0, 24)
    assert _u32(rng, 4) == 0x18  # the requester ID of 00:03.0
    assert (_u16(rng, 8), _u16(rng, 10)) == (0, 0)
    assert (_u16(rng, 12), _u16(rng, 14)) == (0x18, 0x2F)
    assert _u16(rng, 16) == 48
    assert rng[18:24] == bytes(6)


def test_the_nodes_match_the_iasl_dump_of_a_qemu_table_byte_for_byte() -> None:
    # qemu-system-aarch64 -M virt -device virtio-iommu, `iasl -d` of its VIOT:
    # [024h] Node count 0002, [026h] Node offset 0030,
    # [030h] Type 03, [032h] Length 0010, [034h] PCI Segment 0000, [036h] PCI BDF number 0030,
    # [040h] Type 01, [042h] Length 0018, [044h] Endpoint start 00000000, [048h] Segment start 0000,
    # [04Ah] Segment end 0000, [04Ch] BDF start 0000, [04Eh] BDF end 00FF, [050h] Output node 0030.
    expected = bytes.fromhex(
        "0200" "3000" "0000000000000000"
        "03" "00" "1000" "0000" "3000" "0000000000000000"
        "01" "00" "1800" "00000000" "0000" "0000" "0000" "ff00" "3000" "000000000000"
    )  # fmt: skip
    table = ViotTable((VirtioPciIommu(Bdf.from_id(0, 0x30)),), (PciRange.between(Bdf(0, 0, 0, 0), Bdf(0, 0, 0x1F, 7)),))
    assert build(table, allow_iommu_in_range=True)[36:] == expected


def test_parses_the_iasl_dump_of_a_qemu_table_with_two_ranges() -> None:
    # QEMU's pxb-pcie example from the same post: IOMMU at BDF 0x20, ranges
    # 3000-32ff (endpoint start 3000) then 1000-11ff (endpoint start 1000).
    body = bytes.fromhex(
        "0300" "3000" "0000000000000000"
        "03" "00" "1000" "0000" "2000" "0000000000000000"
        "01" "00" "1800" "00300000" "0000" "0000" "0030" "ff32" "3000" "000000000000"
        "01" "00" "1800" "00100000" "0000" "0000" "0010" "ff11" "3000" "000000000000"
    )  # fmt: skip
    table = parse(_acpi_table(body))
    assert table.iommus == (VirtioPciIommu(Bdf(0, 0, 4, 0)),)
    assert table.ranges == (PciRange(0, 0, 0x3000, 0x32FF, 0x3000, 0), PciRange(0, 0, 0x1000, 0x11FF, 0x1000, 0))
    assert (table.oem_id, table.oem_table_id, table.creator_id) == ("BOCHS ", "BXPC    ", "BXPC")
    # Linux 6.12 viot_pci_dev_iommu_init: bdf - bdf_start + endpoint_start.
    assert table.endpoint_id(Bdf(0, 0x31, 2, 1)) == (0x3111, table.iommus[0])
    assert table.endpoint_id(Bdf(0, 0x20, 0, 0)) is None
    assert build(table, allow_iommu_in_range=True) == _acpi_table(body)


# ---------------------------------------------------- checksum, round trip
TABLES: list[ViotTable] = [
    _simple(),
    ViotTable((VirtioPciIommu(Bdf(0, 0, 1, 0)),), (PciRange.between(Bdf(0, 1, 0, 0), Bdf(0, 1, 0, 0)),
                                                    PciRange.between(Bdf(0, 0, 3, 0), Bdf(0, 0, 5, 7), endpoint_start=0x1000))),
    ViotTable((VirtioPciIommu(Bdf(0, 0, 1, 0)), VirtioPciIommu(Bdf(1, 0, 1, 0))),
              (PciRange.between(Bdf(0, 2, 0, 0), Bdf(0, 3, 0x1F, 7)), PciRange.between(Bdf(1, 4, 0, 0), Bdf(1, 4, 0, 7), iommu=1),
               PciRange(2, 3, 0x0100, 0x01FF, 0x20000, 1)),
              oem_id="ACME", oem_table_id="T", oem_revision=0xFFFFFFFF, creator_id="X", creator_revision=7),
    ViotTable((VirtioPciIommu(Bdf(0xFFFF, 0xFF, 0x1F, 7)),)),
]  # fmt: skip


@pytest.mark.parametrize("table", TABLES, ids=range(len(TABLES)))
def test_round_trip_and_a_zero_byte_sum(table: ViotTable) -> None:
    data = build(table)
    assert sum(data) % 256 == 0
    assert _u32(data, LENGTH) == len(data) == table.length
    assert parse(data) == table
    assert build(parse(data)) == data


def test_every_single_bit_flip_is_refused() -> None:
    # The checksum covers every byte: no corruption of one byte parses.
    data = build(TABLES[2])
    for i in range(len(data)):
        broken = bytearray(data)
        broken[i] ^= 0x10
        with pytest.raises(ViotError):
            parse(bytes(broken))


# ------------------------------------------------------------ parse refusals
def _set(at: int, fmt: str, value: int) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        out = bytearray(data)
        struct.pack_into(fmt, out, at, value)
        return _resum(out)

    return mutate


def _two_ranges() -> bytes:
    # IOMMU at 0x30, ranges at 0x40 and 0x58.
    return build(ViotTable((VirtioPciIommu(Bdf(0, 0, 2, 0)),), (PciRange.between(Bdf(0, 0, 3, 0), Bdf(0, 0, 3, 7)),
                                                                PciRange.between(Bdf(0, 0, 5, 0), Bdf(0, 0, 5, 7)))))  # fmt: skip


def _duplicate_iommu(_: bytes) -> bytes:
    iommu = bytes.fromhex("03" "00" "1000" "0000" "1000" "0000000000000000")
    return _acpi_table(bytes.fromhex("0200" "3000" "0000000000000000") + iommu + iommu)



PARSE_REFUSALS: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("shorter than a header", lambda d: d[:20], "shorter than the 36-byte ACPI table header"),
    ("signature", lambda d: _resum(b"DMAR" + d[4:]), "signature b'DMAR' is not b'VIOT'"),
    ("truncated", lambda d: d[:-1], r"header length 112 differs from the 111 bytes given \(table truncated\)"),
    ("trailing bytes", lambda d: d + b"\0", "followed by extra bytes"),
    ("shorter than the VIOT header", lambda d: _resum(_set(LENGTH, "<I", 40)(d)[:40]), "shorter than the 48-byte VIOT header"),
    ("checksum", lambda d: d[:CSUM] + bytes([(d[CSUM] + 1) % 256]) + d[CSUM + 1:], "checksum byte .* is wrong"),
    ("revision", _set(REV, "<B", 1), "revision 1 is unknown"),
    ("header reserved", _set(HDR_RESERVED + 3, "<B", 1), "reserved bytes 40-47 of the header are not zero"),
    ("no nodes", _set(NODE_COUNT, "<H", 0), "node count is 0"),
    ("nodes overlap the header", _set(NODE_OFFSET, "<H", 0x20), "node offset 0x20 overlaps the 48-byte header"),
    ("node offset past the end", _set(NODE_OFFSET, "<H", 0x200), "starts past the table's end"),
    ("node count too high", _set(NODE_COUNT, "<H", 4), "node 3 of 4 at 0x70 starts past the table's end"),
    ("node count too low", _set(NODE_COUNT, "<H", 2), "24 bytes follow the last of the 2 nodes"),
    ("empty node", _set(0x42, "<H", 0), "node 1 at 0x40 has length 0, less than its own 4-byte header"),
    ("node runs past the end", _set(0x5A, "<H", 0x30), r"node 2 at 0x58 \(length 48\) runs past the table's end"),
    ("IOMMU node length", _set(0x32, "<H", 24), "node 0 at 0x30, a virtio-pci IOMMU, has length 24, not 16"),
    ("range node length", _set(0x42, "<H", 16), "node 1 at 0x40, a PCI range, has length 16, not 24"),
    ("MMIO endpoint node", _set(0x40, "<B", 2), r"MMIO endpoint node \(type 2\): only PCI nodes"),
    ("virtio-mmio IOMMU node", _set(0x30, "<B", 4), r"virtio-mmio IOMMU node \(type 4\)"),
    ("reserved type 0", _set(0x40, "<B", 0), "reserved type 0"),
    ("reserved type 5", _set(0x58, "<B", 5), "reserved type 5"),
    ("node reserved byte", _set(0x41, "<B", 1), "reserved byte 1 is 0x01"),
    ("IOMMU reserved bytes", _set(0x3F, "<B", 1), "IOMMU node at 0x30: reserved bytes 8-15 are not zero"),
    ("range reserved bytes", _set(0x40 + 20, "<B", 1), "range node at 0x40: reserved bytes 18-23 are not zero"),
    ("output node is a range", _set(0x40 + 16, "<H", 0x58), r"output node 0x58 is not an IOMMU node \(IOMMU nodes at: 0x30\)"),
    ("output node mid-node", _set(0x40 + 16, "<H", 0x31), "output node 0x31 is not an IOMMU node"),
    ("output node is the header", _set(0x58 + 16, "<H", 0), "output node 0x0 is not an IOMMU node"),
    ("inverted range", _set(0x40 + 14, "<H", 0x10), "range node at 0x40: PCI range is inverted"),
    ("inverted segments", _set(0x40 + 8, "<H", 1), "PCI range segments are inverted"),
    ("overlapping ranges", _set(0x40 + 14, "<H", 0x28), "overlap"),
    ("endpoint IDs overflow", _set(0x40 + 4, "<I", 0xFFFFFFFC), "endpoint IDs overflow 32 bits"),
    ("two IOMMU nodes for one function", _duplicate_iommu, "IOMMU 0000:00:02.0 is described twice"),
    ("OEM ID not ASCII", _set(OEM_ID, "<B", 0xC3), "OEM ID .* is not ASCII"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "message"), [(m, msg) for _, m, msg in PARSE_REFUSALS],
                         ids=[name for name, _, _ in PARSE_REFUSALS])  # fmt: skip
def test_parse_refuses(mutate: Callable[[bytes], bytes], message: str) -> None:
    good = _two_ranges()
    assert len(good) == 112 and parse(good).ranges  # the mutations' offsets assume this layout
    with pytest.raises(ViotError, match=message):
        parse(mutate(good))


# ---------------------------------------------------------- build refusals
BUILD_REFUSALS: list[tuple[str, Callable[[], object], str]] = [
    ("bus out of range", lambda: Bdf(0, 0x100, 0, 0), r"PCI bus 0x100 is out of range \(0..0xff\)"),
    ("device out of range", lambda: Bdf(0, 0, 0x20, 0), "PCI device 0x20 is out of range"),
    ("function out of range", lambda: Bdf(0, 0, 0, 8), "PCI function 0x8 is out of range"),
    ("segment out of range", lambda: Bdf(0x10000, 0, 0, 0), "PCI segment 0x10000 is out of range"),
    ("not a BDF", lambda: Bdf.parse("00:03"), r"'00:03' is not a PCI address: expected \[SSSS:\]BB:DD.F"),
    ("function 8", lambda: Bdf.parse("00:03.8"), "is not a PCI address"),
    ("segment too wide", lambda: Bdf.parse("10000:00:03.0"), "is not a PCI address"),
    ("device 0x20", lambda: Bdf.parse("00:20.0"), "PCI device 0x20 is out of range"),
    ("inverted range", lambda: PciRange.between(Bdf(0, 0, 5, 0), Bdf(0, 0, 3, 0)), "inverted: 0000:00:05.0 comes after 0000:00:03.0"),
    ("range over segments", lambda: PciRange.between(Bdf(0, 0, 3, 0), Bdf(1, 0, 3, 0)), "spans segments"),
    ("endpoint overflow", lambda: PciRange.between(Bdf(0, 0, 0, 0), Bdf(0, 0, 0, 1), endpoint_start=0xFFFFFFFF), "overflow 32 bits"),
    ("endpoint start negative", lambda: PciRange(0, 0, 0, 0, -1), "endpoint start -0x1 is out of range"),
    ("no IOMMU", lambda: ViotTable(()), "at least one IOMMU node"),
    ("range to a missing IOMMU", lambda: ViotTable((VirtioPciIommu(Bdf(0, 0, 2, 0)),), (PciRange(0, 0, 0x18, 0x18, 0x18, 1),)),
     "points to IOMMU 1, but the table has 1"),
    ("overlap", lambda: ViotTable((VirtioPciIommu(Bdf(0, 0, 2, 0)),), (PciRange.between(Bdf(0, 0, 3, 0), Bdf(0, 0, 5, 7)),
                                                                        PciRange.between(Bdf(0, 0, 5, 7), Bdf(0, 0, 6, 0)))),
     "0000:00:03.0-0000:00:05.7 and 0000:00:05.7-0000:00:06.0 overlap"),
    ("duplicate IOMMU", lambda: ViotTable((VirtioPciIommu(Bdf(0, 0, 2, 0)), VirtioPciIommu(Bdf(0, 0, 2, 0)))), "described twice"),
    ("OEM ID too long", lambda: ViotTable((VirtioPciIommu(Bdf(0, 0, 2, 0)),), oem_id="SEVENCH"), "longer than its 6 bytes"),
    ("table ID not ASCII", lambda: ViotTable((VirtioPciIommu(Bdf(0, 0, 2, 0)),), oem_table_id="é"), "not ASCII"),
    ("revision", lambda: ViotTable((VirtioPciIommu(Bdf(0, 0, 2, 0)),), revision=1), "revision 1 is not the one ACPI defines"),
    ("OEM revision", lambda: ViotTable((VirtioPciIommu(Bdf(0, 0, 2, 0)),), oem_revision=1 << 32), "does not fit 32 bits"),
    ("range covering the IOMMU", lambda: build(ViotTable((VirtioPciIommu(Bdf(0, 0, 4, 0)),), (PciRange.between(Bdf(0, 0, 3, 0), Bdf(0, 0, 5, 7)),))),
     "0000:00:03.0-0000:00:05.7 contains the IOMMU 0000:00:04.0 itself"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "message"), [(m, msg) for _, m, msg in BUILD_REFUSALS],
                         ids=[name for name, _, _ in BUILD_REFUSALS])  # fmt: skip
def test_build_refuses(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ViotError, match=message):
        make()


def test_a_range_covering_the_iommu_builds_when_allowed_and_linux_would_skip_the_iommu() -> None:
    table = ViotTable((VirtioPciIommu(Bdf(0, 0, 4, 0)),), (PciRange.between(Bdf(0, 0, 0, 0), Bdf(0, 0, 0x1F, 7)),))
    assert table.ranges_containing_iommus() == [(table.ranges[0], table.iommus[0])]
    assert parse(build(table, allow_iommu_in_range=True)) == table


def test_bdf_text_and_ids() -> None:
    assert Bdf.parse("00:03.0") == Bdf(0, 0, 3, 0)
    assert Bdf.parse("0001:1f:1f.7") == Bdf(1, 0x1F, 0x1F, 7)
    assert str(Bdf.parse("a:02:01.3")) == "000a:02:01.3"
    assert Bdf(0, 2, 1, 3).bdf == 0x020B
    assert Bdf.from_id(5, 0x020B) == Bdf(5, 2, 1, 3)
    # A range over segments 2..3: segment offset << 16 (Linux 6.12 viot_pci_dev_iommu_init).
    r = PciRange(2, 3, 0x0100, 0x01FF, 0x20000)
    assert r.endpoint_id(Bdf(3, 1, 0, 1)) == 0x20000 + (1 << 16) + 1
    with pytest.raises(ViotError, match="is not in the PCI range"):
        r.endpoint_id(Bdf(1, 1, 0, 0))


# ---------------------------------------------------------------------- CLI
def test_cli_writes_a_table_that_check_decodes(tmp_path: Path) -> None:
    out = tmp_path / "viot.bin"
    runner = CliRunner()
    res = runner.invoke(main, ["viot", "--iommu", "00:02.0", "--endpoints", "00:03.0-00:05.7", "--endpoints", "0000:01:00.0", "-o", str(out)])
    assert res.exit_code == 0, res.output
    table = parse(out.read_bytes())
    assert table.iommus == (VirtioPciIommu(Bdf(0, 0, 2, 0)),)
    assert table.ranges == (PciRange(0, 0, 0x18, 0x2F, 0x18), PciRange(0, 0, 0x100, 0x100, 0x100))
    res = runner.invoke(main, ["viot", "--check", str(out)])
    assert res.exit_code == 0, res.output
    assert f"{out}: valid" in res.output
    assert "node 0x0030: virtio-pci IOMMU 0000:00:02.0" in res.output
    assert "node 0x0040: PCI range 0000:00:03.0-0000:00:05.7 -> endpoint IDs 0x18-0x2f, IOMMU 0000:00:02.0" in res.output
    assert "node 0x0058: PCI range 0000:01:00.0-0000:01:00.0 -> endpoint IDs 0x100-0x100" in res.output


@pytest.mark.parametrize(("args", "message"), [
    (["--iommu", "00:02", "--endpoints", "00:03.0"], "Invalid value for '--iommu': '00:02' is not a PCI address"),
    (["--iommu", "00:02.0", "--endpoints", "00:03.0-zz"], "Invalid value for '--endpoints': 00:03.0-zz: 'zz' is not a PCI address"),
    (["--iommu", "00:02.0", "--endpoints", "00:05.0-00:03.7"], "00:05.0-00:03.7: PCI range is inverted: 0000:00:05.0 comes after 0000:00:03.7"),
    (["--iommu", "00:02.0", "--endpoints", "00:05.0-0001:00:03.7"], "spans segments"),
    (["--iommu", "00:04.0", "--endpoints", "00:03.0-00:05.7"], "Invalid value for '--endpoints': PCI range 0000:00:03.0-0000:00:05.7 contains the IOMMU 0000:00:04.0 itself"),
    (["--iommu", "00:02.0", "--endpoints", "00:03.0-00:05.7", "--endpoints", "00:04.0"], "overlap"),
    (["--iommu", "00:02.0"], "give --endpoints, -o (or --check FILE)"),
])  # fmt: skip
def test_cli_refuses(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "viot.bin"
    full = ["viot", *args] if "--iommu" in args and len(args) == 2 else ["viot", *args, "-o", str(out)]
    res = CliRunner().invoke(main, full)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert not out.exists()


def test_cli_check_says_when_the_file_orders_its_nodes_otherwise(tmp_path: Path) -> None:
    # A range node before the IOMMU node it points to (valid: output node 0x48).
    body = bytes.fromhex(
        "0200" "3000" "0000000000000000"
        "01" "00" "1800" "18000000" "0000" "0000" "1800" "2f00" "4800" "000000000000"
        "03" "00" "1000" "0000" "1000" "0000000000000000"
    )  # fmt: skip
    f = tmp_path / "viot.bin"
    f.write_bytes(_acpi_table(body))
    assert parse(f.read_bytes()).ranges == (PciRange(0, 0, 0x18, 0x2F, 0x18),)
    res = CliRunner().invoke(main, ["viot", "--check", str(f)])
    assert res.exit_code == 0, res.output
    assert "the file orders its nodes otherwise" in res.output
    f.write_bytes(build(parse(f.read_bytes())))
    assert "otherwise" not in CliRunner().invoke(main, ["viot", "--check", str(f)]).output


def test_cli_check_refuses_a_broken_file_and_extra_options(tmp_path: Path) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(build(_simple())[:-4])
    res = CliRunner().invoke(main, ["viot", "--check", str(bad)])
    assert res.exit_code == 1
    assert f"{bad}: not a valid VIOT: header length 88 differs from the 84 bytes given (table truncated)" in res.output
    res = CliRunner().invoke(main, ["viot", "--check", str(bad), "--iommu", "00:02.0"])
    assert res.exit_code == 2 and "--check FILE takes no other option" in res.output


# ------------------------------------------------------- QEMU 7.2's own VIOT
def _pci_buses(sysfs: Path) -> list[tuple[int, int]]:
    """(segment, bus) of every PCI bus the guest enumerated (/sys/class/pci_bus/SSSS:BB)."""
    return sorted((int(p.name[:4], 16), int(p.name[5:], 16)) for p in (sysfs / "class" / "pci_bus").iterdir())


@pytest.mark.vfio(iommu="virtio", bridged_edu=1)
def test_builder_reproduces_the_viot_qemu_generates_for_virtio_iommu_pci() -> None:
    from hostrelay.host.sysfs import find_pci

    raw = Path("/sys/firmware/acpi/tables/VIOT").read_bytes()
    qemu = parse(raw)  # QEMU 7.2's table passes every check
    # The virtio-iommu as the guest enumerated it (virtio 1.x device 23 = 0x1040 + 23).
    found = find_pci(0x1AF4, 0x1057)
    assert len(found) == 1, found
    iommu = Bdf.parse(found[0])
    # QEMU 7.2 hw/acpi/viot.c: one range per host bridge not bypassing the
    # IOMMU, covering its bus and the buses under its bridges (pci_bus_range:
    # the highest subordinate bus), endpoint start = BDF start.  q35 has one
    # host bridge; the bridged edu puts two buses behind a root port.
    buses = _pci_buses(Path("/sys"))
    assert {s for s, _ in buses} == {0} and len(buses) >= 3, buses
    ours = ViotTable((VirtioPciIommu(iommu),),
                     (PciRange.between(Bdf(0, buses[0][1], 0, 0), Bdf(0, buses[-1][1], 0x1F, 7)),))  # fmt: skip
    assert qemu == with_ids_of(ours, qemu), (qemu, ours)
    built = build(with_ids_of(ours, qemu), allow_iommu_in_range=True)
    assert built[36:] == raw[36:]  # the nodes, byte for byte
    assert built == raw  # and with QEMU's identification, the whole table (checksum included)
    assert build(ours, allow_iommu_in_range=True)[36:] == raw[36:]
