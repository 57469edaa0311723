"""The relay against the real kernel: guest MAP/UNMAP become VFIO mappings.

Runs inside the testbed (Linux 6.12, emulated intel-iommu, QEMU ``edu``
devices as DMA engines).  Every request goes through ``Relay.handle_request``
encoded as a guest driver would send it; the proof that a mapping took effect
(or did not) is the device's own DMA landing in guest memory (or faulting,
with a DMAR fault in dmesg).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hostrelay import GuestMemory, Relay
from hostrelay.kernel.ioctl import Op, inject_failure
from hostrelay.model.wire import (
    TAIL_SIZE,
    AttachFlag,
    AttachRequest,
    DetachRequest,
    MapFlag,
    MapRequest,
    ProbeRequest,
    ResvMemType,
    Status,
    UnmapRequest,
    parse_properties,
    unpack_resv_mem,
)

PAGE = 0x1000
MIB = 1 << 20
RW = int(MapFlag.READ | MapFlag.WRITE)
EP_A, EP_B = 0x18, 0x20  # requester IDs; any u32 works
N = 256  # bytes per probe DMA (edu transfers are <= 2048)


def send(r: Relay, req: AttachRequest | DetachRequest | MapRequest | UnmapRequest) -> Status:
    out = r.handle_request(req.pack(), TAIL_SIZE)
    assert len(out) == TAIL_SIZE
    return Status(out[0])


def _dmesg() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.splitlines()


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
        r = Relay(memory, **options)
        relays.append(r)
        for ep, bdf in zip((EP_A, EP_B), edu_bdfs[:endpoints]):
            r.add_vfio_endpoint(ep, bdf)
        return r

    yield make
    for r in relays:
        r.close()


class Dma:
    """An edu device's DMA as seen from guest memory."""

    def __init__(self, relay: Relay, endpoint: int, memory: GuestMemory) -> None:
        from hostrelay.drivers.edu import Edu

        self.edu = Edu(relay.vfio_device(endpoint))
        self.memory = memory
        self.pattern = bytes((endpoint * 31 + i * 7 + 1) & 0xFF or 1 for i in range(N))

    def load(self, iova: int, gpa: int) -> None:
        """Fill the device buffer from ``iova`` (which must reach ``gpa``)."""
        self.memory.write(gpa, self.pattern)
        self.edu.to_device(iova, N)

    def lands(self, iova: int, gpa: int) -> bool:
        """Device writes its buffer to ``iova``: True if it arrives at ``gpa``."""
        self.memory.write(gpa, bytes(N))
        self.edu.from_device(iova, N)
        got = self.memory.read(gpa, N)
        assert got in (self.pattern, bytes(N)), "partial or foreign data"
        return got == self.pattern

    def faults(self, iova: int, gpa: int) -> bool:
        """The write to ``iova`` does not land at ``gpa``.

        Whether the IOMMU logged it is recorded in :attr:`logged_faults`: the
        DMAR fault lines are printed from the fault interrupt (asynchronously)
        and rate-limited (``pr_err_ratelimited``, 10 per 5 s), so not every
        blocked write gets its own line.
        """
        before = len(_dmesg())
        landed = self.lands(iova, gpa)
        for _ in range(20):
            # intel-iommu: "DMAR: [DMA Write ...] ... fault"; virtio-iommu:
            # "virtio_iommu virtio0: page fault from EP ..." (Linux 6.12).
            if any("DMAR" in line or "page fault from EP" in line for line in _dmesg()[before:]):
                Dma.logged_faults += 1
                break
            time.sleep(0.05)
        return not landed

    logged_faults = 0


def _separate_groups(relay: Relay) -> None:
    if relay.vfio_backend(EP_A) is relay.vfio_backend(EP_B):
        pytest.skip("both edu functions share one IOMMU group in this testbed")


# IOVA -> GPA of each domain's test mapping (two pages each; edu needs IOVA < 256 MiB).
IOVA_1, GPA_1 = 0x100000, 0x10000
IOVA_2, GPA_2 = 0x200000, 0x20000


