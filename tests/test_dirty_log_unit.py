"""Fast checks of the migration dirty log (no kernel).

The page arithmetic, emulated endpoints (translate), the start/stop state
rules, and the type1 bookkeeping against a stateful fake of type1's dirty
log (per-``vfio_dma`` bitmaps, EINVAL on a range that bisects one, the bitmap
read with UNMAP).  The proof against the real kernel is tests/test_dirty_log.py.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostrelay import DirtyLogStatus, GuestMemory, Relay
from hostrelay.kernel import ioctl as k
from hostrelay.kernel.errors import vfio_error
from hostrelay.model.dirty import bitmap_runs, merge_pages, translate_runs
from hostrelay.model.status import TranslationFault
from fake_vfio import fake_vfio_host
from hostrelay.model.wire import TAIL_SIZE, AttachRequest, DetachRequest, MapRequest, Status, UnmapRequest

PAGE = 0x1000
MIB = 1 << 20
RW = 3
BDFS = {"0000:00:03.0": 5, "0000:00:04.0": 6}


def send(r: Relay, req: AttachRequest | DetachRequest | MapRequest | UnmapRequest) -> Status:
    return Status(r.handle_request(req.pack(), TAIL_SIZE)[0])


# --- page arithmetic ------------------------------------------------------------------------


def test_merge_pages_rounds_sorts_and_merges() -> None:
    got = merge_pages([(0x5001, 1), (0x1000, 0x1000), (0x2FFF, 2), (0x9000, 0), (0x3000, 0x800)])
    # 0x1000 page, then 0x2FFF..0x3000 rounds to [0x2000, 0x4000) and swallows
    # [0x3000, 0x3800); adjacent [0x1000,0x2000) merges with it; empty dropped.
    assert got == [(0x1000, 0x3000), (0x5000, 0x1000)]
    assert merge_pages([]) == []


def test_bitmap_runs_words_and_bits() -> None:
    # bits 1-2 of byte 0, all of word 1 (bits 64..127) continuing into bit
    # 128, and the last bit of the bitmap.
    bm = bytearray(24)
    bm[0] = 0b110
    bm[8:16] = b"\xff" * 8
    bm[16] = 1
    bm[23] = 0x80
    assert bitmap_runs(bytes(bm), PAGE) == [(1 * PAGE, 2 * PAGE), (64 * PAGE, 65 * PAGE), (191 * PAGE, PAGE)]
    assert bitmap_runs(b"\xff" * 16, PAGE) == [(0, 128 * PAGE)], "a run of whole words"
    assert bitmap_runs(bytes(16), PAGE) == []


def test_translate_runs_clips_to_mappings() -> None:
    # IOVA 0x10000.. : two mappings with a hole between, GPAs far apart.
    segs = [(0x10000, 0x11FFF, 0x800000), (0x14000, 0x14FFF, 0x200000)]
    runs = [(0, 0x6000)]  # IOVA 0x10000..0x15FFF: covers both and the hole and past the end
    assert translate_runs(0x10000, runs, segs) == [(0x800000, 0x2000), (0x200000, 0x1000)]
    assert translate_runs(0x10000, [(0x1000, 0x1000)], segs) == [(0x801000, 0x1000)]


# --- emulated endpoints and the state rules ----------------------------------------------------


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory() as m:
        m.add_region(0, 4 * MIB)
        m.add_region(4 * MIB, 4 * MIB)
        yield m


def test_emulated_writes_are_logged_exactly(mem: GuestMemory) -> None:
    r = Relay(mem, bypass=False)
    r.add_endpoint(7)
    assert send(r, AttachRequest(1, 7)) == Status.OK
    assert send(r, MapRequest(1, 0x10000, 0x1FFFF, 0x300000, RW)) == Status.OK
    with pytest.raises(RuntimeError, match="start_dirty_log"):
        r.dirty_pages()
    status = r.start_dirty_log()
    assert isinstance(status, DirtyLogStatus)
    assert status.precise and status.space("emulated").tracked
    with pytest.raises(RuntimeError, match="already"):
        r.start_dirty_log()
    assert r.dirty_pages() == [], "nothing written yet"
    assert r.translate(7, 0x10010, 8, write=True) == 0x300010
    assert r.translate(7, 0x12FF0, 0x20, write=True) == 0x302FF0  # crosses a page boundary
    r.translate(7, 0x15000, 0x1000, write=False)  # a read dirties nothing
    with pytest.raises(TranslationFault):
        r.translate(7, 0x40000, 4, write=True)  # unmapped: a fault, nothing handed out
    assert r.dirty_pages() == [(0x300000, PAGE), (0x302000, 2 * PAGE)]
    assert r.dirty_pages() == [], "each call reports what came since the previous one"
    r.translate(7, 0x11000, 4, write=True)
    r.stop_dirty_log()
    assert not r.dirty_log_running
    r.translate(7, 0x11000, 4, write=True)
    with pytest.raises(RuntimeError):
        r.dirty_pages()
    with pytest.raises(RuntimeError, match="not running"):
        r.stop_dirty_log()
    # A new log starts empty: the write before stop is gone.
    r.start_dirty_log()
    assert r.dirty_pages() == []
    r.stop_dirty_log()


def test_an_emulated_write_is_noted_under_the_relay_lock(mem: GuestMemory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device thread's translate() notes its write under the lock dirty_pages() holds.

    Without it a note made while another thread's dirty_pages() hands the
    notes over would go into the list it then drops: a lost dirty page.
    The probe: while the note is made, a second thread cannot take the lock.
    """
    r = Relay(mem, bypass=False)
    r.add_endpoint(7)
    assert send(r, AttachRequest(1, 7)) == Status.OK
    assert send(r, MapRequest(1, 0x10000, 0x1FFFF, 0x300000, RW)) == Status.OK
    r.start_dirty_log()
    note = r._dirty.note_write
    took_lock = threading.Event()
    seen: list[bool] = []

    def probe() -> None:
        with r._lock:
            took_lock.set()

    def noting(gpa: int, size: int) -> None:
        t = threading.Thread(target=probe)
        t.start()
        seen.append(took_lock.wait(0.5))  # False: the lock is held while noting
        note(gpa, size)
        threads.append(t)

    threads: list[threading.Thread] = []
    monkeypatch.setattr(r._dirty, "note_write", noting)
    assert r.translate(7, 0x10010, 8, write=True) == 0x300010
    for t in threads:
        t.join(5)
    assert seen == [False], "the note was made without the relay lock"
    assert took_lock.is_set(), "the lock is free again once the note is made"
    assert r.dirty_pages() == [(0x300000, PAGE)]
    r.stop_dirty_log()


