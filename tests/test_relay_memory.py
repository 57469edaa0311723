"""GuestMemory: GPA → host address, region splitting, refusal of non-RAM."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from hostrelay import GuestMemory
from hostrelay.backends.memory import GuestAddressError, Span

MiB = 1 << 20


def test_memfd_region_read_write_and_host_address() -> None:
    with GuestMemory() as m:
        r = m.add_region(0x100000, MiB)
        m.write(0x100010, b"hello")
        assert m.read(0x100010, 5) == b"hello"
        hva = m.host_address(0x100010)
        assert hva == r.hva + 0x10
        assert ctypes.string_at(hva, 5) == b"hello"  # a real host address


def test_fd_region_shares_the_file() -> None:
    fd = os.memfd_create("test-guest-ram")
    try:
        os.ftruncate(fd, 2 * MiB)
        with GuestMemory() as m:
            m.add_region(0, MiB, fd=fd, offset=MiB)
            m.write(0x20, b"abc")
            assert os.pread(fd, 3, MiB + 0x20) == b"abc"
    finally:
        os.close(fd)


def test_address_region_uses_existing_mapping() -> None:
    backing = mmap.mmap(-1, MiB)
    buf = (ctypes.c_char * MiB).from_buffer(backing)
    try:
        with GuestMemory() as m:
            m.add_region(0x4000_0000, MiB, address=ctypes.addressof(buf))
            m.write(0x4000_0100, b"xyz")
            assert backing[0x100:0x103] == b"xyz"
            assert m.host_address(0x4000_0100) == ctypes.addressof(buf) + 0x100
    finally:
        del buf
        backing.close()


def test_span_crossing_regions_splits() -> None:
    with GuestMemory() as m:
        a = m.add_region(0, MiB)
        b = m.add_region(MiB, MiB)  # GPA-adjacent, separate host mappings
        spans = m.spans(MiB - 0x1000, 0x3000)
        assert spans == [Span(MiB - 0x1000, a.hva + MiB - 0x1000, 0x1000), Span(MiB, b.hva, 0x2000)]
        m.write(MiB - 2, b"\1\2\3\4")
        assert m.read(MiB - 2, 4) == b"\1\2\3\4"


def test_outside_guest_memory_is_refused() -> None:
    with GuestMemory() as m:
        m.add_region(0, MiB)
        m.add_region(2 * MiB, MiB)
        with pytest.raises(GuestAddressError) as e:
            m.spans(MiB - 0x10, 0x20)  # runs into the hole
        assert e.value.missing == MiB
        with pytest.raises(GuestAddressError):
            m.require(4 * MiB, 1)
        assert not m.contains(MiB, 1)
        assert m.contains(2 * MiB, MiB)
        assert not m.contains(2 * MiB, MiB + 1)
        with pytest.raises(GuestAddressError):
            m.write(MiB - 1, b"ab")
        assert m.read(MiB - 1, 1) == b"\0", "a refused write writes nothing"


def test_bad_regions_are_refused() -> None:
    with GuestMemory() as m:
        m.add_region(MiB, MiB)
        with pytest.raises(ValueError):
            m.add_region(MiB + 0x1000, 0x1000)  # overlap
        with pytest.raises(ValueError):
            m.add_region(0, MiB + 1)  # overlaps the start
        with pytest.raises(ValueError):
            m.add_region(0, 0)
        with pytest.raises(ValueError):
            m.add_region(0, 1, fd=3, address=0x1000)
        m.add_region(0, MiB)  # exactly adjacent is fine
        assert [r.gpa for r in m.regions] == [0, MiB]
