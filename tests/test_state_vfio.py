"""Save and restore against the real kernel, on both VFIO backends (runs in the testbed).

A relay with two domains, an emulated endpoint and passed-through edu
functions, config bypass on, 1 000 mappings and requests in flight on its
ring is saved and torn down (every fd closed); a new relay over the same
functions and guest memory restores it.  The proof is the devices' own DMA:
each reaches exactly its domain's mappings again (or all guest RAM, in
bypass) and faults elsewhere; the kernel holds exactly the tables (its
unmap-all byte counts); the ring goes on with the next request.  Every way a
state is refused leaves the new relay empty and the kernel with nothing
mapped.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hostrelay import GuestMemory, Relay
from hostrelay.drivers.virtqueue import DriverQueue
from hostrelay.errors import StateError
from hostrelay.kernel.ioctl import Op, inject_failure
from hostrelay.model.wire import TAIL_SIZE, AttachRequest, MapFlag, MapRequest, Status, UnmapRequest
from state_blobs import refusals
from test_vfio_relay import Dma

PAGE = 0x1000
MIB = 1 << 20
RAM = 16 * MIB
RW = int(MapFlag.READ | MapFlag.WRITE)
EP_E, EP_A, EP_B, EP_C = 0x8, 0x18, 0x20, 0x28  # emulated; three edu functions
RING = 12 * MIB
N_MAPPINGS = 1000

pytestmark = pytest.mark.vfio(edu=3, backend=("type1", "iommufd"))


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory() as m:
        m.add_region(0, 8 * MIB)
        m.add_region(8 * MIB, 8 * MIB)
        yield m


def send(r: Relay, req: AttachRequest | MapRequest | UnmapRequest) -> Status:
    return Status(r.handle_request(req.pack(), TAIL_SIZE)[0])


_OPEN: list[Relay] = []


@pytest.fixture(autouse=True)
def _close_relays() -> Iterator[None]:
    """A failed test must not leave the functions open (the next test could not open them)."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def new_relay(memory: GuestMemory, bdfs: list[str], backend: str, *, with_c: bool = True) -> Relay:
    r = Relay(memory, bypass=False, vfio_backend=backend)
    _OPEN.append(r)
    r.add_endpoint(EP_E)
    for ep, bdf in zip((EP_A, EP_B, EP_C) if with_c else (EP_A, EP_B), bdfs):
        r.add_vfio_endpoint(ep, bdf)
    return r


def iova_of(i: int) -> int:
    return 0x100000 + 2 * i * PAGE  # below edu's 28-bit DMA mask; every other page a hole


def gpa_of(i: int) -> int:
    return 0x10000 + (i * PAGE) % (6 * MIB)


def kernel_bytes(r: Relay, backend: str) -> dict[str, int]:
    """What the kernel holds for each address space, emptied to count it (teardown only)."""
    if backend == "type1":
        return {name: r.vfio_backend(ep).unmap_all() for name, ep in (("A", EP_A), ("B", EP_B), ("C", EP_C))}
    out = {}
    for name, dom in (("A", 1), ("B", 2)):
        ioas = r.domain_ioas(dom)
        out[name] = ioas.unmap_all() if ioas is not None else 0
    ident = r.bypass_ioas()
    out["C"] = ident.unmap_all() if ident is not None else 0
    return out


def assert_nothing_mapped(r: Relay, backend: str) -> None:
    assert r.domain_ids() == [] and r.bypass is False
    with pytest.raises(ValueError):
        r.queue_position(0)
    if backend == "type1":
        for ep in (EP_A, EP_B, EP_C):
            assert r.vfio_backend(ep).stats()["entries"] == 0
    else:
        assert r.domain_ioas(1) is None and r.domain_ioas(2) is None
        assert r.bypass_ioas() is None or r.bypass_ioas().stats()["entries"] == 0  # type: ignore[union-attr]
    assert kernel_bytes(r, backend) == {"A": 0, "B": 0, "C": 0}, "the kernel holds nothing of the state"