def test_bypass_writes_are_identity(mem: GuestMemory) -> None:
    r = Relay(mem, bypass=True)
    r.add_endpoint(7)
    r.start_dirty_log()
    assert r.translate(7, 0x5000, 0x2000, write=True) == 0x5000
    assert r.dirty_pages() == [(0x5000, 2 * PAGE)]
    r.stop_dirty_log()


class OwnBackend:
    """A VMM's own backend: a stateful record of what it was told."""

    def __init__(self) -> None:
        self.mapped: dict[int, Any] = {}

    def map(self, mapping: Any) -> None:
        self.mapped[mapping.start] = mapping

    def unmap(self, mappings: Any) -> None:
        for m in mappings:
            self.mapped.pop(m.start, None)


def test_custom_backend_is_reported_conservatively(mem: GuestMemory) -> None:
    r = Relay(mem, bypass=False)
    own = OwnBackend()
    r.add_endpoint(9, backend=own)
    assert send(r, AttachRequest(1, 9)) == Status.OK
    assert send(r, MapRequest(1, 0x0, 0x1FFF, 0x100000, RW)) == Status.OK
    assert send(r, MapRequest(1, 0x8000, 0x8FFF, 0x200000, 1)) == Status.OK  # read-only: never written
    status = r.start_dirty_log()
    assert not status.precise
    assert status.space("custom").reason is not None
    assert r.dirty_pages() == [(0x100000, 2 * PAGE)], "every writable page mapped there"
    # A mapping made and removed between two calls is still reported.
    assert send(r, MapRequest(1, 0x4000, 0x4FFF, 0x500000, RW)) == Status.OK
    assert send(r, UnmapRequest(1, 0x4000, 0x4FFF)) == Status.OK
    assert 0x4000 not in own.mapped
    assert r.dirty_pages() == [(0x100000, 2 * PAGE), (0x500000, PAGE)]
    # Removed before this call: reported once more (it was mapped at the
    # previous call), then gone.
    assert send(r, UnmapRequest(1, 0x0, 0x1FFF)) == Status.OK
    assert r.dirty_pages() == [(0x100000, 2 * PAGE)]
    assert r.dirty_pages() == []
    r.stop_dirty_log()


