"""tests/test_fault_matrix.py on the iommufd backend: every kernel call failed, against the real kernel.

The same relay operations, built the same way (tests/test_fault_matrix.py's
:class:`World`, with ``vfio_backend="iommufd"``): A, B, C and D are edu
functions opened through their VFIO cdevs and bound to the relay's
``/dev/iommu``, E and F are emulated.  A guest domain is one IOAS every
device of the domain is attached to, bypass one identity IOAS shared by
every device in it.  On top of the type1 operations there are the ones that
only iommufd has: ATTACH into a domain whose IOAS does not exist yet (F, an
emulated endpoint, made the mappings: a new IOAS, the replay, then the
attach), and moves between two normal domains (a replace), into an existing
IOAS or a new one.

For each operation the test counts the wrapper calls it makes, then fails
each of them (``inject_failure(op, nth, err)`` for every ``nth`` call of every
operation counted: the same set as every index of ``Op.ALL``, and the failed
call's operation is known) with each errno, on a relay rebuilt from nothing,
and checks:

- the status is :func:`~hostrelay.dataplane.handle.status_for` of the errno;
- the fault events name the endpoints served by what failed.  What that is
  (decided here, and what the backend does):

  * a device fd (attach, replace, detach of one device): the endpoints of
    that device's group;
  * the iommufd fd on a MAP or UNMAP (the C data plane's IOMMU_IOAS_MAP /
    UNMAP on the domain's IOAS): the endpoints of the domain using that IOAS
    (its iommufd endpoints; an emulated member reaches no IOAS);
  * the iommufd fd on an ATTACH or DETACH (the IOAS being built for the
    group: its allocation, the replay or the identity map, or the usable
    ranges read after the attach): the endpoints of the group that moves;
  * a config ``bypass`` write: the endpoints of each group that could not
    follow it (they are left where they were, and only they);
  * ``IOMMU_DESTROY`` of an IOAS nothing is attached to any more: no event
    and no refusal.  The operation it cleans up after has happened; the
    relay empties the IOAS and keeps it (``IommufdAddressSpace.stale``)
    until a later destroy succeeds or the relay closes, so nothing it holds
    is pinned or reachable meanwhile;
- a refusal leaves the relay as it was, which group is attached where
  included (D-16 moves: the endpoint is left detached);
- relay == kernel: the IOASes the kernel has (every object id of the relay's
  iommufd probed with IOMMU_IOAS_IOVA_RANGES) are exactly the relay's (each
  domain's, the identity one, the stale ones); each has a device attached
  (its usable ranges show the attached IOMMU's holes) iff the relay has a
  group attached to it; its C counters and its contents (each expected piece
  unmapped on its own returns exactly its size, then nothing is left) are
  what the relay's tables and identity map say; every device of a group has
  a page table iff its group is attached, devices on one IOAS share one, and
  each group is attached to its domain's IOAS, the identity IOAS (a bypass
  domain, or unattached with config bypass 1) or nothing;
- ``VmPin`` grew by exactly the bytes in IOASes a device is attached to
  (iommufd pins a page when a domain is attached to the area's IOAS, and
  counts ``pinned_vm`` whatever the accounting mode); ``VmLck`` by nothing
  as root (CAP_IPC_LOCK: iommufd charges no RLIMIT_MEMLOCK, Linux 6.12
  ``iopt_alloc_pages``), or by the same bytes in per-process mode;
- after ``close()`` the process has the fds, ``VmLck`` and ``VmPin`` it had
  before the relay existed.

A config write is the one non-atomic operation: a group that could not
follow it stays where it was, is named in a fault event, and is then the
only one allowed not to be where config ``bypass`` says.

Errnos: the type1 matrix's seven, untrimmed: the iommufd operations make
fewer kernel calls (one IOAS per domain, not one container per group), so
the 25 scenarios are 581 injection points (type1: 658) and take 2-4 minutes of the
``--iommufd --edu 4`` boot (type1's 20 take 2-3 minutes); each scenario's
figures are printed (``-rP`` shows them through the testbed).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from hostrelay import GuestMemory
from hostrelay.backends.iommufd import IoasSpace, IommufdGroup
from hostrelay.backends.type1 import has_cap_ipc_lock
from hostrelay.dataplane.handle import status_for
from hostrelay.kernel import iommufd as kfd
from hostrelay.kernel.errors import VfioError
from hostrelay.kernel.ioctl import Injection, Op, call_counts, counting, inject_failure
from hostrelay.model.wire import AttachRequest, DetachRequest, MapFlag, MapRequest, Status, UnmapRequest

from test_fault_matrix import (  # the type1 matrix's world and requests, shared
    _bypass_off,
    _bypass_on,
    _close,
    BYPASS_DOM,
    BYSTANDER,
    C_IN_BYPASS_DOMAIN,
    ERRNOS,
    HIT,
    M1,
    M2,
    M_OTHER,
    OTHER,
    RW,
    VFIO_EPS,
    A,
    B,
    C,
    D,
    E,
    World,
    _event_endpoints,
    _hit,
    _map,
    memory,  # noqa: F401 (the fixture)
    process_footprint,
)

pytestmark = pytest.mark.vfio(edu=4, iommufd=True)

F = 0x38  # a second emulated endpoint: it makes a domain's mappings before any device has an IOAS for it
MOVE_FROM = 4  # the domain C moves out of
M_MOVE = (0x400000, 0x400FFF, 0x30000)
U64_MAX = (1 << 64) - 1
EMPTY_IOAS_RANGES = ((0, U64_MAX),)  # what an IOAS no device is attached to reports
MAX_OBJECT_ID = 64  # the relay's iommufd holds far fewer objects (IOASes, devices, page tables)
Request = AttachRequest | DetachRequest | MapRequest | UnmapRequest


class IWorld(World):
    """tests/test_fault_matrix.py's world on iommufd, with F emulated beside E."""

    def __init__(self, memory: GuestMemory, bdfs: list[str], *, bypass: bool, ring: bool, skip: int | None) -> None:
        super().__init__(memory, bdfs, bypass=bypass, ring=ring, skip=skip, vfio_backend="iommufd", emulated=(E, F))

    def groups(self) -> dict[int, IommufdGroup]:
        out = {}
        for ep in VFIO_EPS:
            try:
                out[ep] = self.r.iommufd_group(ep)
            except KeyError:
                pass  # not added (the add_vfio_endpoint scenario)
        return out

    def space(self) -> Any:
        return self.r._space  # the IommufdAddressSpace: inspection only

    def live_ioas(self) -> dict[str, IoasSpace]:
        """Every IOAS the relay holds, by role."""
        sp = self.space()
        out: dict[str, IoasSpace] = {f"domain {d}": s for d, s in sp.domains.items()}
        if sp.identity is not None:
            out["identity"] = sp.identity
        return out

    def stale(self) -> list[kfd.Ioas]:
        """IOASes the relay could not destroy (kept, emptied, to be destroyed later)."""
        return list(self.space().stale)