@pytest.mark.vfio(edu=2, iommu=("intel", "virtio"))
def test_two_domains_isolation_attach_moves_detach_faults(
    vfio_iommu: str, make_relay: Callable[..., Relay], memory: GuestMemory
) -> None:
    r = make_relay(bypass=False)
    _separate_groups(r)
    a, b = Dma(r, EP_A, memory), Dma(r, EP_B, memory)
    assert send(r, AttachRequest(1, EP_A)) == Status.OK
    assert send(r, AttachRequest(2, EP_B)) == Status.OK
    assert send(r, MapRequest(1, IOVA_1, IOVA_1 + 2 * PAGE - 1, GPA_1, RW)) == Status.OK
    assert send(r, MapRequest(2, IOVA_2, IOVA_2 + 2 * PAGE - 1, GPA_2, RW)) == Status.OK
    a.load(IOVA_1, GPA_1)
    b.load(IOVA_2, GPA_2)
    # Each device reaches its own domain's mapping...
    assert a.lands(IOVA_1 + PAGE, GPA_1 + PAGE)
    assert b.lands(IOVA_2 + PAGE, GPA_2 + PAGE)
    # ...and faults on the other's IOVAs.
    Dma.logged_faults = 0
    assert a.faults(IOVA_2 + PAGE, GPA_2 + PAGE)
    assert b.faults(IOVA_1 + PAGE, GPA_1 + PAGE)
    assert Dma.logged_faults >= 1, f"the {vfio_iommu} IOMMU logged no fault"

    st = r.stats()
    assert st["domains"][1]["charged_bytes"] == 2 * PAGE and st["domains"][2]["pinned_bytes"] == 2 * PAGE
    assert st["total"]["charged_bytes"] == 4 * PAGE and st["total"]["entries"] == 2

    # ATTACH A to domain 2: its container drops domain 1's mapping, gets domain 2's.
    assert send(r, AttachRequest(2, EP_A)) == Status.OK
    assert r.domain_ids() == [2], "domain 1 died with its last endpoint"
    assert a.lands(IOVA_2 + PAGE, GPA_2 + PAGE)
    assert a.faults(IOVA_1 + PAGE, GPA_1 + PAGE)
    st = r.stats()
    assert st["domains"][2] == {"mappings": 1, "containers": 2, "pinned_bytes": 2 * PAGE, "charged_bytes": 4 * PAGE}
    # A MAP in a two-container domain reaches both devices.
    assert send(r, MapRequest(2, 0x300000, 0x300FFF, 0x30000, RW)) == Status.OK
    assert a.lands(0x300000, 0x30000) and b.lands(0x300000, 0x30000)
    assert send(r, UnmapRequest(2, 0x300000, 0x300FFF)) == Status.OK
    assert a.faults(0x300000, 0x30000) and b.faults(0x300000, 0x30000)

    # DETACH: A reaches nothing, B keeps the domain.
    assert send(r, DetachRequest(2, EP_A)) == Status.OK
    assert a.faults(IOVA_2 + PAGE, GPA_2 + PAGE)
    assert b.lands(IOVA_2 + PAGE, GPA_2 + PAGE)
    assert r.vfio_backend(EP_A).unmap_all() == 0, "the detached container holds nothing"
    assert r.vfio_backend(EP_B).unmap_all() == 2 * PAGE, "B's container equals the table"