# --- type1 against a stateful fake of its dirty log -------------------------------------------


class FakeType1:
    """type1v2 with dirty logging as the relay relies on it (Linux 6.12 semantics).

    Per container: ``vfio_dma`` entries (iova -> size) and, while logging,
    the set of dirty pages.  ``pinned_scope=False`` is vfio-pci's case: every
    page of every entry dirty at each GET_BITMAP.  A range that starts or
    ends inside an entry is EINVAL, for GET_BITMAP as for UNMAP.
    """

    def __init__(self, *, migration: bool = True, pinned_scope: bool = True) -> None:
        self.dmas: dict[int, dict[int, int]] = {}
        self.dirty: dict[int, set[int]] | None = None
        self.migration = migration
        self.pinned_scope = pinned_scope
        self.gets: list[tuple[int, int]] = []
        self.dirty_unmaps = 0

    def iommu_get_info(self, fd: int, path: str | None = None) -> Any:
        mig = (0x40201000, 1 << 28) if self.migration else None
        return 1, 0x40201000, [(0, (1 << 39) - 1)], 100, mig

    def map_dma(self, fd: int, iova: int, size: int, vaddr: int, flags: int, path: str | None = None) -> None:
        d = self.dmas.setdefault(fd, {})
        if any(s < iova + size and iova < s + n for s, n in d.items()):
            raise vfio_error(errno.EEXIST, "VFIO_IOMMU_MAP_DMA", fd=fd)
        d[iova] = size

    def _bisects(self, fd: int, iova: int, size: int) -> bool:
        end = iova + size
        return any(s < iova < s + n or s < end < s + n for s, n in self.dmas.get(fd, {}).items())

    def unmap_dma(self, fd: int, iova: int, size: int, flags: int = 0, path: str | None = None) -> int:
        d = self.dmas.setdefault(fd, {})
        if flags:
            total = sum(d.values())
            d.clear()
            return total
        if self._bisects(fd, iova, size):
            raise vfio_error(errno.EINVAL, "VFIO_IOMMU_UNMAP_DMA", fd=fd)
        gone = [s for s, n in d.items() if iova <= s and s + n <= iova + size]
        return sum(d.pop(s) for s in gone)

    def write(self, fd: int, iova: int) -> None:
        """The device DMA-writes the page at ``iova`` (it must be mapped)."""
        assert any(s <= iova < s + n for s, n in self.dmas[fd].items()), "the IOMMU would fault"
        if self.dirty is not None:
            self.dirty.setdefault(fd, set()).add(iova & ~(PAGE - 1))

    def dirty_start(self, fd: int, path: str | None = None) -> None:
        self.dirty = {}

    def dirty_stop(self, fd: int, path: str | None = None) -> None:
        self.dirty = None

    def _bitmap(self, fd: int, iova: int, size: int, pgsize: int) -> bytes:
        assert self.dirty is not None
        bits = 0
        for s, n in self.dmas.get(fd, {}).items():
            if iova <= s and s + n <= iova + size:
                for page in range(s, s + n, pgsize):
                    if not self.pinned_scope or page in self.dirty.get(fd, set()):
                        bits |= 1 << ((page - iova) // pgsize)
        for page in [p for p in self.dirty.get(fd, set()) if iova <= p < iova + size]:
            self.dirty[fd].discard(page)
        return bits.to_bytes(k.bitmap_bytes(size, pgsize), "little")

    def dirty_get_bitmap(self, fd: int, iova: int, size: int, pgsize: int, path: str | None = None) -> bytes:
        if self.dirty is None or pgsize != PAGE or self._bisects(fd, iova, size):
            raise vfio_error(errno.EINVAL, "VFIO_IOMMU_DIRTY_PAGES(GET_BITMAP)", fd=fd, iova=iova, size=size)
        self.gets.append((iova, size))
        return self._bitmap(fd, iova, size, pgsize)

    def unmap_dma_dirty(self, fd: int, iova: int, size: int, pgsize: int, path: str | None = None) -> tuple[int, bytes]:
        if self.dirty is None or pgsize != PAGE or self._bisects(fd, iova, size):
            raise vfio_error(errno.EINVAL, "VFIO_IOMMU_UNMAP_DMA(GET_DIRTY_BITMAP)", fd=fd, iova=iova, size=size)
        self.dirty_unmaps += 1
        bitmap = self._bitmap(fd, iova, size, pgsize)
        return self.unmap_dma(fd, iova, size), bitmap


def _fake_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kern: FakeType1) -> tuple[FakeType1, Path, Path]:
    ops = ("iommu_get_info", "map_dma", "unmap_dma", "dirty_start", "dirty_stop", "dirty_get_bitmap", "unmap_dma_dirty")
    dev, sysfs = fake_vfio_host(tmp_path, monkeypatch, BDFS, kern, ops)
    return kern, dev, sysfs