# --- the operations ------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    bypass: bool
    setup: tuple[Request, ...]
    op: Request | Callable[[IWorld], None]
    door: str = "send"
    reports: bool = True
    atomic: bool = True
    config: bool = False  # a config bypass write: each group follows it, or is reported
    skip: int | None = None
    after_failure: Callable[[IWorld], str | None] | None = None

    def run(self, w: IWorld) -> Status | None:
        if callable(self.op):
            self.op(w)
            return None
        send: Callable[[Request], Status] = getattr(w, self.door)
        return send(self.op)


def _doors(name: str, setup: tuple[Request, ...], req: Request) -> list[Scenario]:
    return [Scenario(f"{name}/{label}", False, setup, req, door=door)
            for label, door in (("handle_request", "send"), ("handle_request_view", "send_view"), ("ring", "send_ring"))]  # fmt: skip


def _left_detached(w: IWorld) -> str | None:
    # D-16: the move's DETACH part happened; with config bypass 0 the group reaches nothing.
    dom = w.r.endpoint_domain(C)
    if dom is not None:
        return f"C is in domain {dom} after the failed move"
    if w.r.iommufd_group(C).attached is not None:
        return "C is detached with config bypass 0 but its group is attached to an IOAS"
    return None


def _add_d(w: IWorld) -> None:
    w.r.add_vfio_endpoint(D, w.bdfs[D])


# HIT's mappings made by F alone: HIT has no IOAS until C attaches.
HIT_BY_F = (AttachRequest(HIT, F), _map(HIT, M1), _map(HIT, M2))
C_IN_MOVE_FROM = (AttachRequest(MOVE_FROM, C), _map(MOVE_FROM, M_MOVE))

