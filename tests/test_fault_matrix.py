"""Every kernel call the relay makes, failed on purpose, against the real kernel.

For each relay operation that reaches VFIO (MAP and UNMAP through each door,
ATTACH that replays a domain, DETACH, bypass on and off by config write and by
ATTACH, close, and adding a VFIO endpoint) the test first counts the wrapper
calls the operation makes (:func:`hostrelay.kernel.ioctl.counting`), then, for
every call index and every errno below, rebuilds the relay from nothing,
makes exactly that call fail at the kernel seam
(:func:`hostrelay.kernel.ioctl.inject_failure`: the ioctl is not issued) and checks:

- the status is the one :func:`hostrelay.dataplane.handle.status_for` (the
  one errno → status table) names for the errno;
- a fault event names the endpoint(s) of the container that failed;
- a refused request left the relay as it was (D-16 moves excepted: there the
  endpoint is left detached, as a DETACH followed by a failed ATTACH);
- the relay's view equals the kernel's in every container: the vfio_dma
  count (DMA_AVAIL), the bytes charged to ``VmLck``, and the bytes an
  unmap-all returns, each against what the relay's tables and identity maps
  say the container holds;
- the bystander domain is untouched;
- after ``close()`` the process has the fds and the pinned/locked memory it
  had before the relay existed.

Mismatches are collected, printed with the size of the matrix, and must be
none.  Each edu function is its own IOMMU group under the testbed's intel
IOMMU, so every VFIO endpoint has its own container: a domain of A, B and C
fans out to three containers, and M1 crosses the boundary between the two RAM
regions, so it is two vfio_dma per container.

The marker matches tests/test_exhaustion.py's so both share one testbed boot
(the matrix needs only a handful of entries per container).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from hostrelay import GuestMemory, Relay
from hostrelay.kernel.ioctl import Injection, Op, call_counts, counting, inject_failure
from hostrelay.model.wire import (
    TAIL_SIZE,
    AttachFlag,
    AttachRequest,
    DetachRequest,
    MapFlag,
    MapRequest,
    Status,
    UnmapRequest,
)
from hostrelay.dataplane.handle import status_for
from hostrelay.drivers.virtqueue import DriverQueue
from hostrelay.backends.type1 import VfioBackend

from exhaustion_child import status_kib

pytestmark = pytest.mark.vfio(edu=4, kernel_args=("vfio_iommu_type1.dma_entry_limit=64",))

ERRNOS = (errno.ENOMEM, errno.ENOSPC, errno.EINVAL, errno.EFAULT, errno.EBUSY, errno.EIO, errno.ENODEV)
PAGE = 0x1000
MIB = 1 << 20
RW = int(MapFlag.READ | MapFlag.WRITE)
A, B, C, D = 0x10, 0x18, 0x20, 0x28  # VFIO endpoints: one edu, one group, one container each
E = 0x30  # an emulated endpoint
VFIO_EPS = (A, B, C, D)
HIT, OTHER, BYPASS_DOM = 1, 2, 3  # the domain under test; the bystander (D and E); a bypass domain
# (iova start, iova end, gpa).  M1 crosses the RAM boundary at 1 MiB: two
# vfio_dma per container.  M2 is not IOVA-contiguous with M1, so a DETACH
# unmaps two runs.
M1 = (0x100000, 0x101FFF, MIB - PAGE)
M2 = (0x200000, 0x200FFF, 0x10000)
M_OTHER = (0x300000, 0x300FFF, 0x20000)
RING_GPA = 0x1C0000  # the request queue, in guest RAM (region 2)


# --- process-wide facts the relay must restore --------------------------------


def process_footprint() -> tuple[int, int, int]:
    """(open fds, VmLck KiB, VmPin KiB): type1 charges pins to VmLck (locked_vm,
    Linux 6.12 vfio_lock_acct); VmPin (pinned_vm) is what FOLL_LONGTERM users
    such as io_uring and RDMA charge, and must not move either."""
    return len(os.listdir("/proc/self/fd")), status_kib("VmLck"), status_kib("VmPin")


# --- one fresh relay -------------------------------------------------------------


class World:
    """A relay over the shared guest memory: A, B, C, D on VFIO, E (and ``emulated``) emulated.

    ``vfio_backend`` is how the VFIO endpoints are opened (tests/test_fault_matrix_iommufd.py
    builds the same world on iommufd).
    """

    def __init__(self, memory: GuestMemory, bdfs: list[str], *, bypass: bool, ring: bool, skip: int | None,
                 vfio_backend: str = "type1", emulated: tuple[int, ...] = (E,)) -> None:  # fmt: skip
        self.memory = memory
        self.bdfs = dict(zip(VFIO_EPS, bdfs))
        self.r = Relay(memory, bypass=bypass, vfio_backend=vfio_backend)
        self.q: DriverQueue | None = None
        try:
            for ep in VFIO_EPS:
                if ep != skip:
                    self.r.add_vfio_endpoint(ep, self.bdfs[ep])
            for ep in emulated:
                self.r.add_endpoint(ep)
            if ring:
                self.q = DriverQueue(memory, RING_GPA, 16, data_size=0x4000)
                self.r.set_queue(0, size=self.q.size, desc=self.q.desc, avail=self.q.avail, used=self.q.used_ring)
        except BaseException:
            self.r.close()
            raise

    def backends(self) -> dict[int, VfioBackend]:
        out = {}
        for ep in VFIO_EPS:
            try:
                out[ep] = self.r.vfio_backend(ep)
            except KeyError:
                pass  # not added (the add_vfio_endpoint scenario)
        return out

    # The three doors a MAP/UNMAP can come through.
    def send(self, req: Any) -> Status:
        """handle_request with bytes: the C fast path for MAP/UNMAP."""
        out = self.r.handle_request(req.pack(), TAIL_SIZE)
        assert len(out) == TAIL_SIZE
        return Status(out[0])

    def send_view(self, req: Any) -> Status:
        """handle_request with a guest-buffer view: the full path (hr_relay_request)."""
        out = self.r.handle_request(memoryview(bytearray(req.pack())), TAIL_SIZE)
        assert len(out) == TAIL_SIZE
        return Status(out[0])

    def send_ring(self, req: Any) -> Status:
        """Through the request virtqueue and the C walker (hr_relay_process)."""
        assert self.q is not None
        _, (tail,) = self.q.add([req.pack()], [TAIL_SIZE])
        assert self.r.process_queue(0) == 1
        (used,) = self.q.used()
        assert used.len == TAIL_SIZE
        return Status(self.memory.read(tail, 1)[0])

    def ok(self, req: Any) -> None:
        st = self.send(req)
        assert st == Status.OK, f"setup {req}: {st.name}"


def _map(domain: int, m: tuple[int, int, int]) -> MapRequest:
    return MapRequest(domain, m[0], m[1], m[2], RW)


Request = AttachRequest | DetachRequest | MapRequest | UnmapRequest
BYSTANDER: tuple[Request, ...] = (AttachRequest(OTHER, D), AttachRequest(OTHER, E), _map(OTHER, M_OTHER))
C_IN_BYPASS_DOMAIN = AttachRequest(BYPASS_DOM, C, AttachFlag.BYPASS)


def _hit(*eps: int, maps: tuple[tuple[int, int, int], ...] = (M1, M2)) -> tuple[Request, ...]:
    """``eps`` attached to the domain under test, then its mappings."""
    return (*(AttachRequest(HIT, ep) for ep in eps), *(_map(HIT, m) for m in maps))


# --- the operations ------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One relay operation, the state it starts from and what a failure must leave."""

    name: str
    bypass: bool  # config bypass when the relay is built
    setup: tuple[Request, ...]  # sent (and answered OK) before the operation
    op: Request | Callable[[World], None]  # a request (it has a status) or a call (none)
    door: str = "send"  # the World method a request goes through
    reports: bool = True  # a kernel failure is reported as a fault event
    atomic: bool = True  # a refusal leaves the relay as it was
    skip: int | None = None  # an endpoint the relay is built without
    after_failure: Callable[[World], str | None] | None = None  # extra check; returns a complaint

    def run(self, w: World) -> Status | None:
        if callable(self.op):
            self.op(w)
            return None
        send: Callable[[Request], Status] = getattr(w, self.door)
        return send(self.op)