def _relay(fake: tuple[FakeType1, Path, Path], mem: GuestMemory) -> Relay:
    _, dev, sysfs = fake
    r = Relay(mem, bypass=False)
    for i, bdf in enumerate(BDFS):
        r.add_vfio_endpoint(i + 1, bdf, dev_root=dev, sysfs_root=sysfs)
    return r


def test_type1_log_translates_runs_and_reads_unmaps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    mem: GuestMemory) -> None:  # fmt: skip
    kern, dev, sysfs = fake = _fake_fixture(tmp_path, monkeypatch, FakeType1())
    r = _relay(fake, mem)
    assert send(r, AttachRequest(1, 1)) == Status.OK
    # Three mappings: two IOVA-adjacent (one run for GET_BITMAP) crossing the
    # RAM region boundary (so three kernel entries), one apart.
    assert send(r, MapRequest(1, 0x10000, 0x11FFF, 4 * MIB - PAGE, RW)) == Status.OK
    assert send(r, MapRequest(1, 0x12000, 0x13FFF, 0x600000, RW)) == Status.OK
    assert send(r, MapRequest(1, 0x40000, 0x40FFF, 0x100000, RW)) == Status.OK
    fd = r.vfio_backend(1).container.fd
    status = r.start_dirty_log()
    assert status.space("type1", "group 5").tracked and status.space("type1", "group 5").pgsize == PAGE
    assert not r.vfio_backend(2).dirty_pgsize is None, "every container logs"
    kern.write(fd, 0x11000)  # GPA 4 MiB (second RAM region piece)
    kern.write(fd, 0x13000)  # GPA 0x601000
    assert r.dirty_pages() == [(4 * MIB, PAGE), (0x601000, PAGE)]
    assert sorted(kern.gets) == [(0x10000, 0x4000), (0x40000, 0x1000)], "one GET per contiguous run"
    assert r.dirty_pages() == [], "the fake clears what it reported"
    # A write, then the guest unmaps it: the bitmap comes with the unmap.
    kern.write(fd, 0x40000)
    assert send(r, UnmapRequest(1, 0x40000, 0x40FFF)) == Status.OK
    assert kern.dirty_unmaps == 1 and 0x40000 not in kern.dmas[fd]
    assert r.dirty_pages() == [(0x100000, PAGE)]
    # DETACH: the fan-out leave unmaps with the bitmap too.
    kern.write(fd, 0x12000)
    assert send(r, DetachRequest(1, 1)) == Status.OK
    assert kern.dmas[fd] == {}
    assert r.dirty_pages() == [(0x600000, PAGE)]
    r.stop_dirty_log()
    assert kern.dirty is None and r.vfio_backend(1).dirty_pgsize is None
    r.close()


def test_type1_without_pinned_scope_reports_every_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       mem: GuestMemory) -> None:  # fmt: skip
    kern, *_ = fake = _fake_fixture(tmp_path, monkeypatch, FakeType1(pinned_scope=False))
    r = _relay(fake, mem)
    assert send(r, AttachRequest(1, 1)) == Status.OK
    assert send(r, MapRequest(1, 0x10000, 0x12FFF, 0x200000, RW)) == Status.OK
    r.start_dirty_log()
    assert r.dirty_pages() == [(0x200000, 3 * PAGE)]
    assert r.dirty_pages() == [(0x200000, 3 * PAGE)], "re-marked after each GET_BITMAP"
    r.stop_dirty_log()
    r.close()