SCENARIOS: list[Scenario] = [
    *_doors("map", BYSTANDER + _hit(A, B, C, maps=()), _map(HIT, M1)),
    *_doors("unmap", BYSTANDER + _hit(A, B, C), UnmapRequest(HIT, M1[0], M1[1])),
    *_doors("unmap_range", BYSTANDER + _hit(A, B, C), UnmapRequest(HIT, 0, 0x2FFFFF)),
    # Into HIT's IOAS (A and B are attached to it): C from nothing, C from the identity IOAS (a replace).
    Scenario("attach_existing_ioas", False, BYSTANDER + _hit(A, B), AttachRequest(HIT, C)),
    Scenario("attach_existing_ioas_from_bypass", True, BYSTANDER + _hit(A, B), AttachRequest(HIT, C)),
    # HIT has mappings but no IOAS: a new one, the replay, then the attach.
    Scenario("attach_new_ioas_replay", False, BYSTANDER + HIT_BY_F, AttachRequest(HIT, C)),
    Scenario("attach_new_ioas_replay_from_bypass", True, BYSTANDER + HIT_BY_F, AttachRequest(HIT, C)),
    Scenario("detach", False, BYSTANDER + _hit(A, B, C), DetachRequest(HIT, C)),
    Scenario("detach_to_bypass", True, BYSTANDER + _hit(A, B, C), DetachRequest(HIT, C)),
    # The last device of HIT leaves: its IOAS is destroyed.
    Scenario("detach_last", False, BYSTANDER + _hit(C), DetachRequest(HIT, C)),
    Scenario("bypass_on_config", False, BYSTANDER, _bypass_on, atomic=False, config=True),
    Scenario("bypass_off_config", True, BYSTANDER, _bypass_off, atomic=False, config=True),
    Scenario("bypass_on_attach", False, BYSTANDER, C_IN_BYPASS_DOMAIN),
    Scenario("bypass_off_detach", False, BYSTANDER + (C_IN_BYPASS_DOMAIN,), DetachRequest(BYPASS_DOM, C)),
    # Moves (D-16: a failure leaves C detached): out of a bypass domain, and
    # out of a normal domain into an existing IOAS or a new one.
    Scenario("bypass_off_attach_move", False, BYSTANDER + _hit(A, B) + (C_IN_BYPASS_DOMAIN,), AttachRequest(HIT, C),
             atomic=False, after_failure=_left_detached),  # fmt: skip
    Scenario("move_existing_ioas", False, BYSTANDER + _hit(A, B) + C_IN_MOVE_FROM, AttachRequest(HIT, C),
             atomic=False, after_failure=_left_detached),  # fmt: skip
    Scenario("move_new_ioas", False, BYSTANDER + HIT_BY_F + C_IN_MOVE_FROM, AttachRequest(HIT, C),
             atomic=False, after_failure=_left_detached),  # fmt: skip
    Scenario("close", True, BYSTANDER + _hit(A, B), _close, reports=False),
    Scenario("add_vfio_endpoint", True, (), _add_d, reports=False, atomic=False, skip=D),
]

#: A failure of these is no refusal: the operation it cleans up after has happened.
CLEANUP = Op.IOMMU_DESTROY


# --- the relay's view ---------------------------------------------------------------------


def where(w: IWorld, g: IommufdGroup) -> str | None:
    """The role of the IOAS ``g`` is attached to, as the relay names it."""
    if g.attached is None:
        return None
    for role, s in w.live_ioas().items():
        if g.attached is s:
            return role
    return f"an IOAS the relay does not hold ({g.attached.label})"


def should_be(w: IWorld, ep: int) -> str | None:
    """Where ``ep``'s group belongs by the topology and config bypass."""
    dom = w.r.endpoint_domain(ep)
    if dom is None:
        return "identity" if w.r.bypass else None
    return "identity" if w.r.domain_is_bypass(dom) else f"domain {dom}"