def _doors(name: str, setup: tuple[Request, ...], req: Request) -> list[Scenario]:
    return [Scenario(f"{name}/{label}", False, setup, req, door=door)
            for label, door in (("handle_request", "send"), ("handle_request_view", "send_view"), ("ring", "send_ring"))]  # fmt: skip


def _left_detached(w: World) -> str | None:
    # D-16: an ATTACH to another domain is a DETACH then an ATTACH; when the
    # ATTACH part fails the endpoint stays detached (and, config bypass 0,
    # without the identity map).
    dom = w.r.endpoint_domain(C)
    if dom is not None:
        return f"C is in domain {dom} after the failed move"
    if w.r.vfio_backend(C).identity_mapped:
        return "C is detached with config bypass 0 but identity-mapped"
    return None


def _bypass_on(w: World) -> None:
    w.r.write_config(36, b"\1")  # config bypass (5.13.4)


def _bypass_off(w: World) -> None:
    w.r.write_config(36, b"\0")


def _close(w: World) -> None:
    w.r.close()


def _add_d(w: World) -> None:
    w.r.add_vfio_endpoint(D, w.bdfs[D])


SCENARIOS: list[Scenario] = [
    *_doors("map", BYSTANDER + _hit(A, B, C, maps=()), _map(HIT, M1)),
    # One mapping named exactly (the UNMAP fast case) and a range covering two.
    *_doors("unmap", BYSTANDER + _hit(A, B, C), UnmapRequest(HIT, M1[0], M1[1])),
    *_doors("unmap_range", BYSTANDER + _hit(A, B, C), UnmapRequest(HIT, 0, 0x2FFFFF)),
    Scenario("attach_replay", False, BYSTANDER + _hit(A, B), AttachRequest(HIT, C)),
    # C comes from config bypass: its identity map goes, then the replay.
    Scenario("attach_replay_from_bypass", True, BYSTANDER + _hit(A, B), AttachRequest(HIT, C)),
    Scenario("detach", False, BYSTANDER + _hit(A, B, C), DetachRequest(HIT, C)),
    # Config bypass 1: after DETACH, C is identity-mapped again.
    Scenario("detach_to_bypass", True, BYSTANDER + _hit(A, B, C), DetachRequest(HIT, C)),
    # A, B and C unattached: each gets (loses) the identity map.
    Scenario("bypass_on_config", False, BYSTANDER, _bypass_on, atomic=False),
    Scenario("bypass_off_config", True, BYSTANDER, _bypass_off, atomic=False),
    Scenario("bypass_on_attach", False, BYSTANDER, C_IN_BYPASS_DOMAIN),
    Scenario("bypass_off_detach", False, BYSTANDER + (C_IN_BYPASS_DOMAIN,), DetachRequest(BYPASS_DOM, C)),
    # A move out of a bypass domain into HIT: identity unmap, then the replay.
    Scenario("bypass_off_attach_move", False, BYSTANDER + _hit(A, B) + (C_IN_BYPASS_DOMAIN,), AttachRequest(HIT, C),
             atomic=False, after_failure=_left_detached),  # fmt: skip
    Scenario("close", True, BYSTANDER + _hit(A, B), _close, reports=False),
    Scenario("add_vfio_endpoint", True, (), _add_d, reports=False, atomic=False, skip=D),
]


