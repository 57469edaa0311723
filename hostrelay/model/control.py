"""Request dispatch: one request as the driver wrote it, to the reply the device writes.

:class:`ControlPlane` checks a request's framing (virtio 1.2 §5.13.6: head,
type, the readable and writable sizes each type has), serves ATTACH, DETACH
(through :class:`~hostrelay.model.topology.Topology`) and PROBE (§5.13.6.7)
itself, hands MAP and UNMAP to the data plane, and turns every refusal into
the status the status table names.  Requirement ids D-xx are in
``docs/requirements.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from hostrelay.model.config import MAX_WRITABLE, ConfigSpace
from hostrelay.model.wire import Status
from hostrelay.model.topology import Topology
from hostrelay.model.wire import (
    HEAD_SIZE,
    REQUEST_CLASSES,
    TAIL_SIZE,
    ProbeRequest,
    ReqType,
    pack_properties,
    pack_tail,
)

log = logging.getLogger("hostrelay.relay")

# The longest readable part of any request (PROBE's head + body, 72 bytes).  A
# chain whose readable part is longer is none of them (INVAL, or used length 0
# for an unknown type, as any size mismatch) and is read no further than one
# byte past this: the guest controls that length, and a copy of it would let
# it make the host allocate as much as it has RAM.
MAX_READABLE = max(cls.readable_size() for cls in REQUEST_CLASSES.values())


def reply(status: int, writable_len: int) -> bytes:
    """A reply that fills the writable part: zeros, then the tail.

    Properties a failed PROBE does not write are zero-filled (D-39, D-40), and
    the used length is the writable length, which the Linux driver requires
    before it reads the status.
    """
    return bytes(writable_len - TAIL_SIZE) + pack_tail(status)


def internal_error(writable_len: int) -> bytes:
    """The reply to a request the relay failed on itself: DEVERR if the
    writable part can hold a reply, else used length 0 (also for a
    ``writable_len`` that is not even an int)."""
    if isinstance(writable_len, int) and TAIL_SIZE <= writable_len <= MAX_WRITABLE:
        return reply(Status.DEVERR, writable_len)
    return b""


class ControlPlane:
    """Serves requests whose readable part is already a stable ``bytes``.

    ``map_unmap(readable, writable_len)`` is the data plane's MAP/UNMAP;
    ``status_for`` the status table with the data plane's errno table.  The
    caller holds the relay's lock.
    """

    def __init__(self, config: ConfigSpace, topology: Topology, map_unmap: Callable[[bytes, int], bytes],
                 status_for: Callable[[BaseException], Status]) -> None:  # fmt: skip
        self.config = config
        self.topology = topology
        self.map_unmap = map_unmap
        self.status_for = status_for
        self.handlers: dict[int, Callable[[Any], None]] = {
            ReqType.ATTACH: topology.attach,
            ReqType.DETACH: topology.detach,
        }

    def handle(self, readable: bytes, writable_len: int) -> bytes:
        """The bytes the device writes for this request; ``b""`` is used length 0."""
        n = len(readable)
        if n < HEAD_SIZE or not TAIL_SIZE <= writable_len <= MAX_WRITABLE:
            return b""
        req_type = readable[0]  # head.reserved ignored (D-09)
        cls = REQUEST_CLASSES.get(req_type)
        if cls is None:
            return b""  # D-08
        if req_type == ReqType.MAP or req_type == ReqType.UNMAP:
            return self.map_unmap(readable, writable_len)
        if req_type == ReqType.PROBE:
            if not self.config.probe:
                return b""  # D-36
            return self.probe(readable, writable_len)
        # The writable part of ATTACH/DETACH/MAP/UNMAP is the tail alone and
        # the readable part is exactly head + body: any other split is an
        # inconsistent buffer, refused before anything is decoded.
        if n != cls.readable_size() or writable_len != TAIL_SIZE:
            return reply(Status.INVAL, writable_len)
        req = cls.unpack(readable[HEAD_SIZE:])
        try:
            self.handlers[req_type](req)
        except Exception as exc:
            status = self.status_for(exc)
            if status == Status.DEVERR:
                log.warning("%s failed: %r", cls.TYPE.name, exc)
            else:
                log.debug("%s refused (%s): %s", cls.TYPE.name, status.name, exc)
            return pack_tail(status)
        return pack_tail(Status.OK)

    # PROBE (5.13.6.7); request reserved is ignored (D-34)
    def probe(self, readable: bytes, writable_len: int) -> bytes:
        """An endpoint's RESV_MEM properties, zero-filled to ``probe_size``, then the tail."""
        if len(readable) != ProbeRequest.readable_size():
            return reply(Status.INVAL, writable_len)
        probe_size = self.config.probe_size
        if writable_len != probe_size + TAIL_SIZE:
            # D-39: a properties area smaller than probe_size gets no property
            # and INVAL; a larger one breaks the driver's MUST as well.
            return reply(Status.INVAL, writable_len)
        req = ProbeRequest.unpack(readable[HEAD_SIZE:])
        ep = self.topology.endpoints.get(req.endpoint)
        if ep is None:
            return reply(Status.NOENT, writable_len)  # D-35
        # Sizes were checked when the regions were configured; D-37/38/40/41
        # are the codec's job (zero reserved bits, length 20, zero fill).
        return pack_properties(list(ep.resv), probe_size) + pack_tail(Status.OK)
