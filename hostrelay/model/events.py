"""Fault records for the event queue (virtio 1.2 §5.13.6.9).

The device reports two kinds of fault: an emulated endpoint's DMA that the
domain does not allow (:meth:`FaultLog.fault`), and a host refusal of a relay
step (:meth:`FaultLog.host_refused`): the Linux driver ignores MAP/UNMAP
statuses, so the event queue (and the host log) is where a refused relay
becomes visible.  Records wait here until the VMM takes them
(:meth:`FaultLog.pop`) or the event queue's buffers do.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

from hostrelay.model.status import TranslationFault
from hostrelay.model.wire import Fault, FaultFlag, FaultReason

log = logging.getLogger("hostrelay.relay")

# Fault records kept until pop_events(); 5.13.6.9 lets the device drop events
# when no buffer is available, and the eventq has 256 entries in practice.
DEFAULT_EVENT_LIMIT = 256


class FaultLog:
    """Pending 24-byte fault records, oldest first, at most ``limit`` of them."""

    def __init__(self, limit: int = DEFAULT_EVENT_LIMIT) -> None:
        # Never replaced, only emptied: the queue front end holds it too.
        self.records: deque[bytes] = deque()
        self.limit = limit
        self.dropped = 0

    def __bool__(self) -> bool:
        return bool(self.records)

    def queue(self, record: bytes) -> None:
        """Keep ``record`` unless the log is full (5.13.6.9: the device may drop events)."""
        if len(self.records) < self.limit:
            self.records.append(record)
        else:
            self.dropped += 1

    def fault(self, reason: FaultReason, endpoint: int, address: int, write: bool) -> TranslationFault:
        """Queue a DMA fault record and return the exception that reports it."""
        flags = (FaultFlag.WRITE if write else FaultFlag.READ) | FaultFlag.ADDRESS
        self.queue(Fault(reason, int(flags), endpoint, address).pack())
        return TranslationFault(reason, endpoint, address, write=write)

    def host_refused(self, endpoints: Iterable[int], exc: BaseException, what: str, address: int,
                     *, write: bool) -> None:  # fmt: skip
        """Log a host refusal of ``what`` and queue one record per endpoint it concerns.

        Reason UNKNOWN because 5.13.6.9 has no better one for "the host could
        not do it".
        """
        eps = list(endpoints)
        log.warning("%s at %#x refused by the backend of endpoint(s) %s: %s", what, address,
                    ", ".join(f"{e:#x}" for e in eps), exc)  # fmt: skip
        flags = int((FaultFlag.WRITE if write else FaultFlag.READ) | FaultFlag.ADDRESS)
        for e in eps:
            self.queue(Fault(FaultReason.UNKNOWN, flags, e, address).pack())

    def pop(self) -> list[bytes]:
        """Take every pending record."""
        out = list(self.records)
        self.records.clear()
        return out

    def take(self) -> bytes | None:
        """The oldest record, or ``None``."""
        return self.records.popleft() if self.records else None

    def put_back(self, record: bytes) -> None:
        """Return a record :meth:`take` gave out (no buffer could hold it)."""
        self.records.appendleft(record)

    def clear(self) -> None:
        """Drop every pending record (device reset)."""
        self.records.clear()