# --- what the relay says each container holds ------------------------------------------------


def expected(w: World, ep: int) -> tuple[int, int]:
    """(vfio_dma entries, bytes) the relay's own state says ``ep``'s container holds.

    From the tables and the identity map, not from the C counters (those
    are checked against this separately).
    """
    r, b = w.r, w.r.vfio_backend(ep)
    members = [e for e in VFIO_EPS if e in w.backends() and w.r.vfio_backend(e) is b]
    domains = {d for d in (r.endpoint_domain(e) for e in members) if d is not None}
    entries = size = 0
    for d in domains:
        if r.domain_is_bypass(d):
            continue
        for m in r.mappings(d):
            if m.flags & RW and not m.flags & MapFlag.MMIO:
                entries += len(w.memory.spans(m.phys, m.size))
                size += m.size
    for _, n in b.identity_pieces():
        entries += 1
        size += n
    return entries, size


def snapshot(w: World, *, bystander_only: bool = False) -> Any:
    """The relay's state as the guest could observe it."""
    r = w.r
    eps = (D, E) if bystander_only else (*w.backends(), E)
    doms = [OTHER] if bystander_only else r.domain_ids()
    return (
        None if bystander_only else r.bypass,
        tuple((ep, r.endpoint_domain(ep)) for ep in eps),
        tuple((d, r.domain_is_bypass(d), tuple(r.domain_endpoints(d)), tuple(r.mappings(d))) for d in doms if d in r.domain_ids()),
        tuple((ep, tuple(b.identity_pieces())) for ep, b in w.backends().items() if not bystander_only or ep == D),
    )