@pytest.mark.vfio(edu=2, iommu=("intel", "virtio"))
def test_bypass_identity_map_follows_config_and_bypass_domains(
    vfio_iommu: str, make_relay: Callable[..., Relay], memory: GuestMemory
) -> None:
    r = make_relay(bypass=True)
    a = Dma(r, EP_A, memory)
    src, dst = 0x50000, 0x51000
    # Unattached with config bypass = 1: IOVA = GPA over all guest RAM.
    a.load(src, src)
    assert a.lands(dst, dst) and a.lands(6 * MIB, 6 * MIB), "identity over both RAM regions"
    assert r.stats()["bypass"]["charged_bytes"] == 2 * 8 * MIB  # both containers pin all RAM
    # The driver clears bypass: the identity map goes.
    r.write_config(36, b"\0")
    assert a.faults(dst, dst)
    assert r.vfio_backend(EP_A).stats()["entries"] == 0
    # A bypass domain brings it back, and a normal domain takes it away.
    assert send(r, AttachRequest(7, EP_A, AttachFlag.BYPASS)) == Status.OK
    assert a.lands(dst, dst)
    assert send(r, AttachRequest(8, EP_A)) == Status.OK
    assert a.faults(dst, dst)
    assert send(r, MapRequest(8, 0x100000, 0x100FFF, dst, RW)) == Status.OK
    assert a.lands(0x100000, dst)
    # Back to unattached with bypass on: identity again, the domain's mapping gone.
    r.write_config(36, b"\1")
    assert send(r, DetachRequest(8, EP_A)) == Status.OK
    assert a.lands(dst, dst)
    assert a.lands(0x100000, 0x100000), "IOVA 0x100000 is identity again, not domain 8's mapping"
    assert r.vfio_backend(EP_A).stats()["identity_bytes"] == 8 * MIB


