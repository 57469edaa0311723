"""Domains and endpoints: ATTACH and DETACH with the spec's semantics.

:class:`Topology` owns which endpoint is in which domain.  It checks every
ATTACH and DETACH as virtio 1.2 §5.13.6.3-4 require (requirement ids D-xx are
in ``docs/requirements.md``), creates a domain with its first endpoint and
drops it with its last, and tells the host address space
(:class:`~hostrelay.model.ports.HostAddressSpace`) what changed, so that a
passed-through device reaches exactly its domain's mappings.  A refused
request leaves every endpoint where it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from hostrelay.model.config import ConfigSpace
from hostrelay.model.events import FaultLog
from hostrelay.model.mapping import DomainTable
from hostrelay.model.ports import Backend, DetachedAnyway, DomainMirror, HostAddressSpace
from hostrelay.model.status import InvalidRequest, NoEntry, NoResources, OutOfRange, Unsupported
from hostrelay.model.wire import ATTACH_F_MASK, AttachFlag, AttachRequest, DetachRequest, ResvMem

log = logging.getLogger("hostrelay.relay")

_ZERO4 = b"\0" * 4


class Endpoint:
    """An endpoint (PCI requester ID) behind the IOMMU."""

    __slots__ = ("id", "resv", "backend", "domain")

    def __init__(self, endpoint_id: int, resv: tuple[ResvMem, ...], backend: Backend | None) -> None:
        self.id = endpoint_id
        self.resv = resv  # every RESV_MEM region PROBE reports for it
        self.backend = backend  # None: emulated, served by translate()
        self.domain: Domain | None = None


class Domain:
    """A guest domain: its endpoints, its table, and what derives from them."""

    __slots__ = ("id", "bypass", "table", "endpoints", "resv", "backends", "targets")

    def __init__(self, domain_id: int, bypass: bool, table: DomainTable) -> None:
        self.id = domain_id
        self.bypass = bypass
        self.table = table
        self.endpoints: dict[int, Endpoint] = {}
        # Derived from the members on every ATTACH/DETACH so MAP and UNMAP
        # pay nothing for them.
        self.resv: tuple[ResvMem, ...] = ()
        self.backends: tuple[Backend, ...] = ()
        # Where MAP and UNMAP go: the host address spaces holding the
        # domain's mappings (one per type1 container, a single IOAS for all
        # of its iommufd devices); the HostAddressSpace says which.
        self.targets: tuple[Backend, ...] = ()

    def has_backend(self, backend: Backend) -> bool:
        """True if ``backend`` already serves an endpoint of this domain."""
        return any(b is backend for b in self.backends)

    def refresh(self) -> None:
        """Recompute the reserved regions and distinct backends of the members."""
        resv: dict[tuple[int, int, int], ResvMem] = {}
        backends: list[Backend] = []
        for ep in self.endpoints.values():
            for r in ep.resv:
                resv[(r.subtype, r.start, r.end)] = r
            if ep.backend is not None and not any(b is ep.backend for b in backends):
                backends.append(ep.backend)
        self.resv = tuple(resv.values())
        self.backends = tuple(backends)


class Topology:
    """Endpoints, domains and the moves between them.

    ``space`` is where a domain's mappings take effect on the host,
    ``mirror`` the data plane's record of the domains, ``new_table`` makes a
    domain's table and ``events`` takes the fault records of host refusals.
    The caller holds the relay's lock around every method.
    """

    def __init__(self, config: ConfigSpace, events: FaultLog, space: HostAddressSpace, mirror: DomainMirror,
                 new_table: Callable[[], DomainTable], *, max_domains: int | None = None) -> None:  # fmt: skip
        self.config = config
        self.events = events
        self.space = space
        self.mirror = mirror
        self.new_table = new_table
        self.max_domains = max_domains
        self.endpoints: dict[int, Endpoint] = {}
        self.domains: dict[int, Domain] = {}

    # --- endpoints ------------------------------------------------------------

    def add(self, endpoint: Endpoint) -> None:
        """Declare an endpoint (unattached)."""
        if endpoint.id in self.endpoints:
            raise ValueError(f"endpoint {endpoint.id:#x} already exists")
        self.endpoints[endpoint.id] = endpoint

    def endpoint(self, endpoint_id: int) -> Endpoint:
        """The endpoint with this ID (``KeyError`` if unknown)."""
        return self.endpoints[endpoint_id]

    def served_by(self, backend: Backend) -> list[int]:
        """IDs of the endpoints ``backend`` serves."""
        return [o.id for o in self.endpoints.values() if o.backend is backend]

    def report(self, backend: Backend, exc: BaseException, what: str, address: int, *, write: bool) -> None:
        """A backend refused ``what``: log it and queue a fault record per endpoint it serves.

        A target that is no endpoint's backend (an IOAS shared by a domain's
        iommufd devices) serves the domain's endpoints whose backends are not
        targets themselves.
        """
        served = self.served_by(backend)
        if not served:
            for dom in self.domains.values():
                if any(t is backend for t in dom.targets):
                    served = [e.id for e in dom.endpoints.values()
                              if e.backend is not None and not any(t is e.backend for t in dom.targets)]  # fmt: skip
        self.events.host_refused(served, exc, what, address, write=write)

    def _check_domain_id(self, domain_id: int) -> None:
        # G-03 forbids the driver such IDs; 5.13.6 names no status, and
        # "out-of-range parameters" is what RANGE means.
        if not self.config.domain_start <= domain_id <= self.config.domain_end:
            raise OutOfRange(f"domain {domain_id} outside domain_range")

    # --- ATTACH (5.13.6.3) ------------------------------------------------------

    def attach(self, req: AttachRequest) -> None:
        """Serve an ATTACH; raises a :class:`~hostrelay.model.status.RelayError` to refuse it."""
        if req.reserved != _ZERO4:
            raise InvalidRequest("ATTACH reserved is not zero")  # D-11 (MUST)
        if req.flags & ~ATTACH_F_MASK:
            raise InvalidRequest(f"unknown ATTACH flags {req.flags:#x}")  # D-12 (MUST)
        ep = self.endpoints.get(req.endpoint)
        if ep is None:
            raise NoEntry(f"no endpoint {req.endpoint:#x}")  # D-13 (MUST)
        self._check_domain_id(req.domain)
        bypass = bool(req.flags & AttachFlag.BYPASS)
        dom = self.domains.get(req.domain)
        if dom is not None:
            # D-15, checked before the implicit detach below so a refused
            # ATTACH leaves the endpoint where it was (QEMU detaches first).
            if dom.bypass != bypass:
                raise InvalidRequest("ATTACH_F_BYPASS inconsistent with the domain")
            if ep.domain is dom:
                return  # already there: re-attaching changes nothing
            # D-17: the endpoint's reserved regions must be free in the domain.
            for r in ep.resv:
                if dom.table.overlaps(r.start, r.end):
                    raise Unsupported(
                        f"domain {dom.id} maps into reserved region [{r.start:#x}, {r.end:#x}]"
                    )
        elif self.max_domains is not None:
            frees_one = ep.domain is not None and len(ep.domain.endpoints) == 1
            if len(self.domains) - frees_one >= self.max_domains:
                raise NoResources("domain limit reached")
        if ep.backend is not None:
            # A host IOMMU group is one container: its devices cannot be in
            # different domains (crosvm answers UNSUPP as well).
            for o in self.endpoints.values():
                if o is not ep and o.backend is ep.backend and o.domain is not None and o.domain.id != req.domain:
                    raise Unsupported(
                        f"endpoint {ep.id:#x} shares a host IOMMU group with {o.id:#x}, which is in domain {o.domain.id}"
                    )
        if ep.domain is not None:
            # D-16: as if DETACH, then ATTACH; the bypass identity map is
            # settled by _link (no map-then-unmap of all guest RAM).
            self._detach(ep, settle=False)
        if dom is None:
            dom = self._new_domain(req.domain, bypass)
        try:
            self._link(ep, dom)
        except BaseException:
            if not dom.endpoints:
                self._drop_domain(dom)
            if ep.backend is not None:
                self.settle(ep.backend)  # unattached now: follow config bypass
            raise

    def _new_domain(self, domain_id: int, bypass: bool) -> Domain:
        dom = Domain(domain_id, bypass, self.new_table())
        self.mirror.add(dom)
        self.domains[domain_id] = dom
        return dom

    def _link(self, ep: Endpoint, dom: Domain) -> None:
        b = ep.backend
        if b is not None and not dom.has_backend(b):
            self.space.join(dom, b)
        dom.endpoints[ep.id] = ep
        ep.domain = dom
        self._refresh(dom)

    def _refresh(self, dom: Domain) -> None:
        dom.refresh()
        dom.targets = self.space.targets(dom)
        self.mirror.update(dom)

    def attached_domains(self, backend: Backend) -> list[Domain]:
        """The domains the endpoints of ``backend`` are in."""
        return [o.domain for o in self.endpoints.values() if o.backend is backend and o.domain is not None]

    def settle(self, backend: Backend) -> None:
        """Give ``backend`` the identity map iff its endpoints are in bypass; failures are reported."""
        doms = self.attached_domains(backend)
        self.space.settle(backend, doms[0].bypass if doms else self.config.bypass)

    def bypass_changed(self, backends: Iterable[Backend]) -> None:
        """Config ``bypass`` changed: those of ``backends`` that are unattached follow it (5.13.6)."""
        for b in backends:
            if not self.attached_domains(b):
                self.settle(b)

    # --- DETACH (5.13.6.4); reserved is ignored (D-19) ---------------------------

    def detach(self, req: DetachRequest) -> None:
        """Serve a DETACH; raises a :class:`~hostrelay.model.status.RelayError` to refuse it."""
        ep = self.endpoints.get(req.endpoint)
        if ep is None:
            raise NoEntry(f"no endpoint {req.endpoint:#x}")  # D-20 (MUST)
        self._check_domain_id(req.domain)
        if ep.domain is None or ep.domain.id != req.domain:
            raise InvalidRequest(f"endpoint {ep.id:#x} is not in domain {req.domain}")  # D-21
        self._detach(ep)

    def _detach(self, ep: Endpoint, *, settle: bool = True) -> None:
        """Take ``ep`` out of its domain; all or nothing.

        The host steps happen before the endpoint is unlinked, so a refusal
        leaves it attached with its backend as it was: the domain's mappings
        out (D-22), then, with ``settle``, what the backend needs once
        unattached (config ``bypass``, 5.13.6).
        """
        dom = ep.domain
        assert dom is not None
        b = ep.backend
        # The backend leaves the domain only with the last endpoint it serves there.
        if b is not None and not any(o.backend is b for o in dom.endpoints.values() if o is not ep):
            try:
                self.space.leave(dom, b, bypass=self.config.bypass if settle else None)
            except DetachedAnyway as exc:
                self._unlink(ep)
                if settle and exc.settle:
                    self.settle(b)
                raise exc.cause from None
        self._unlink(ep)

    def _unlink(self, ep: Endpoint) -> None:
        dom = ep.domain
        assert dom is not None
        del dom.endpoints[ep.id]
        ep.domain = None
        if dom.endpoints:
            self._refresh(dom)
        else:
            self._drop_domain(dom)  # the domain dies with its last endpoint

    def _drop_domain(self, dom: Domain) -> None:
        self.domains.pop(dom.id, None)
        self.mirror.remove(dom)
        dom.table.clear()

    # --- reset ----------------------------------------------------------------

    def detach_all(self) -> None:
        """Device reset: no endpoint stays attached (5.13.5, D-06)."""
        for ep in self.endpoints.values():
            if ep.domain is not None:
                try:
                    self._detach(ep)
                except Exception:
                    # A backend that cannot unmap must not keep the
                    # endpoint attached across a reset.
                    log.exception("backend failed to detach endpoint %#x on reset", ep.id)
                    if ep.domain is not None:  # _detach may have finished the unlink itself
                        self._unlink(ep)
                    if ep.backend is not None:
                        self.settle(ep.backend)
