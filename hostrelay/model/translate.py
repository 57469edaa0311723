"""DMA translation for emulated endpoints (virtio 1.2 §5.13.6).

An emulated device's DMA is translated by the relay itself: identity in
bypass (unattached with config ``bypass`` = 1, or in a bypass domain) and in
the MSI doorbell window, the domain's table otherwise; a refused access is a
fault record (§5.13.6.9) and a :class:`~hostrelay.model.status.TranslationFault`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from hostrelay.model.config import ConfigSpace
from hostrelay.model.events import FaultLog
from hostrelay.model.mapping import TranslateError
from hostrelay.model.topology import Topology
from hostrelay.model.wire import U64_MAX, FaultReason, MapFlag, ResvMemType


class Translator:
    """``translate`` over the topology; ``lock`` is the relay's lock."""

    def __init__(self, config: ConfigSpace, topology: Topology, events: FaultLog,
                 lock: AbstractContextManager[Any]) -> None:  # fmt: skip
        self.config = config
        self.topology = topology
        self.events = events
        self.lock = lock

    def translate(self, endpoint_id: int, iova: int, size: int, *, write: bool) -> int:
        """See :meth:`hostrelay.relay.Relay.translate`."""
        if size <= 0 or iova < 0 or iova + size - 1 > U64_MAX:
            raise ValueError(f"bad DMA span {iova:#x}+{size:#x}")
        with self.lock:
            ep = self.topology.endpoints.get(endpoint_id)
            if ep is None:
                raise ValueError(f"unknown endpoint {endpoint_id:#x}")
            dom = ep.domain
            if dom is None:
                if self.config.bypass:
                    return iova
                # D-10: unattached, non-bypass endpoints reach nothing.
                raise self.events.fault(FaultReason.DOMAIN, ep.id, iova, write)
            if dom.bypass:
                return iova
            last = iova + size - 1
            for r in ep.resv:
                if r.subtype == ResvMemType.MSI and r.start <= iova and last <= r.end:
                    return iova  # MSI doorbells are not translated (5.13.6.8.1)
            need = MapFlag.WRITE if write else MapFlag.READ
            try:
                return dom.table.translate(iova, size, need)
            except TranslateError as exc:
                raise self.events.fault(FaultReason.MAPPING, ep.id, exc.address, write) from None