def _diff(before: Any, after: Any) -> str:
    names = ("config bypass", "endpoint -> domain", "domains", "identity maps")
    return "; ".join(f"{n}: {x} -> {y}" for n, x, y in zip(names, before, after) if x != y)


def kernel_mismatches(w: World, base_lck_kib: int) -> list[str]:
    """Relay vs kernel, container by container; empties every container (unmap-all)."""
    out = []
    total = 0
    for ep, b in w.backends().items():
        entries, size = expected(w, ep)
        total += size
        avail = b.container.iommu_info().dma_avail
        assert avail is not None
        if b.entry_limit - avail != entries:
            out.append(f"ep {ep:#x}: kernel has {b.entry_limit - avail} vfio_dma, the relay's tables say {entries}")
        if (b.entries, b.charged) != (entries, size):
            out.append(f"ep {ep:#x}: C counters ({b.entries}, {b.charged:#x}) != tables ({entries}, {size:#x})")
    vmlck = (status_kib("VmLck") - base_lck_kib) * 1024
    if vmlck != total:
        out.append(f"VmLck grew by {vmlck:#x}, the relay's containers should hold {total:#x}")
    for ep, b in w.backends().items():
        _, size = expected(w, ep)
        got = b.unmap_all()
        if got != size:
            out.append(f"ep {ep:#x}: unmap-all removed {got:#x} bytes, the relay expected {size:#x}")
    return out


def _event_endpoints(events: list[bytes]) -> list[int]:
    return sorted(int.from_bytes(ev[8:12], "little") for ev in events)


# --- the matrix ---------------------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    """2 MiB of guest RAM in two memfd regions, shared by every relay of a test."""
    with GuestMemory() as m:
        m.add_region(0, MIB)
        m.add_region(MIB, MIB)
        yield m