def snapshot(w: IWorld, *, bystander_only: bool = False) -> Any:
    r = w.r
    eps = (D, E) if bystander_only else (*w.groups(), E, F)
    doms = [OTHER] if bystander_only else r.domain_ids()
    return (
        None if bystander_only else r.bypass,
        tuple((ep, r.endpoint_domain(ep)) for ep in eps),
        tuple((d, r.domain_is_bypass(d), tuple(r.domain_endpoints(d)), tuple(r.mappings(d))) for d in doms if d in r.domain_ids()),
        tuple((ep, where(w, g)) for ep, g in w.groups().items() if not bystander_only or ep == D),
    )


def _diff(before: Any, after: Any) -> str:
    names = ("config bypass", "endpoint -> domain", "domains", "group -> IOAS")
    return "; ".join(f"{n}: {x} -> {y}" for n, x, y in zip(names, before, after) if x != y)


def expected_pieces(w: IWorld, role: str, s: IoasSpace) -> list[tuple[int, int]]:
    """(iova, size) of every kernel mapping the relay's tables and identity map say ``s`` holds."""
    out = list(s.identity_pieces())
    if role.startswith("domain "):
        d = int(role.split()[1])
        if d in w.r.domain_ids() and not w.r.domain_is_bypass(d):
            for m in w.r.mappings(d):
                if m.flags & RW and not m.flags & MapFlag.MMIO:
                    out += [(m.start + (sp.gpa - m.phys), sp.size) for sp in w.memory.spans(m.phys, m.size)]
    return sorted(out)


def kernel_ioas_ids(w: IWorld) -> set[int] | None:
    fd = next((d.iommufd for g in w.groups().values() for d in g.devices.values()), None)
    if fd is None:
        return None
    ids = set()
    for obj in range(1, MAX_OBJECT_ID + 1):
        try:
            kfd.Ioas(fd, obj).iova_ranges()
        except VfioError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: no object, or not an IOAS
                raise
            continue
        ids.add(obj)
    return ids


def kernel_mismatches(w: IWorld, base: tuple[int, int, int], events: list[int], config: bool) -> list[str]:
    """Relay vs kernel, IOAS by IOAS and group by group; empties every IOAS."""
    out: list[str] = []
    live = w.live_ioas()
    groups = w.groups()
    # The IOASes themselves.
    ids = kernel_ioas_ids(w)
    relay_ids = {s.ioas.id for s in live.values()}
    stale_ids = {x.id for x in w.stale()}
    if ids is not None and ids != relay_ids | stale_ids:
        out.append(f"the kernel has IOASes {sorted(ids)}, the relay {sorted(relay_ids)} ({', '.join(live)})"
                   f" and stale {sorted(stale_ids)}")  # fmt: skip
    for x in w.stale():
        # Emptied and no device on it: it pins and reaches nothing.
        ranges, _ = x.iova_ranges()
        if tuple((r.start, r.end) for r in ranges) != EMPTY_IOAS_RANGES:
            out.append(f"stale IOAS {x.id} has a device attached")
        try:
            left = x.unmap(0, U64_MAX)
        except OSError as exc:
            left = 0 if exc.errno == errno.ENOENT else -1
        if left:
            out.append(f"stale IOAS {x.id} still maps {left:#x} bytes")
    for role, s in live.items():
        if role.startswith("domain ") and int(role.split()[1]) not in w.r.domain_ids():
            out.append(f"the relay keeps the IOAS of {role}, which no longer exists")
    # Where every group is.
    pts: dict[str, set[int]] = {}
    for ep, g in groups.items():
        at, belongs = where(w, g), should_be(w, ep)
        if at != belongs and not (config and w.r.endpoint_domain(ep) is None and ep in events):
            out.append(f"ep {ep:#x}: its group is attached to {at}, the relay's topology says {belongs}")
        for bdf, pt in g.pt_ids.items():
            if (pt is None) != (g.attached is None):
                out.append(f"ep {ep:#x} {bdf}: page table {pt}, but its group is attached to {at}")
            if pt is not None and at is not None:
                pts.setdefault(at, set()).add(pt)
    for role, p in pts.items():
        if len(p) != 1:
            out.append(f"the devices on {role} have page tables {sorted(p)}, not one")
    if len({min(p) for p in pts.values()}) != len(pts):
        out.append(f"two IOASes share a page table: {pts}")
    # Each IOAS: attached in the kernel iff the relay says so; counters; pins.
    pinned = 0
    for role, s in live.items():
        users = [ep for ep, g in groups.items() if g.attached is s]
        ranges, _ = s.ioas.iova_ranges()
        has_device = tuple((x.start, x.end) for x in ranges) != EMPTY_IOAS_RANGES
        if has_device != bool(users):
            out.append(f"{role}: the kernel {'has' if has_device else 'has no'} device attached, the relay's groups {users}")
        want = expected_pieces(w, role, s)
        size = sum(n for _, n in want)
        if (s.entries, s.charged) != (len(want), size):
            out.append(f"{role}: C counters ({s.entries}, {s.charged:#x}) != tables ({len(want)}, {size:#x})")
        if users:
            pinned += size
    _, lck, pin = process_footprint()
    per_process = w.space().per_process
    want_lck = pinned if per_process else 0
    if not per_process and not has_cap_ipc_lock():
        want_lck = (lck - base[1]) * 1024  # per-user accounting: not this process's counter
    if (pin - base[2]) * 1024 != pinned:
        out.append(f"VmPin grew by {(pin - base[2]) * 1024:#x}, the IOASes with a device attached hold {pinned:#x}")
    if (lck - base[1]) * 1024 != want_lck:
        out.append(f"VmLck grew by {(lck - base[1]) * 1024:#x}, expected {want_lck:#x}")
    # Contents: each piece on its own (a kernel area with other bounds
    # refuses with ENOENT), then nothing may be left.
    for role, s in live.items():
        for iova, n in expected_pieces(w, role, s):
            try:
                got = s.ioas.unmap(iova, n)
            except OSError as exc:
                out.append(f"{role}: unmapping the piece {iova:#x}+{n:#x}: {exc}")
                continue
            if got != n:
                out.append(f"{role}: the piece {iova:#x}+{n:#x} unmapped {got:#x} bytes")
        left = s.unmap_all()
        if left:
            out.append(f"{role}: {left:#x} bytes mapped beyond what the relay's tables say")
    return out


