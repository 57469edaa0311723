"""A domain's host address space as the set of its endpoints' type1 containers.

The first :class:`~hostrelay.model.ports.HostAddressSpace`: a VFIO group
stays in its own type1 container for its whole life, because
``VFIO_GROUP_UNSET_CONTAINER`` fails with EBUSY while a device fd is open
(Linux >= 3.6 ``vfio_group_unset_container``) and a VMM keeps its device fds
open.  A guest domain is therefore the set of the containers of its
endpoints' groups (:class:`~hostrelay.backends.type1.VfioBackend`, or a VMM's
own :class:`~hostrelay.model.ports.Backend`):

- a container joining a domain takes the domain's bypass state (identity
  map on for a bypass domain, off otherwise), then gets every mapping the
  domain already has (replay);
- a container leaving it loses them, then follows config ``bypass``;
- MAP and UNMAP go to every container of the domain, and a refusal by one is
  undone in those already done.

For domains whose containers are all VFIO ones the C data plane does the
MAP/UNMAP fan-out itself (``hr_relay_map``/``hr_relay_unmap``); :meth:`map`
and :meth:`unmap` serve the domains that hold a custom backend.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from hostrelay.backends.type1 import MemlockBudget, UnmapMismatch
from hostrelay.model.mapping import Mapping
from hostrelay.model.ports import Backend, DetachedAnyway
from hostrelay.model.wire import MapFlag

if TYPE_CHECKING:
    from hostrelay.model.topology import Domain

log = logging.getLogger("hostrelay.relay")

#: ``report(backend, exc, what, address, write=...)``: a backend refused a step.
Report = Callable[..., None]


class FanOutAddressSpace:
    """Each domain's mappings in every container of its endpoints.

    ``report`` is called for every refusal (the topology turns it into
    fault records); ``budget`` returns the relay's RLIMIT_MEMLOCK budget,
    which a MAP must fit as a whole since type1 charges one process counter.
    """

    def __init__(self, report: Report, budget: Callable[[], MemlockBudget | None]) -> None:
        self.report = report
        self.budget = budget
        # The relay's dirty log while it runs (hostrelay.dataplane.dirty.DirtyLog):
        # told of every mapping and attachment a device may write through,
        # for the spaces the kernel does not track.
        self.dirty: Any = None

    # --- joining and leaving ------------------------------------------------------

    def join(self, domain: Domain, backend: Backend) -> None:
        """Replay the domain into ``backend`` (after setting its identity map for the domain)."""
        set_identity = getattr(backend, "set_identity", None)
        try:
            if set_identity is not None:
                # Bypass domain: guest RAM at IOVA = GPA; otherwise the
                # identity map goes before the domain's mappings come in.
                set_identity(domain.bypass)
            if not domain.bypass and len(domain.table):
                self.replay(backend, domain)
        except BaseException as exc:
            self.report(backend, exc, "ATTACH", 0, write=True)
            raise
        if self.dirty is not None:
            self.dirty.exposed(domain, backend)

    @staticmethod
    def replay(backend: Backend, domain: Domain) -> None:
        """Give ``backend`` every mapping of ``domain``; undo on failure so it ends clean.

        QEMU and cloud-hypervisor replay the same way on attach.
        """
        done: list[Mapping] = []
        try:
            for m in domain.table:
                backend.map(m)
                done.append(m)
        except BaseException:
            if done:
                try:
                    backend.unmap(done)
                except Exception:
                    log.exception("rollback of ATTACH replay failed")
            raise

    def leave(self, domain: Domain, backend: Backend, *, bypass: bool | None) -> None:
        """Remove the domain's mappings from ``backend`` (D-22), then follow ``bypass``.

        If the identity step fails the mappings are put back, so the backend
        is as it was; if that fails too, it holds none of them
        (:class:`DetachedAnyway`).  A kernel byte-count mismatch on the unmap
        leaves it without them as well.
        """
        unmapped = False
        if not domain.bypass and len(domain.table):
            # D-22: after DETACH the endpoint reaches none of the domain's mappings.
            try:
                backend.unmap(list(domain.table))
            except UnmapMismatch as exc:
                # The container holds none of them now: finish the detach.
                self.report(backend, exc, "DETACH", 0, write=True)
                raise DetachedAnyway(exc, settle=True) from exc
            except BaseException as exc:
                self.report(backend, exc, "DETACH", 0, write=True)
                raise
            unmapped = True
        set_identity = getattr(backend, "set_identity", None)
        if bypass is not None and set_identity is not None and domain.bypass != bypass:
            # Unattached, the container follows config bypass: the identity
            # map comes (a normal domain, bypass 1) or goes (a bypass
            # domain, bypass 0).  set_identity is all or nothing itself.
            try:
                set_identity(bypass)
                if bypass and self.dirty is not None:
                    self.dirty.exposed(None, backend)  # all of guest RAM now
            except BaseException as exc:
                self.report(backend, exc, "DETACH (bypass identity map)", 0, write=True)
                if unmapped:
                    try:
                        self.replay(backend, domain)
                    except Exception:
                        # Two failures in a row: the container holds none of
                        # the domain's mappings, so the endpoint is detached.
                        log.exception("DETACH: could not put the mappings of domain %d back", domain.id)
                        raise DetachedAnyway(exc, settle=False) from exc
                raise

    def settle(self, backend: Backend, bypass: bool) -> None:
        """Identity map on or off for an unattached backend; a failure is reported."""
        set_identity = getattr(backend, "set_identity", None)
        if set_identity is None:
            return
        try:
            set_identity(bypass)
            if bypass and self.dirty is not None:
                self.dirty.exposed(None, backend)  # all of guest RAM now
        except Exception as exc:
            self.report(backend, exc, "bypass identity map" if bypass else "bypass identity unmap", 0, write=True)

    @staticmethod
    def targets(domain: Domain) -> tuple[Backend, ...]:
        """Every container of the domain's endpoints holds all of its mappings."""
        return domain.backends

    # --- MAP and UNMAP for domains with a custom backend ------------------------------

    def map(self, domain: Domain, mapping: Mapping, commit: Callable[[], None] = lambda: None) -> None:
        """MAP into every backend of ``domain``, then ``commit`` (the table insert); all or none."""
        current: Backend | None = None
        done: list[Backend] = []
        try:
            # Limits before any ioctl: each container's entries and ranges,
            # then the memlock charge of all of them together, since type1
            # charges one process counter.
            charge = 0
            for b in domain.targets:
                current = b
                precheck = getattr(b, "precheck", None)
                if precheck is not None:
                    charge += precheck(mapping)
            current = None
            budget = self.budget()
            if charge and budget is not None:
                budget.check(charge)
            for b in domain.targets:
                current = b
                b.map(mapping)
                done.append(b)
            current = None
            commit()
            if self.dirty is not None:
                self.dirty.mapped(domain, mapping)
        except BaseException as exc:
            # A MAP that fails in one backend is undone in the others.
            for b in done:
                try:
                    b.unmap([mapping])
                except Exception:
                    log.exception("rollback of MAP %s failed", mapping)
            for b in [current] if current is not None else domain.targets:
                self.report(b, exc, "MAP", mapping.start, write=bool(mapping.flags & MapFlag.WRITE))
            raise

    def unmap(self, domain: Domain, covered: Sequence[Mapping], address: int) -> None:
        """UNMAP ``covered`` from every backend; a refusal re-maps the backends already done.

        A kernel byte-count mismatch (:class:`UnmapMismatch`) leaves that
        container without the mappings, so the others and the table follow
        (all converge on "unmapped") and the mismatch is then raised.
        """
        mismatch: UnmapMismatch | None = None
        done: list[Backend] = []
        for b in domain.targets:
            try:
                b.unmap(covered)
            except UnmapMismatch as exc:
                self.report(b, exc, "UNMAP", address, write=True)
                mismatch = exc
            except BaseException as exc:
                self.report(b, exc, "UNMAP", address, write=True)
                for d in done:
                    for m in covered:
                        try:
                            d.map(m)
                        except Exception:
                            log.exception("rollback of UNMAP: re-map of %s failed", m)
                raise
            done.append(b)
        if mismatch is not None:
            raise mismatch
