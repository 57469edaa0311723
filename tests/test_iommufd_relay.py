"""The relay on the iommufd backend, against the real kernel: one IOAS per guest domain.

Runs in the iommufd testbed (``testbed run --iommufd``: Linux 6.12 built with
IOMMUFD and VFIO device cdevs, emulated intel-iommu, QEMU ``edu`` devices as
DMA engines).  The scenarios are those tests/test_vfio_relay.py proves on
type1, with what differs on iommufd asserted where it differs: a domain is one
IOAS (one container in the stats, every page charged once), a move is a
replace, a detached device is in its group's blocking domain, bypass is one
identity IOAS for every device.  The proof that a mapping took effect (or
did not) is always the device's own DMA.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hostrelay import GuestMemory, Relay
from hostrelay.model.wire import (
    TAIL_SIZE,
    AttachFlag,
    AttachRequest,
    DetachRequest,
    MapRequest,
    ProbeRequest,
    ResvMemType,
    Status,
    UnmapRequest,
    parse_properties,
    unpack_resv_mem,
)
from test_vfio_relay import EP_A, EP_B, GPA_1, GPA_2, IOVA_1, IOVA_2, MIB, N, PAGE, RW, Dma, send

pytestmark = pytest.mark.vfio(edu=2, iommufd=True)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    """8 MiB of guest RAM in two memfd regions (a MAP across 4 MiB is split)."""
    with GuestMemory() as m:
        m.add_region(0, 4 * MIB)
        m.add_region(4 * MIB, 4 * MIB)
        yield m


@pytest.fixture
def make_relay(memory: GuestMemory, edu_bdfs: list[str]) -> Iterator[Callable[..., Relay]]:
    relays: list[Relay] = []

    def make(*, endpoints: int = 2, **options: Any) -> Relay:
        r = Relay(memory, vfio_backend="iommufd", **options)
        relays.append(r)
        for ep, bdf in zip((EP_A, EP_B, 0x28, 0x30), edu_bdfs[:endpoints]):
            r.add_vfio_endpoint(ep, bdf)
        return r

    yield make
    for r in relays:
        r.close()


def _pt(r: Relay, ep: int) -> int | None:
    (pt,) = r.iommufd_group(ep).pt_ids.values()
    return pt


def test_two_domains_isolation_move_is_a_replace_detach_blocks(make_relay: Callable[..., Relay], memory: GuestMemory) -> None:
    r = make_relay(bypass=False)
    assert r.iommufd_group(EP_A) is not r.iommufd_group(EP_B), "each edu is its own group under intel-iommu"
    a, b = Dma(r, EP_A, memory), Dma(r, EP_B, memory)
    assert _pt(r, EP_A) is None and _pt(r, EP_B) is None, "unattached, bypass 0: detached"
    assert send(r, AttachRequest(1, EP_A)) == Status.OK
    assert send(r, AttachRequest(2, EP_B)) == Status.OK
    ioas1, ioas2 = r.domain_ioas(1), r.domain_ioas(2)
    assert ioas1 is not None and ioas2 is not None and ioas1.ioas.id != ioas2.ioas.id
    assert send(r, MapRequest(1, IOVA_1, IOVA_1 + 2 * PAGE - 1, GPA_1, RW)) == Status.OK
    assert send(r, MapRequest(2, IOVA_2, IOVA_2 + 2 * PAGE - 1, GPA_2, RW)) == Status.OK
    a.load(IOVA_1, GPA_1)
    b.load(IOVA_2, GPA_2)
    assert a.lands(IOVA_1 + PAGE, GPA_1 + PAGE)
    assert b.lands(IOVA_2 + PAGE, GPA_2 + PAGE)
    Dma.logged_faults = 0
    assert a.faults(IOVA_2 + PAGE, GPA_2 + PAGE)
    assert b.faults(IOVA_1 + PAGE, GPA_1 + PAGE)
    assert Dma.logged_faults >= 1, "the IOMMU logged no fault"
    st = r.stats()
    assert st["domains"][1] == {"mappings": 1, "containers": 1, "pinned_bytes": 2 * PAGE, "charged_bytes": 2 * PAGE}

    # ATTACH A to domain 2: one replace onto domain 2's IOAS, which B's
    # attach already gave a page table, so both share it.
    assert send(r, AttachRequest(2, EP_A)) == Status.OK
    assert r.domain_ids() == [2] and r.domain_ioas(1) is None, "domain 1's IOAS died with its last device"
    assert _pt(r, EP_A) == _pt(r, EP_B), "one shared hardware page table"
    assert a.lands(IOVA_2 + PAGE, GPA_2 + PAGE)
    assert a.faults(IOVA_1 + PAGE, GPA_1 + PAGE)
    st = r.stats()
    # Two devices, one IOAS: every page pinned and charged once.
    assert st["domains"][2] == {"mappings": 1, "containers": 1, "pinned_bytes": 2 * PAGE, "charged_bytes": 2 * PAGE}
    assert st["total"]["charged_bytes"] == 2 * PAGE
    assert send(r, MapRequest(2, 0x300000, 0x300FFF, 0x30000, RW)) == Status.OK
    assert a.lands(0x300000, 0x30000) and b.lands(0x300000, 0x30000)
    assert send(r, UnmapRequest(2, 0x300000, 0x300FFF)) == Status.OK
    assert a.faults(0x300000, 0x30000) and b.faults(0x300000, 0x30000)

    # DETACH: A reaches nothing (blocking domain), B keeps the domain.
    assert send(r, DetachRequest(2, EP_A)) == Status.OK
    assert _pt(r, EP_A) is None
    assert a.faults(IOVA_2 + PAGE, GPA_2 + PAGE)
    assert b.lands(IOVA_2 + PAGE, GPA_2 + PAGE)
    ioas2 = r.domain_ioas(2)
    assert ioas2 is not None and ioas2.unmap_all() == 2 * PAGE, "the IOAS equals the table"


def test_bypass_is_one_identity_ioas_for_every_device(make_relay: Callable[..., Relay], memory: GuestMemory) -> None:
    r = make_relay(bypass=True)
    a, b = Dma(r, EP_A, memory), Dma(r, EP_B, memory)
    src, dst = 0x50000, 0x51000
    a.load(src, src)
    b.load(src + PAGE, src + PAGE)
    assert a.lands(dst, dst) and a.lands(6 * MIB, 6 * MIB), "identity over both RAM regions"
    assert b.lands(dst + PAGE, dst + PAGE)
    ident = r.bypass_ioas()
    assert ident is not None and _pt(r, EP_A) == _pt(r, EP_B)
    # type1 pins all of RAM once per container; here once for both devices.
    assert ident.stats()["identity_bytes"] == 8 * MIB and ident.charged == 8 * MIB
    assert r.stats()["total"]["charged_bytes"] == 8 * MIB
    r.write_config(36, b"\0")
    assert a.faults(dst, dst) and b.faults(dst, dst)
    assert r.bypass_ioas() is None and r.stats()["total"]["charged_bytes"] == 0, "identity IOAS destroyed, unpinned"
    assert send(r, AttachRequest(7, EP_A, AttachFlag.BYPASS)) == Status.OK
    assert a.lands(dst, dst) and b.faults(dst, dst)
    assert send(r, AttachRequest(8, EP_A)) == Status.OK
    assert a.faults(dst, dst)
    assert send(r, MapRequest(8, 0x100000, 0x100FFF, dst, RW)) == Status.OK
    assert a.lands(0x100000, dst)
    r.write_config(36, b"\1")
    assert b.lands(dst, dst), "B (unattached) follows bypass 1"
    assert send(r, DetachRequest(8, EP_A)) == Status.OK
    assert a.lands(dst, dst)
    assert a.lands(0x100000, 0x100000), "IOVA 0x100000 is identity again, not domain 8's mapping"
    assert r.domain_ioas(8) is None


def test_host_reality_from_the_ioas_probe_and_refusals(make_relay: Callable[..., Relay], memory: GuestMemory) -> None:
    r = make_relay(bypass=False)
    g = r.iommufd_group(EP_A)
    assert r.page_size_mask & -r.page_size_mask == PAGE
    cfg = r.config()
    assert (cfg.input_start, cfg.input_end) == (g.iova_ranges[0].start, g.iova_ranges[-1].end)
    # intel-iommu under iommufd: the MSI window is a hole between two ranges.
    assert [(x.start, x.end) for x in g.iova_ranges][:2] == [(0, 0xFEDFFFFF), (0xFEF00000, g.iova_ranges[1].end)]
    probe = r.handle_request(ProbeRequest(EP_A).pack(), cfg.probe_size + TAIL_SIZE)
    resv = [unpack_resv_mem(p) for p in parse_properties(probe[:-TAIL_SIZE])]
    assert [(x.start, x.end) for x in resv if x.subtype == ResvMemType.MSI] == [(0xFEE00000, 0xFEEFFFFF)]
    assert send(r, AttachRequest(1, EP_A)) == Status.OK
    assert send(r, MapRequest(1, 0xFEE00000, 0xFEE00FFF, 0, RW)) == Status.INVAL  # MSI window
    assert send(r, MapRequest(1, 0x100000, 0x100FFF, 64 * MIB, RW)) == Status.FAULT  # not guest RAM
    assert send(r, MapRequest(1, 0x100000, 0x100FFF, 8 * MIB - PAGE // 2, RW)) == Status.RANGE  # granule
    ioas = r.domain_ioas(1)
    assert ioas is not None and ioas.unmap_all() == 0, "nothing refused was mapped"
    # One guest mapping across both RAM regions: two IOAS areas, one DMA across them.
    assert send(r, MapRequest(1, 0x200000, 0x201FFF, 4 * MIB - PAGE, RW)) == Status.OK
    assert ioas.entries == 2
    a = Dma(r, EP_A, memory)
    a.load(0x200000 + PAGE - N // 2, 4 * MIB - N // 2)
    assert a.lands(0x201000, 4 * MIB)
    assert send(r, UnmapRequest(1, 0, (1 << 32) - 1)) == Status.OK
    assert ioas.entries == 0 and ioas.charged == 0 and ioas.unmap_all() == 0


# Page-sized versions of the spec's seven UNMAP examples (5.13.6.6).
UNMAP_EXAMPLES = [
    ([], (0, 4), Status.OK, []),
    ([(0, 9)], (0, 9), Status.OK, []),
    ([(0, 4), (5, 9)], (0, 9), Status.OK, []),
    ([(0, 9)], (0, 4), Status.RANGE, [(0, 9)]),
    ([(0, 4), (5, 9)], (0, 4), Status.OK, [(5, 9)]),
    ([(0, 4)], (0, 9), Status.OK, []),
    ([(0, 4), (10, 14)], (0, 14), Status.OK, []),
]


@pytest.mark.usefixtures("transport")
def test_unmap_examples_keep_ioas_and_table_equal(make_relay: Callable[..., Relay], memory: GuestMemory) -> None:
    r = make_relay(endpoints=1, bypass=False)
    a = Dma(r, EP_A, memory)
    base = 0x400000

    def iova(page: int) -> int:
        return base + page * PAGE

    for i, (maps, (us, ue), status, left) in enumerate(UNMAP_EXAMPLES):
        dom = 10 + i
        assert send(r, AttachRequest(dom, EP_A)) == Status.OK
        for s, e in maps:
            assert send(r, MapRequest(dom, iova(s), iova(e + 1) - 1, s * PAGE, RW)) == Status.OK
        assert send(r, UnmapRequest(dom, iova(us), iova(ue + 1) - 1)) == status, f"example {i + 1}"
        assert [(m.start, m.end) for m in r.mappings(dom)] == [(iova(s), iova(e + 1) - 1) for s, e in left]
        for s, e in maps:
            kept = any(ls <= s and e <= le for ls, le in left)
            a.load(iova(s), s * PAGE) if kept else None
            assert a.lands(iova(s), s * PAGE) == kept, f"example {i + 1}: DMA at page {s}"
        ioas = r.domain_ioas(dom)
        assert ioas is not None and ioas.unmap_all() == sum((e - s + 1) * PAGE for s, e in left)
        assert send(r, DetachRequest(dom, EP_A)) == Status.OK  # the domain and its IOAS go


@pytest.mark.vfio(edu=4, iommufd=True)
def test_four_devices_one_ioas_one_ioctl_per_map_one_page_table(make_relay: Callable[..., Relay], memory: GuestMemory) -> None:
    from hostrelay.kernel.ioctl import Op, call_counts, counting

    r = make_relay(endpoints=4, bypass=False)
    eps = [EP_A, EP_B, 0x28, 0x30]
    dmas = [Dma(r, ep, memory) for ep in eps]
    for ep in eps:
        assert send(r, AttachRequest(1, ep)) == Status.OK
    assert send(r, AttachRequest(2, eps[0])) == Status.OK  # move the first away...
    assert send(r, AttachRequest(1, eps[0])) == Status.OK  # ...and back: replaces both ways
    assert len({_pt(r, ep) for ep in eps}) == 1, "one shared hardware page table"
    with counting():
        assert send(r, MapRequest(1, 0x100000, 0x100FFF, 0x10000, RW)) == Status.OK
        assert send(r, UnmapRequest(1, 0x100000, 0x100FFF)) == Status.OK
        assert send(r, MapRequest(1, 0x100000, 0x100FFF, 0x10000, RW)) == Status.OK
    counts = call_counts()
    assert counts[Op.IOAS_MAP] == 2 and counts[Op.IOAS_UNMAP] == 1, counts
    assert counts[Op.MAP_DMA] == counts[Op.UNMAP_DMA] == 0
    for d in dmas:
        d.load(0x100000, 0x10000)
        assert d.lands(0x100000, 0x10000)
        assert d.faults(0x200000, 0x20000), "and nothing else"
    assert r.stats()["domains"][1]["charged_bytes"] == PAGE, "charged once for four devices"


def test_a_failed_ioas_map_or_unmap_leaves_kernel_and_table_equal(make_relay: Callable[..., Relay],
                                                                   memory: GuestMemory) -> None:  # fmt: skip
    from hostrelay.kernel.ioctl import Op, inject_failure

    r = make_relay(bypass=False)
    for ep in (EP_A, EP_B):
        assert send(r, AttachRequest(1, ep)) == Status.OK
    assert send(r, MapRequest(1, 0x100000, 0x100FFF, 0x10000, RW)) == Status.OK
    r.pop_events()
    # A MAP across both RAM regions is two IOAS areas; the second fails.
    with inject_failure(Op.IOAS_MAP, nth=1, err=errno.ENOMEM) as inj:
        assert send(r, MapRequest(1, 0x200000, 0x201FFF, 4 * MIB - PAGE, RW)) == Status.NOMEM
    assert inj.fired
    assert len(r.pop_events()) >= 1, "the refusal is a fault event too"
    assert [m.start for m in r.mappings(1)] == [0x100000]
    a = Dma(r, EP_A, memory)
    a.load(0x100000, 0x10000)
    assert a.faults(0x200000, 4 * MIB - PAGE), "the first area was rolled back"
    with inject_failure(Op.IOAS_UNMAP, nth=0, err=errno.EIO) as inj:
        assert send(r, UnmapRequest(1, 0x100000, 0x100FFF)) == Status.DEVERR
    assert inj.fired and len(r.mappings(1)) == 1
    assert a.lands(0x100000, 0x10000)
    ioas = r.domain_ioas(1)
    assert ioas is not None and ioas.charged == PAGE and ioas.unmap_all() == PAGE


_MEMLOCK_CHILD = r'''
import json, resource, sys
from hostrelay import GuestMemory, Relay
from hostrelay.model.wire import AttachRequest, MapRequest, Status, TAIL_SIZE
from hostrelay.kernel.errors import VfioError
from hostrelay.backends.type1 import has_cap_ipc_lock, locked_bytes
from exhaustion_child import drop_cap_ipc_lock  # tests/ is on PYTHONPATH


def pinned() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmPin:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmPin")


drop_cap_ipc_lock()
assert not has_cap_ipc_lock()
base = locked_bytes()
limit = base + 64 * 1024
resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))

def send(r, req):
    return Status(r.handle_request(req.pack(), TAIL_SIZE)[0])

out = {}
with GuestMemory() as mem:
    mem.add_region(0, 8 << 20)
    r = Relay(mem, bypass=False, vfio_backend="iommufd")
    eps = list(range(1, len(sys.argv)))
    for ep, bdf in zip(eps, sys.argv[1:]):
        r.add_vfio_endpoint(ep, bdf)
    for ep in eps:
        assert send(r, AttachRequest(1, ep)) == Status.OK
    out["per_process"] = r.stats()["iommufd"]["per_process_accounting"]
    p0, l0 = pinned(), locked_bytes()
    assert send(r, MapRequest(1, 0x100000, 0x100FFF, 0x10000, 3)) == Status.OK
    out["vmpin_map"] = pinned() - p0
    out["vmlck_map"] = locked_bytes() - l0
    out["predicted_map"] = r.stats()["total"]["charged_bytes"]
    # Far more than the limit allows: NOMEM before the kernel, nothing changed.
    before = r.mappings(1)
    p1, l1 = pinned(), locked_bytes()
    out["nomem"] = int(send(r, MapRequest(1, 0x400000, 0x41FFFF, 0x100000, 3)))
    out["delta_refused"] = [pinned() - p1, locked_bytes() - l1]
    out["unchanged"] = r.mappings(1) == before
    # The kernel itself would have refused it (the relay was first).
    ioas = r.domain_ioas(1)
    try:
        ioas.ioas.map(0x400000, 0x20000, mem.host_address(0x100000))
        out["kernel"] = "mapped"
    except VfioError as exc:
        out["kernel"] = exc.errno
    out["unmap_all"] = ioas.unmap_all()
    r.close()
print(json.dumps(out))
'''


@pytest.mark.vfio(edu=4, iommufd=True)
def test_one_page_for_four_devices_is_pinned_and_charged_once(edu_bdfs: list[str], tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(_MEMLOCK_CHILD))
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{root}:{root / 'tests'}")
    proc = subprocess.run([sys.executable, str(script), *edu_bdfs[:4]], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["per_process"], out  # root keeps CAP_SYS_RESOURCE: mm->locked_vm accounting
    assert out["vmpin_map"] == PAGE, out  # four devices, one IOAS: one page pinned
    assert out["vmlck_map"] == out["predicted_map"] == PAGE, out
    assert out["nomem"] == Status.NOMEM and out["delta_refused"] == [0, 0] and out["unchanged"], out
    assert out["kernel"] == errno.ENOMEM, out
    assert out["unmap_all"] == PAGE, out


@pytest.mark.vfio(edu=3, iommufd=True)
def test_a_move_is_one_replace_whatever_the_number_of_mappings(make_relay: Callable[..., Relay],
                                                              memory: GuestMemory) -> None:  # fmt: skip
    """A device moved between two domains of 10 000 mappings each makes the same
    kernel calls as a move with 1: one page-table replace, no map, unmap or copy.

    Counted, not timed: the wrapper call counts are exact, where wall time
    under TCG varies from run to run by more than the difference sought.
    """
    from hostrelay.kernel.ioctl import Op, call_counts, counting

    r = make_relay(endpoints=3, bypass=False)
    a, b = Dma(r, EP_A, memory), Dma(r, EP_B, memory)
    x = 0x28  # a third device keeps domain 1's IOAS (and its page table) while A is in 2
    base = {1: 0x1000000, 2: 0x4000000}  # IOVAs (edu DMA reaches below 256 MiB)
    ram = {1: 0, 2: 2 * MIB}  # GPAs, 256 pages each

    def moves(n: int) -> list[dict[Op, int]]:
        # Domains 1 and 2 with n one-page mappings each, each with a device
        # of its own attached (x, B), so both IOASes and their page tables
        # live while A goes back and forth: the case of a guest that moves
        # one device between two busy domains.
        for dom in (1, 2):
            assert send(r, AttachRequest(dom, x if dom == 1 else EP_B)) == Status.OK
            for i in range(n):
                iova, gpa = base[dom] + i * PAGE, ram[dom] + (i % 256) * PAGE
                assert send(r, MapRequest(dom, iova, iova + PAGE - 1, gpa, RW)) == Status.OK
        assert send(r, AttachRequest(1, EP_A)) == Status.OK
        counts = []
        for dom in (2, 1, 2):
            with counting():
                assert send(r, AttachRequest(dom, EP_A)) == Status.OK
            counts.append(call_counts())
        # A reaches domain 2's buffer (its last mapping) and faults on domain 1's.
        last = n - 1
        a.load(base[2], ram[2])
        assert a.lands(base[2] + last * PAGE, ram[2] + (last % 256) * PAGE)
        assert a.faults(base[1] + last * PAGE, ram[1] + (last % 256) * PAGE)
        assert b.lands(base[2], ram[2]) if b.load(base[2], ram[2]) is None else False
        r.reset()
        return counts

    one, many = moves(1), moves(10_000)
    # Each move: the replace (Linux >= 6.9 replaces an attached device's page
    # table in one VFIO_DEVICE_ATTACH_IOMMUFD_PT) and a re-read of the usable
    # IOVA ranges, which an attach can narrow; nothing that walks mappings.
    for counts in one + many:
        made = {op: c for op, c in counts.items() if c}
        assert made == {Op.DEVICE_ATTACH: 1, Op.IOAS_IOVA_RANGES: 1}, made
    assert many == one


def test_auto_picks_iommufd_here_and_a_group_is_opened_one_way(memory: GuestMemory, edu_bdfs: list[str]) -> None:
    from hostrelay.backends.iommufd import iommufd_usable

    assert iommufd_usable(edu_bdfs[0]) is None
    r = Relay(memory, vfio_backend="auto", bypass=False)
    try:
        dev = r.add_vfio_endpoint(EP_A, edu_bdfs[0])
        assert getattr(dev, "cdev", "").startswith("/dev/vfio/devices/vfio"), "auto chose iommufd"
        assert r.iommufd_group(EP_A).group_id == r.iommufd_group(EP_A).group_id
        with pytest.raises(ValueError, match="not a VFIO endpoint"):
            r.vfio_backend(EP_A)
        # The other edu through type1 in the same relay: both kinds serve one domain.
        r.add_vfio_endpoint(EP_B, edu_bdfs[1], backend="type1")
        a, b = Dma(r, EP_A, memory), Dma(r, EP_B, memory)
        for ep in (EP_A, EP_B):
            assert send(r, AttachRequest(1, ep)) == Status.OK
        assert send(r, MapRequest(1, IOVA_1, IOVA_1 + PAGE - 1, GPA_1, RW)) == Status.OK
        a.load(IOVA_1, GPA_1)
        b.load(IOVA_1, GPA_1)
        assert a.lands(IOVA_1, GPA_1) and b.lands(IOVA_1, GPA_1)
        assert r.stats()["domains"][1]["containers"] == 2, "one IOAS and one type1 container"
        assert send(r, UnmapRequest(1, IOVA_1, IOVA_1 + PAGE - 1)) == Status.OK
        assert a.faults(IOVA_1, GPA_1) and b.faults(IOVA_1, GPA_1)
    finally:
        r.close()