# --- the matrix ---------------------------------------------------------------------------


def _expected_events(s: Scenario, w: IWorld, inj: Injection, op: Op, before_groups: dict[int, IommufdGroup],
                     device_fds: dict[int, IommufdGroup], iommufd_fd: int | None) -> list[int] | None:  # fmt: skip
    """The endpoints a fault event must name (``None``: decided by where the groups are, config writes)."""
    if op & CLEANUP:
        return []
    g = device_fds.get(inj.fd)
    if g is not None:
        return sorted(ep for ep, o in before_groups.items() if o is g)
    if inj.fd != iommufd_fd:
        return [-1]  # neither a device nor the iommufd: no endpoint can be expected (always a complaint)
    if s.config:
        return None
    req = s.op
    if isinstance(req, MapRequest | UnmapRequest):
        return sorted(ep for ep in before_groups if w.r.endpoint_domain(ep) == req.domain)
    assert isinstance(req, AttachRequest | DetachRequest)
    moving = before_groups[req.endpoint]
    return sorted(ep for ep, o in before_groups.items() if o is moving)


def _point(s: Scenario, memory: GuestMemory, bdfs: list[str], base: tuple[int, int, int],
           inject: tuple[Op, int, int] | None, success: Any = None) -> tuple[list[str], dict[Op, int], Any]:  # fmt: skip
    """Build, set up, run ``s`` (with the failure ``(op, nth, errno)``, or none and
    counting), check, close.  Returns (complaints, call counts, the state after)."""
    bad: list[str] = []
    w = IWorld(memory, bdfs, bypass=s.bypass, ring=s.door == "send_ring", skip=s.skip)
    counts: dict[Op, int] = {}
    after: Any = None
    try:
        for req in s.setup:
            w.ok(req)
        w.r.pop_events()
        before = snapshot(w)
        before_bystander = snapshot(w, bystander_only=True) if s.skip is None else None
        before_groups = w.groups()
        device_fds = {d.fd: g for g in before_groups.values() for d in g.devices.values()}
        iommufd_fd = next((d.iommufd.fd for g in before_groups.values() for d in g.devices.values()), None)
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
                with inject_failure(inject[0], inject[1], inject[2]) as inj:
                    status = s.run(w)
        except Exception as exc:  # noqa: BLE001 (judged below)
            raised = exc
        op = inject[0] if inject else None
        err = inject[2] if inject else None
        cleanup = op is not None and bool(op & CLEANUP)
        refused = err is not None and not cleanup
        want = Status.OK if not refused else status_for(OSError(err, os.strerror(err or 0)))
        if inj is not None and not inj.fired:
            bad.append("the call index was never reached")
        if s.name == "add_vfio_endpoint":
            if not refused and raised is not None:
                bad.append(f"raised {raised!r}")
            if refused:
                if not isinstance(raised, OSError) or raised.errno != err:
                    bad.append(f"raised {raised!r}, not an OSError with errno {err}")
                if process_footprint()[0] != fds_before:
                    bad.append(f"fds {fds_before} -> {process_footprint()[0]} after the failed add")
                if snapshot(w) != before:
                    bad.append(f"a failed add changed the relay: {_diff(before, snapshot(w))}")
                try:
                    _add_d(w)  # the group was let go: it can be opened again
                except OSError as exc:
                    bad.append(f"adding D again after the failure: {exc}")
        elif raised is not None:
            bad.append(f"raised {raised!r}")
        elif status is not None and status != want:
            bad.append(f"status {status.name}, the errno table says {want.name}")
        if s.name != "close":
            events = _event_endpoints(w.r.pop_events())
            after = snapshot(w)
            if inj is not None and s.reports:
                expect = _expected_events(s, w, inj, inject[0], before_groups, device_fds, iommufd_fd) if inject else []
                if expect is None:  # config write: each group that did not follow, and only those
                    expect = sorted(ep for ep in w.groups() if w.r.endpoint_domain(ep) is None
                                    and where(w, w.groups()[ep]) != should_be(w, ep))  # fmt: skip
                    if not expect and not cleanup:
                        bad.append("a config write's kernel call failed, and every group followed it")
                if events != expect:
                    bad.append(f"fault events for {events}, what failed serves {expect}")
            elif events:
                bad.append(f"unexpected fault events for {events}")
            if refused and s.atomic and after != before:
                bad.append(f"refused, but the relay changed: {_diff(before, after)}")
            if cleanup and success is not None and after != success:
                bad.append(f"a failed cleanup changed the outcome: {_diff(success, after)}")
            if refused and s.after_failure is not None:
                complaint = s.after_failure(w)
                if complaint:
                    bad.append(complaint)
            if before_bystander is not None and snapshot(w, bystander_only=True) != before_bystander:
                bad.append(f"the bystander changed: {_diff(before_bystander, snapshot(w, bystander_only=True))}")
            if s.skip is None and w.r.translate(E, M_OTHER[0], 64, write=True) != M_OTHER[2]:
                bad.append("the bystander's emulated endpoint lost its mapping")
            bad += kernel_mismatches(w, base, events, s.config)
    finally:
        w.r.close()
    now = process_footprint()
    if now != base:
        bad.append(f"after close(): (fds, VmLck KiB, VmPin KiB) {base} -> {now}")
    return bad, counts, after


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_every_kernel_call_fails_cleanly_on_iommufd(scenario: Scenario, memory: GuestMemory, edu_bdfs: list[str]) -> None:  # noqa: F811
    if len(edu_bdfs) < 4:
        pytest.skip("needs four edu functions")
    bdfs = edu_bdfs[:4]
    started = time.monotonic()
    base = process_footprint()
    bad, counts, success = _point(scenario, memory, bdfs, base, None)
    assert not bad, f"{scenario.name} without a failure: {bad}"
    n = sum(counts.values())
    ops = ", ".join(f"{c} {op.name}" for op, c in counts.items() if c)
    assert n > 0, f"{scenario.name} made no kernel call"
    mismatches: list[str] = []
    for op, c in counts.items():
        for nth in range(c):
            for err in ERRNOS:
                for complaint in _point(scenario, memory, bdfs, base, (op, nth, err), success)[0]:
                    mismatches.append(f"{op.name} #{nth} {errno.errorcode[err]}: {complaint}")
    points = n * len(ERRNOS)
    print(f"{scenario.name}: {n} kernel calls ({ops}) x {len(ERRNOS)} errnos = {points} injection points, "
          f"{len(mismatches)} mismatches, {time.monotonic() - started:.1f} s")  # fmt: skip
    assert not mismatches, f"{len(mismatches)} of {points} injection points:\n" + "\n".join(mismatches[:60])
