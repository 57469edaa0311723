"""The relay's errors and the one table that turns them into statuses.

Every layer below the relay reports a refusal by raising; only
:func:`status_for` decides which ``VIRTIO_IOMMU_S_*`` value the driver sees,
so the mapping from failure to status is written down exactly once.

Spec references are to the OASIS virtio v1.2+ "IOMMU Device" section (5.13)
and to the requirement numbers D-xx of ``docs/requirements.md``.

A kernel error is an ``OSError`` whose errno decides the status; that errno
table lives in the C data plane (``hr_status_for_errno``), because MAP/UNMAP
must answer the same whichever door a request came through, and the device
model imports no C.  :func:`status_for` therefore takes it as an argument
(:func:`hostrelay.dataplane.handle.status_for` passes it).
"""

from __future__ import annotations

from collections.abc import Callable

from hostrelay.model.mapping import OverlapError, StraddleError
from hostrelay.model.wire import FaultReason, Status


class RelayError(Exception):
    """A request the device refuses; subclasses name the reason."""


class InvalidRequest(RelayError):
    """Malformed or inconsistent parameters (reserved bits, flags, sizes)."""


class OutOfRange(RelayError):
    """Misaligned or out-of-range addresses, or a split UNMAP."""


class NoEntry(RelayError):
    """Unknown endpoint or domain."""


class Unsupported(RelayError):
    """A valid request this device cannot honour."""


class NoResources(RelayError):
    """A configured limit (domains, mappings) is reached."""


class BadAddress(RelayError):
    """A guest-physical address that is not guest memory."""


class DeviceFailure(RelayError):
    """The device or a backend failed internally."""


class UnmapMismatch(DeviceFailure):
    """The kernel unmapped a different number of bytes than the table expected.

    The kernel's range is empty afterwards (type1v2 removes every mapping fully
    inside it, Linux >= 3.x), so the relay removes the mappings from its table as well and
    reports the error: both converge on "unmapped".
    """


class TranslationFault(RelayError):
    """An emulated endpoint's DMA was refused; a fault record was queued.

    Raised by :meth:`hostrelay.relay.Relay.translate`, never by
    ``handle_request``.
    """

    def __init__(self, reason: FaultReason, endpoint: int, address: int, *, write: bool) -> None:
        super().__init__(
            f"{reason.name} fault: endpoint {endpoint:#x} "
            f"{'write' if write else 'read'} at {address:#x}"
        )
        self.reason = reason
        self.endpoint = endpoint
        self.address = address
        self.write = write


# errno from backends (VFIO ioctls carry it in OSError) → status: the C data
# plane's table (hr_status_for_errno in cext/hr_relay.c), so MAP/UNMAP answer
# the same whichever door a request came through.

# THE table.  First matching class wins, so subclasses come before bases.
STATUS_TABLE: tuple[tuple[type[BaseException], Status], ...] = (
    (InvalidRequest, Status.INVAL),
    (OutOfRange, Status.RANGE),
    (NoEntry, Status.NOENT),
    (Unsupported, Status.UNSUPP),
    (NoResources, Status.NOMEM),
    (BadAddress, Status.FAULT),
    (DeviceFailure, Status.DEVERR),
    # Table refusals: 5.13.6.5 "a mapping already exists in the requested
    # range" → INVAL (D-24); 5.13.6.6 "would split the mapping" → RANGE (D-32).
    (OverlapError, Status.INVAL),
    (StraddleError, Status.RANGE),
    (MemoryError, Status.NOMEM),
)


def status_for(exc: BaseException, errno_status: Callable[[int], int]) -> Status:
    """The status a failed request reports for ``exc``.

    An ``OSError`` with an errno gets ``errno_status(errno)`` (the data
    plane's errno table).  Anything not listed (a bug, an unexpected backend
    error) is an internal device error (DEVERR), so no exception ever escapes
    as a crash.
    """
    for cls, status in STATUS_TABLE:
        if isinstance(exc, cls):
            return status
    if isinstance(exc, OSError) and exc.errno is not None:
        return Status(errno_status(exc.errno))
    return Status.DEVERR