def build(memory: GuestMemory, bdfs: list[str], backend: str) -> tuple[Relay, DriverQueue, list[int]]:
    r = new_relay(memory, bdfs, backend)
    r.ack_features(r.device_features)
    r.write_config(36, b"\1")  # config bypass on: the unattached C reaches all guest RAM
    q = DriverQueue(memory, RING, 64, data_size=MIB)
    r.set_queue(0, size=q.size, desc=q.desc, avail=q.avail, used=q.used_ring)
    for dom, ep in ((1, EP_E), (1, EP_A), (2, EP_B)):
        assert send(r, AttachRequest(dom, ep)) == Status.OK
    for i in range(N_MAPPINGS):
        dom = 1 if i % 2 else 2  # odd: domain 1 (E and A), even: domain 2 (B)
        assert send(r, MapRequest(dom, iova_of(i), iova_of(i) + PAGE - 1, gpa_of(i), RW)) == Status.OK
    # Ring traffic: two MAPs served, then two requests the device has not taken.
    for k in range(2):
        q.add([MapRequest(1, 0x4000000 + k * PAGE, 0x4000000 + k * PAGE + PAGE - 1, 0x700000 + k * PAGE, RW).pack()], [4])
    assert r.process_queue() == 2
    q.used()
    outs = []
    for req in (UnmapRequest(1, 0x4000000, 0x4000FFF), MapRequest(2, 0x5000000, 0x5000FFF, 0x710000, RW)):
        _, (o,) = q.add([req.pack()], [4])
        outs.append(o)
    return r, q, outs


def test_save_teardown_restore_devices_reach_exactly_their_domains(memory: GuestMemory, edu_bdfs: list[str],
                                                                   vfio_backend: str) -> None:  # fmt: skip
    r, q, outs = build(memory, edu_bdfs, vfio_backend)
    a, b, c = Dma(r, EP_A, memory), Dma(r, EP_B, memory), Dma(r, EP_C, memory)
    a.load(iova_of(1), gpa_of(1))  # each device's buffer holds its pattern from now on
    b.load(iova_of(0), gpa_of(0))
    c.load(0x300000, 0x300000)
    assert a.lands(iova_of(1), gpa_of(1)) and b.lands(iova_of(0), gpa_of(0)) and c.lands(0x300000, 0x300000)
    blob = r.save_state()
    want = {d: r.mappings(d) for d in r.domain_ids()}
    pos = r.queue_position(0)
    assert pos.next_avail == 2 and len(want[1]) + len(want[2]) == N_MAPPINGS + 2
    r.close()  # every fd closed: the kernel drops every mapping and identity map

    r2 = new_relay(memory, edu_bdfs, vfio_backend)
    a, b, c = Dma(r2, EP_A, memory), Dma(r2, EP_B, memory), Dma(r2, EP_C, memory)
    Dma.logged_faults = 0
    assert a.faults(iova_of(1), gpa_of(1)) and b.faults(iova_of(0), gpa_of(0)) and c.faults(0x300000, 0x300000)
    assert Dma.logged_faults >= 1, "the IOMMU blocked the DMA of the new, empty relay (a DMAR fault)"
    r2.restore_state(blob)
    a.load(iova_of(1), gpa_of(1))  # the buffers again, through the restored mappings
    b.load(iova_of(0), gpa_of(0))
    c.load(0x300000, 0x300000)
    assert {d: r2.mappings(d) for d in r2.domain_ids()} == want
    # Each device reaches its domain's mappings (first, middle, last) and faults on the other's.
    for i in (1, 499, N_MAPPINGS - 1):
        assert a.lands(iova_of(i), gpa_of(i)), f"A, mapping {i}"
        assert b.faults(iova_of(i), gpa_of(i)), f"B reaches domain 1's mapping {i}"
    for i in (0, 500, N_MAPPINGS - 2):
        assert b.lands(iova_of(i), gpa_of(i)), f"B, mapping {i}"
        assert a.faults(iova_of(i), gpa_of(i)), f"A reaches domain 2's mapping {i}"
    assert a.faults(iova_of(1) + PAGE, gpa_of(1) + PAGE), "a hole between mappings"
    assert a.lands(0x4000000, 0x700000), "a MAP the ring served before the save"
    assert c.lands(0x300000, 0x300000) and c.lands(9 * MIB, 9 * MIB), "C is unattached in bypass: identity"
    assert r2.translate(EP_E, iova_of(3) + 4, 4, write=True) == gpa_of(3) + 4, "the emulated endpoint too"
    # The ring continues with the next request: the UNMAP and the MAP in flight, nothing replayed.
    assert r2.process_queue() == 2
    assert [Status(memory.read(o, 1)[0]) for o in outs] == [Status.OK, Status.OK]
    assert a.faults(0x4000000, 0x700000), "the in-flight UNMAP took effect"
    assert b.lands(0x5000000, 0x710000), "the in-flight MAP took effect"
    assert r2.queue_position(0).next_avail == 4
    # The tables equal the kernel.
    table = {d: sum(m.size for m in r2.mappings(d)) for d in r2.domain_ids()}
    got = kernel_bytes(r2, vfio_backend)
    assert got == {"A": table[1], "B": table[2], "C": RAM}, (got, table)
    r2.close()