def test_type1_without_migration_cap_is_untracked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  mem: GuestMemory) -> None:  # fmt: skip
    kern, *_ = fake = _fake_fixture(tmp_path, monkeypatch, FakeType1(migration=False))
    r = _relay(fake, mem)
    assert send(r, AttachRequest(1, 1)) == Status.OK
    assert send(r, MapRequest(1, 0x10000, 0x11FFF, 0x200000, RW)) == Status.OK
    status = r.start_dirty_log()
    g5 = status.space("type1", "group 5")
    assert not g5.tracked and g5.reason is not None and "CAP_MIGRATION" in g5.reason
    assert kern.dirty is None, "START never sent to a kernel without the capability"
    assert send(r, MapRequest(1, 0x20000, 0x20FFF, 0x300000, RW)) == Status.OK
    assert send(r, UnmapRequest(1, 0x20000, 0x20FFF)) == Status.OK
    assert r.dirty_pages() == [(0x200000, 2 * PAGE), (0x300000, PAGE)]
    r.stop_dirty_log()
    r.close()


def test_the_c_paths_log_and_stop_logging(mem: GuestMemory) -> None:
    """An emulated domain's MAP and UNMAP during the log record nothing (its writes come through translate).

    That the VFIO UNMAP takes the C path while logging is shown against the
    kernel in tests/test_dirty_log.py (the ioctl counts).
    """
    r = Relay(mem, bypass=False)
    r.add_endpoint(7)
    assert send(r, AttachRequest(1, 7)) == Status.OK
    r.start_dirty_log()
    assert send(r, MapRequest(1, 0x10000, 0x10FFF, 0x200000, RW)) == Status.OK
    assert send(r, UnmapRequest(1, 0x10000, 0x10FFF)) == Status.OK
    assert r.dirty_pages() == [], "no device wrote: an emulated endpoint's writes come through translate"
    r.stop_dirty_log()
    with pytest.raises(RuntimeError):
        r.dirty_pages()


def test_type1_identity_map_is_logged_and_read_at_its_removal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              mem: GuestMemory) -> None:  # fmt: skip
    kern, dev, sysfs = _fake_fixture(tmp_path, monkeypatch, FakeType1())
    r = Relay(mem, bypass=True)
    r.add_vfio_endpoint(1, "0000:00:03.0", dev_root=dev, sysfs_root=sysfs)
    fd = r.vfio_backend(1).container.fd
    assert kern.dmas[fd] == {0: 4 * MIB, 4 * MIB: 4 * MIB}, "guest RAM at IOVA = GPA, one entry per region"
    r.start_dirty_log()
    kern.write(fd, 0x3000)
    kern.write(fd, 5 * MIB)
    assert r.dirty_pages() == [(0x3000, PAGE), (5 * MIB, PAGE)]
    assert kern.gets == [(0, 8 * MIB)], "the two identity pieces are one IOVA-contiguous run"
    # ATTACH to a normal domain removes the identity map: read with its unmap.
    kern.write(fd, 0x7000)
    assert send(r, AttachRequest(1, 1)) == Status.OK
    assert kern.dmas[fd] == {} and kern.dirty_unmaps == 2
    assert r.dirty_pages() == [(0x7000, PAGE)]
    r.stop_dirty_log()
    r.close()


def test_untracked_type1_in_bypass_reports_all_ram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   mem: GuestMemory) -> None:  # fmt: skip
    kern, dev, sysfs = _fake_fixture(tmp_path, monkeypatch, FakeType1(migration=False))
    r = Relay(mem, bypass=False)
    r.add_vfio_endpoint(1, "0000:00:03.0", dev_root=dev, sysfs_root=sysfs)
    r.start_dirty_log()
    assert r.dirty_pages() == [], "unattached, bypass 0: the device reaches nothing"
    # Config bypass comes and goes between two calls: the device could
    # write all of guest RAM meanwhile.
    r.write_config(36, b"\x01")
    r.write_config(36, b"\x00")
    assert kern.dmas[r.vfio_backend(1).container.fd] == {}
    assert r.dirty_pages() == [(0, 8 * MIB)]
    assert r.dirty_pages() == []
    r.stop_dirty_log()
    r.close()
