"""What the device model needs from the layers below it, as protocols.

The device model is sans-IO: it decides what ATTACH, DETACH, MAP and UNMAP
mean and never touches the kernel.  Where its decisions take effect is
behind these protocols, implemented further down and wired together by
:class:`hostrelay.relay.Relay`:

- :class:`Backend` is one host unit that endpoints share and that a domain's
  mappings are given to (a VFIO group's type1 container, or a VMM's own
  object); :class:`hostrelay.backends.type1.VfioBackend` is the VFIO one.
- :class:`HostAddressSpace` is the host side of every guest domain: the
  address space its endpoints' devices reach.  Its first implementation,
  :class:`hostrelay.backends.fanout.FanOutAddressSpace`, gives each domain
  the set of its endpoints' type1 containers (replay on attach, removal on
  detach, identity maps in bypass).  An implementation where a domain is one
  kernel address space that devices attach to (iommufd) fits the same calls.
- :class:`DomainMirror` keeps the C data plane's copy of a domain's derived
  state current (its reserved regions and containers), so MAP and UNMAP in C
  need no call back into Python.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from hostrelay.model.mapping import Mapping

if TYPE_CHECKING:
    from hostrelay.model.topology import Domain


class Backend(Protocol):
    """Where a domain's mappings take effect for some of its endpoints.

    Endpoints that share a backend (devices of one VFIO group) share one
    object: the relay calls each distinct backend of a domain once per
    request.  Each call either fully succeeds or raises and leaves the
    backend as it was; the relay turns the exception into a status through
    :func:`hostrelay.dataplane.handle.status_for` (an ``OSError`` keeps
    its errno).  Optional methods a backend may have: ``set_identity(on)`` (guest
    RAM at IOVA = GPA while its endpoints are in bypass), ``precheck(mapping)
    -> bytes to charge`` (limits before any backend is touched) and ``c`` (a
    ``struct hr_container`` the C data plane fans out to itself).
    """

    def map(self, mapping: Mapping) -> None:
        """Make ``mapping`` (exact range, no splitting) take effect."""

    def unmap(self, mappings: Sequence[Mapping]) -> None:
        """Remove exactly these mappings (all previously given to :meth:`map`)."""


class DetachedAnyway(Exception):
    """A detach failed on the host, but the host no longer holds the domain's mappings.

    The endpoint is therefore out of the domain; ``cause`` is the error to
    answer with, and ``settle`` says whether the backend must still be given
    the state of an unattached endpoint (config bypass).
    """

    def __init__(self, cause: BaseException, *, settle: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.settle = settle


class HostAddressSpace(Protocol):
    """The host address space each guest domain's endpoints reach.

    Every call is all or nothing: it raises and leaves the host as it was,
    except :class:`DetachedAnyway`.  A refusal is also reported through the
    ``report`` hook the implementation was given (the Linux driver ignores
    MAP/UNMAP statuses, so fault events are where it becomes visible).
    """

    def join(self, domain: Domain, backend: Backend) -> None:
        """``backend`` joins ``domain``: its devices reach exactly the domain's
        mappings (all of guest RAM in a bypass domain)."""

    def leave(self, domain: Domain, backend: Backend, *, bypass: bool | None) -> None:
        """``backend`` leaves ``domain``: its devices reach none of its mappings;
        then, unless ``bypass`` is ``None``, what an unattached endpoint reaches
        (all of guest RAM when ``bypass`` is true, nothing otherwise)."""

    def settle(self, backend: Backend, bypass: bool) -> None:
        """An unattached ``backend`` follows config ``bypass``; a failure is reported, not raised."""

    def targets(self, domain: Domain) -> tuple[Backend, ...]:
        """Where ``domain``'s MAP and UNMAP go, given its members' backends now.

        One entry per host address space that holds the domain's mappings:
        each type1 container of its groups, but a single IOAS for every
        iommufd device of it.  :meth:`map` and :meth:`unmap` (and the C data
        plane, through :class:`DomainMirror`) serve exactly these."""

    def map(self, domain: Domain, mapping: Mapping, commit: Callable[[], None] = ...) -> None:
        """MAP into every target of ``domain``, then ``commit`` (the table insert); all or none.

        Only for domains the C data plane does not serve itself (see
        :class:`DomainMirror`)."""

    def unmap(self, domain: Domain, covered: Sequence[Mapping], address: int) -> None:
        """UNMAP exactly ``covered`` from every target of ``domain``, all or none.

        A kernel that unmapped other than ``covered`` raises
        :class:`~hostrelay.model.status.DeviceFailure` after every backend has
        lost ``covered``: the table must drop it too."""


class DomainMirror(Protocol):
    """The data plane's record of the live domains."""

    def add(self, domain: Domain) -> None:
        """A new domain (its table and bypass flag)."""

    def update(self, domain: Domain) -> None:
        """The domain's reserved regions or backends changed."""

    def remove(self, domain: Domain) -> None:
        """The domain is gone."""