def test_every_refusal_leaves_the_kernel_with_nothing_mapped(memory: GuestMemory, edu_bdfs: list[str],
                                                             vfio_backend: str) -> None:  # fmt: skip
    r, _, _ = build(memory, edu_bdfs, vfio_backend)
    blob = r.save_state()
    r.close()
    cases = list(refusals(blob, ram=RAM))
    for name, bad, why in cases:
        r2 = new_relay(memory, edu_bdfs, vfio_backend)
        with pytest.raises(StateError, match=why):
            r2.restore_state(bad)
        assert_nothing_mapped(r2, vfio_backend)
        r2.close()
    # Different endpoints: this relay lacks one of the functions.
    r2 = new_relay(memory, edu_bdfs, vfio_backend, with_c=False)
    with pytest.raises(StateError, match=r"different endpoints: only in the state 0x28 \(vfio"):
        r2.restore_state(blob)
    assert r2.domain_ids() == []
    r2.close()
    # The kernel refuses a MAP half-way (the 600th): everything before it is undone.
    r2 = new_relay(memory, edu_bdfs, vfio_backend)
    op = Op.MAP_DMA if vfio_backend == "type1" else Op.IOAS_MAP
    with inject_failure(op, nth=600) as inj:
        with pytest.raises(StateError, match="undone"):
            r2.restore_state(blob)
    assert inj.fired
    assert_nothing_mapped(r2, vfio_backend)
    r2.close()
    # A relay that has state already.
    r2 = new_relay(memory, edu_bdfs, vfio_backend)
    assert send(r2, AttachRequest(9, EP_A)) == Status.OK
    with pytest.raises(StateError, match="already has state"):
        r2.restore_state(blob)
    assert r2.domain_ids() == [9]
    r2.close()