@pytest.mark.vfio(edu=2)
def test_host_reality_config_probe_and_refusals(make_relay: Callable[..., Relay], memory: GuestMemory) -> None:
    r = make_relay(bypass=False)
    info = r.vfio_backend(EP_A).info
    assert r.page_size_mask & -r.page_size_mask == PAGE
    assert r.page_size_mask & ~info.iova_pgsizes == 0
    cfg = r.config()
    assert (cfg.input_start, cfg.input_end) == (info.iova_ranges[0].start, info.iova_ranges[-1].end)
    probe = r.handle_request(ProbeRequest(EP_A).pack(), cfg.probe_size + TAIL_SIZE)
    assert probe[-TAIL_SIZE] == Status.OK
    resv = [unpack_resv_mem(p) for p in parse_properties(probe[:-TAIL_SIZE])]
    msi = [x for x in resv if x.subtype == ResvMemType.MSI]
    assert [(x.start, x.end) for x in msi] == [(0xFEE00000, 0xFEEFFFFF)]
    # Every hole between usable ranges is reported.
    ranges = sorted((x.start, x.end) for x in info.iova_ranges)
    for (_, e), (s, _) in zip(ranges, ranges[1:]):
        assert any(x.start <= e + 1 and s - 1 <= x.end for x in resv), f"hole after {e:#x} not reported"
    assert send(r, AttachRequest(1, EP_A)) == Status.OK
    assert send(r, MapRequest(1, 0xFEE00000, 0xFEE00FFF, 0, RW)) == Status.INVAL  # MSI window
    assert send(r, MapRequest(1, 0x100000, 0x100FFF, 64 * MIB, RW)) == Status.FAULT  # not guest RAM
    assert send(r, MapRequest(1, 0x100000, 0x100FFF, 8 * MIB - PAGE // 2, RW)) == Status.RANGE  # granule
    assert r.vfio_backend(EP_A).unmap_all() == 0, "nothing refused was mapped"
    # A MAP spanning both RAM regions: one guest mapping, two vfio_dma entries.
    assert send(r, MapRequest(1, 0x200000, 0x201FFF, 4 * MIB - PAGE, RW)) == Status.OK
    assert r.vfio_backend(EP_A).stats()["entries"] == 2
    a = Dma(r, EP_A, memory)
    a.load(0x200000 + PAGE - N // 2, 4 * MIB - N // 2)  # the DMA crosses the region boundary
    assert a.lands(0x201000, 4 * MIB)
    assert send(r, UnmapRequest(1, 0, (1 << 32) - 1)) == Status.OK
    assert r.vfio_backend(EP_A).stats() | {"group": 0} == {
        "group": 0, "entries": 0, "entry_limit": r.vfio_backend(EP_A).entry_limit, "charged_bytes": 0, "identity_bytes": 0,
    }  # fmt: skip
    # Too late for VFIO endpoints once the driver talks.
    with pytest.raises(RuntimeError):
        r.add_vfio_endpoint(0x99, "0000:00:00.0")


@pytest.mark.vfio(edu=2)
def test_failure_mid_fanout_rolls_back_every_container(make_relay: Callable[..., Relay], memory: GuestMemory) -> None:
    r = make_relay(bypass=False)
    _separate_groups(r)
    ca, cb = r.vfio_backend(EP_A), r.vfio_backend(EP_B)
    assert send(r, AttachRequest(1, EP_A)) == Status.OK
    assert send(r, AttachRequest(1, EP_B)) == Status.OK
    assert send(r, MapRequest(1, 0x100000, 0x100FFF, 0x10000, RW)) == Status.OK
    r.pop_events()
    # The second container of the fan-out fails (EIO): the second MAP ioctl
    # (A's is the first, in attach order) is failed at the kernel seam.
    with inject_failure(Op.MAP_DMA, nth=1, err=errno.EIO) as inj:
        assert send(r, MapRequest(1, 0x200000, 0x203FFF, 0x20000, RW)) == Status.DEVERR
    assert inj.fired and inj.fd == cb.container.fd
    events = r.pop_events()
    assert len(events) == 1 and int.from_bytes(events[0][8:12], "little") == EP_B, "fault event for B"
    assert [m.start for m in r.mappings(1)] == [0x100000]
    a = Dma(r, EP_A, memory)
    a.load(0x100000, 0x10000)
    assert a.faults(0x200000, 0x20000), "A's successful MAP was rolled back"

    with inject_failure(Op.UNMAP_DMA, nth=1, err=errno.EIO) as inj:
        assert send(r, UnmapRequest(1, 0x100000, 0x100FFF)) == Status.DEVERR
    assert inj.fired and inj.fd == cb.container.fd
    assert len(r.mappings(1)) == 1
    assert a.lands(0x100000, 0x10000), "A's unmapped run was re-mapped on rollback"
    # Table and both containers agree: one page each.
    assert ca.stats()["charged_bytes"] == cb.stats()["charged_bytes"] == PAGE
    assert ca.unmap_all() == cb.unmap_all() == PAGE


@pytest.mark.vfio(edu=1, kernel_args=("vfio_iommu_type1.dma_entry_limit=8",))
def test_dma_entry_limit_map_n_plus_1_is_nomem_and_table_equals_kernel(make_relay: Callable[..., Relay]) -> None:
    r = make_relay(endpoints=1, bypass=False)
    c = r.vfio_backend(EP_A)
    assert c.entry_limit == 8
    assert send(r, AttachRequest(1, EP_A)) == Status.OK
    for i in range(8):
        assert send(r, MapRequest(1, 0x100000 + 2 * i * PAGE, 0x100FFF + 2 * i * PAGE, i * PAGE, RW)) == Status.OK
    r.pop_events()
    assert send(r, MapRequest(1, 0x200000, 0x200FFF, 0, RW)) == Status.NOMEM
    # Refused before the ioctl: a kernel refusal (ENOSPC) would have been
    # logged and reported as a fault event.
    assert r.pop_events() == [], "refused before the ioctl"
    assert c.container.iommu_info().dma_avail == 0
    assert len(r.mappings(1)) == 8
    assert c.unmap_all() == sum(m.size for m in r.mappings(1)) == 8 * PAGE


_MEMLOCK_CHILD = r'''
import ctypes, json, resource, sys
from hostrelay import GuestMemory, Relay
from hostrelay.model.wire import AttachRequest, MapRequest, Status, TAIL_SIZE
from hostrelay.kernel.errors import VfioResourceLimit
from hostrelay.backends.type1 import has_cap_ipc_lock, locked_bytes
from exhaustion_child import drop_cap_ipc_lock  # tests/ is on PYTHONPATH

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
    r = Relay(mem, bypass=False)
    for ep, bdf in zip((1, 2), sys.argv[1:]):
        r.add_vfio_endpoint(ep, bdf)
    eps = len(sys.argv) - 1
    assert send(r, AttachRequest(1, 1)) == Status.OK
    if eps == 2:
        assert send(r, AttachRequest(1, 2)) == Status.OK
    # 16 KiB in every container: charged once per container.
    v0 = locked_bytes()
    assert send(r, MapRequest(1, 0x100000, 0x103FFF, 0x10000, 3)) == Status.OK
    out["delta_map"] = locked_bytes() - v0
    out["predicted_map"] = r.stats()["total"]["charged_bytes"]
    out["pinned"] = r.stats()["total"]["pinned_bytes"]
    # The same pages again at another IOVA: charged again.
    v1 = locked_bytes()
    assert send(r, MapRequest(1, 0x200000, 0x203FFF, 0x10000, 3)) == Status.OK
    out["delta_alias"] = locked_bytes() - v1
    out["pinned_after_alias"] = r.stats()["total"]["pinned_bytes"]
    # Far more than the limit allows: NOMEM, nothing changed.
    v2 = locked_bytes()
    before = r.mappings(1)
    out["nomem"] = int(send(r, MapRequest(1, 0x400000, 0x41FFFF, 0x100000, 3)))
    out["delta_refused"] = locked_bytes() - v2
    out["unchanged"] = r.mappings(1) == before
    out["predicted_total"] = r.stats()["total"]["charged_bytes"]
    out["vmlck_total"] = locked_bytes() - base
    # The kernel itself would have refused it (proves the relay was first).
    c = r.vfio_backend(1).container
    try:
        c.map_dma(0x400000, 0x20000, mem.host_address(0x100000))
        out["kernel"] = "mapped"
    except VfioResourceLimit as exc:
        out["kernel"] = exc.errno
    out["unmap_all"] = [r.vfio_backend(ep).unmap_all() for ep in range(1, eps + 1)]
    r.close()
print(json.dumps(out))
'''


@pytest.mark.vfio(edu=2)
def test_memlock_nomem_before_the_kernel_and_vmlck_moves_as_predicted(edu_bdfs: list[str], tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(_MEMLOCK_CHILD))
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{root}:{root / 'tests'}")
    proc = subprocess.run([sys.executable, str(script), *edu_bdfs[:2]], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    n = min(2, len(edu_bdfs))
    assert out["delta_map"] == out["predicted_map"] == n * 0x4000, out
    assert out["pinned"] == 0x4000
    assert out["delta_alias"] == n * 0x4000 and out["pinned_after_alias"] == 0x4000, out
    assert out["nomem"] == Status.NOMEM and out["delta_refused"] == 0 and out["unchanged"], out
    assert out["vmlck_total"] == out["predicted_total"] == 2 * n * 0x4000, out
    assert out["kernel"] == errno.ENOMEM, out
    assert out["unmap_all"] == [0x8000] * n, out


@pytest.mark.vfio(edu=1)
def test_auto_falls_back_to_type1_on_a_kernel_without_iommufd(memory: GuestMemory, edu_bdfs: list[str]) -> None:
    from hostrelay.backends.iommufd import iommufd_usable
    from hostrelay.kernel.errors import VfioError

    why = iommufd_usable(edu_bdfs[0])
    assert why is not None and "/dev/iommu" in why, why  # the stock Debian kernel has no CONFIG_IOMMUFD
    r = Relay(memory, vfio_backend="iommufd")
    try:
        with pytest.raises(VfioError, match="/dev/iommu") as exc:
            r.add_vfio_endpoint(EP_A, edu_bdfs[0])
        assert exc.value.errno == errno.ENODEV
    finally:
        r.close()
    r = Relay(memory, vfio_backend="auto")
    try:
        r.add_vfio_endpoint(EP_A, edu_bdfs[0])
        assert r.vfio_backend(EP_A).container.fd >= 0, "auto chose type1"
        # A group is opened one way: its functions cannot also go through iommufd.
        with pytest.raises(ValueError, match="type1 container"):
            r.add_vfio_endpoint(EP_B, edu_bdfs[0], backend="iommufd")
        assert r.endpoint_domain(EP_A) is None
    finally:
        r.close()