def _point(s: Scenario, memory: GuestMemory, bdfs: list[str], base: tuple[int, int, int],
           inject: tuple[int, int] | None) -> tuple[list[str], dict[Op, int]]:  # fmt: skip
    """Build, set up, run ``s`` (with the failure ``(call index, errno)``, or
    none and counting), check, close.  Returns (complaints, call counts)."""
    bad: list[str] = []
    w = World(memory, bdfs, bypass=s.bypass, ring=s.door == "send_ring", skip=s.skip)
    counts: dict[Op, int] = {}
    try:
        for req in s.setup:
            w.ok(req)
        w.r.pop_events()
        before = snapshot(w)
        before_bystander = snapshot(w, bystander_only=True) if s.skip is None else None
        fds_before = process_footprint()[0]
        status: Status | None = None
        raised: BaseException | None = None
        inj: Injection | None = None
        try:
            if inject is None:
                with counting():
                    status = s.run(w)
                counts = call_counts()
            else:
                with inject_failure(Op.ALL, inject[0], inject[1]) as inj:
                    status = s.run(w)
        except Exception as exc:  # noqa: BLE001 (judged below)
            raised = exc
        err = inject[1] if inject else None
        want = Status.OK if err is None else status_for(OSError(err, os.strerror(err)))
        if inj is not None and not inj.fired:
            bad.append("the call index was never reached")
        if s.name == "add_vfio_endpoint":
            if err is None and raised is not None:
                bad.append(f"raised {raised!r}")
            if err is not None:
                if not isinstance(raised, OSError) or raised.errno != err:
                    bad.append(f"raised {raised!r}, not an OSError with errno {err}")
                if process_footprint()[0] != fds_before:
                    bad.append(f"fds {fds_before} -> {process_footprint()[0]} after the failed add")
                if snapshot(w) != before:
                    bad.append("a failed add changed the relay")
                try:
                    _add_d(w)  # the group was let go: it can be opened again
                except OSError as exc:
                    bad.append(f"adding D again after the failure: {exc}")
        elif raised is not None:
            bad.append(f"raised {raised!r}")
        elif status is not None and status != want:
            bad.append(f"status {status.name}, the errno table says {want.name}")
        if s.name != "close":  # after close there is no container left to compare (the fds are, below)
            events = w.r.pop_events()
            failed = [ep for ep, b in w.backends().items() if inj is not None and b.container.fd == inj.fd]
            if err is not None and s.reports:
                if _event_endpoints(events) != failed:
                    bad.append(f"fault events for {_event_endpoints(events)}, the failed container serves {failed}")
            elif events:
                bad.append(f"unexpected fault events for {_event_endpoints(events)}")
            if err is not None and s.atomic and snapshot(w) != before:
                bad.append(f"refused, but the relay changed: {_diff(before, snapshot(w))}")
            if err is not None and s.after_failure is not None:
                complaint = s.after_failure(w)
                if complaint:
                    bad.append(complaint)
            if before_bystander is not None and snapshot(w, bystander_only=True) != before_bystander:
                bad.append(f"the bystander changed: {_diff(before_bystander, snapshot(w, bystander_only=True))}")
            if s.skip is None and w.r.translate(E, M_OTHER[0], 64, write=True) != M_OTHER[2]:
                bad.append("the bystander's emulated endpoint lost its mapping")
            bad += kernel_mismatches(w, base[1])
    finally:
        w.r.close()
    after = process_footprint()
    if after != base:
        bad.append(f"after close(): (fds, VmLck KiB, VmPin KiB) {base} -> {after}")
    return bad, counts


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_every_kernel_call_fails_cleanly(scenario: Scenario, memory: GuestMemory, edu_bdfs: list[str]) -> None:
    if len(edu_bdfs) < 4:
        pytest.skip("needs four edu functions")
    bdfs = edu_bdfs[:4]
    started = time.monotonic()
    base = process_footprint()
    # The operation without a failure: it must succeed, and says how many
    # kernel calls it makes (the same ones, in the same order, every time).
    bad, counts = _point(scenario, memory, bdfs, base, None)
    assert not bad, f"{scenario.name} without a failure: {bad}"
    n = sum(counts.values())
    ops = ", ".join(f"{c} {op.name}" for op, c in counts.items() if c)
    assert n > 0, f"{scenario.name} made no kernel call"
    mismatches: list[str] = []
    for index in range(n):
        for err in ERRNOS:
            for complaint in _point(scenario, memory, bdfs, base, (index, err))[0]:
                mismatches.append(f"call {index} {errno.errorcode[err]}: {complaint}")
    points = n * len(ERRNOS)
    print(f"{scenario.name}: {n} kernel calls ({ops}) x {len(ERRNOS)} errnos = {points} injection points, "
          f"{len(mismatches)} mismatches, {time.monotonic() - started:.1f} s")  # fmt: skip
    assert not mismatches, f"{len(mismatches)} of {points} injection points:\n" + "\n".join(mismatches[:40])