@pytest.mark.vfio(edu=3, iommufd=True)
def test_a_type1_state_restores_into_iommufd_not_back(memory: GuestMemory, edu_bdfs: list[str]) -> None:
    """The VFIO backend is the host's business, as long as what the driver was shown still holds.

    type1 shows the IOMMU's page sizes (4K|2M|1G here), iommufd any multiple
    of 4 KiB: a type1 state moves to iommufd (which then presents the saved,
    narrower mask), an iommufd state cannot move to type1.  The iommufd
    kernel keeps the real type1 container beside iommufd, so both run in one boot.
    """
    r, _, _ = build(memory, edu_bdfs, "type1")
    blob = r.save_state()
    shown = r.page_size_mask
    r.close()
    r2 = new_relay(memory, edu_bdfs, "iommufd")
    r2.restore_state(blob)
    assert r2.page_size_mask == shown
    a, b = Dma(r2, EP_A, memory), Dma(r2, EP_B, memory)
    a.load(iova_of(1), gpa_of(1))
    b.load(iova_of(0), gpa_of(0))
    assert a.lands(iova_of(1), gpa_of(1)) and a.faults(iova_of(0), gpa_of(0))
    assert b.lands(iova_of(0), gpa_of(0)) and b.faults(iova_of(1), gpa_of(1))
    table = {d: sum(m.size for m in r2.mappings(d)) for d in r2.domain_ids()}
    back = r2.save_state()
    assert kernel_bytes(r2, "iommufd") == {"A": table[1], "B": table[2], "C": RAM}
    r2.close()
    r3 = new_relay(memory, edu_bdfs, "type1")
    r3.restore_state(back)  # the saved mask is type1's own: it fits again
    assert {d: sum(m.size for m in r3.mappings(d)) for d in r3.domain_ids()} == table
    r3.close()
    r, _, _ = build(memory, edu_bdfs, "iommufd")
    blob = r.save_state()
    r.close()
    r4 = new_relay(memory, edu_bdfs, "type1")
    with pytest.raises(StateError, match="page_size_mask differs"):
        r4.restore_state(blob)
    assert_nothing_mapped(r4, "type1")


@pytest.mark.vfio(edu=2)
def test_fuzzed_blobs_never_map_anything_invalid_in_the_kernel(memory: GuestMemory, edu_bdfs: list[str]) -> None:
    """2 000 damaged states against type1: a refusal leaves the containers empty; an accepted
    (re-sealed, still consistent) one holds exactly its own mappings in the kernel.

    The 10 000-blob run without a kernel is tests/test_state.py; this one shows the kernel side.
    """
    import random

    from state_blobs import mutate

    def fresh() -> Relay:
        r = Relay(memory, bypass=False)
        _OPEN.append(r)
        r.add_endpoint(EP_E)
        for ep, bdf in zip((EP_A, EP_B), edu_bdfs):
            r.add_vfio_endpoint(ep, bdf)
        return r

    r = fresh()
    for dom, ep in ((1, EP_E), (1, EP_A), (2, EP_B)):
        assert send(r, AttachRequest(dom, ep)) == Status.OK
    for i in range(24):
        dom = 1 if i % 2 else 2
        assert send(r, MapRequest(dom, iova_of(i), iova_of(i) + PAGE - 1, gpa_of(i), RW)) == Status.OK
    blob = r.save_state()
    r.close()
    rng = random.Random(2)
    r2, counts = fresh(), {"refused": 0, "restored": 0}
    for n in range(2000):
        bad = mutate(blob, rng)
        try:
            state = r2.restore_state(bad)
        except StateError:
            counts["refused"] += 1
            entries = [r2.vfio_backend(ep).stats()["entries"] for ep in (EP_A, EP_B)]
            assert r2.domain_ids() == [] and entries == [0, 0], f"blob {n}: a refusal left {entries} kernel entries"
            continue
        counts["restored"] += 1
        want = {d.id: list(d.mappings) for d in state.domains}
        assert {d: r2.mappings(d) for d in r2.domain_ids()} == want, f"blob {n}"
        for ep in (EP_A, EP_B):
            where = r2.endpoint_domain(ep)
            table = sum(m.size for m in want[where] if not m.flags & MapFlag.MMIO) if where is not None else 0
            assert r2.vfio_backend(ep).unmap_all() == table, f"blob {n}: the kernel holds other than the table"
        r2.close()
        r2 = fresh()
    assert counts["refused"] > 1000 and counts["restored"] > 20, counts
