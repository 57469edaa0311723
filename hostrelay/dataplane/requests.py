"""The per-request door: :meth:`hostrelay.relay.Relay.handle_request`.

A MAP or UNMAP is one C call (``hr_relay_fast``: decode, check, fan out to the
containers, record, reply) that takes the relay's lock itself; anything else,
or a MAP/UNMAP C cannot finish alone, goes through the control plane under the
lock.  Domains with a custom backend (a VMM's own
:class:`~hostrelay.model.ports.Backend`) are checked in C and carried out
here, through the host address space.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from hostrelay import _native
from hostrelay._native import ffi, lib
from hostrelay.dataplane.handle import DataPlane, is_native, status_for
from hostrelay.dataplane.table import MappingTable
from hostrelay.model.config import ConfigSpace
from hostrelay.model.control import ControlPlane, internal_error, reply
from hostrelay.model.mapping import Mapping
from hostrelay.model.ports import HostAddressSpace
from hostrelay.model.status import UnmapMismatch
from hostrelay.model.topology import Domain, Topology
from hostrelay.model.wire import HEAD_SIZE, MapRequest, ReqType, Status, UnmapRequest, pack_tail

log = logging.getLogger("hostrelay.relay")

_relay_fast = lib.hr_relay_fast
_FAST_REPORT = lib.HR_FAST_REPORT
_TAILS: tuple[bytes, ...] = tuple(pack_tail(s) for s in range(256))
# The native door's type: hr_pydoor_install sets it on the module (once).
if lib.hr_pydoor_install() < 0:
    raise ImportError("hostrelay._native: the native handle_request door could not be set up")
_RequestDoor: Any = getattr(_native, "RequestDoor")


class Requests:
    """MAP/UNMAP through the data plane, and the ``handle_request`` door."""

    def __init__(self, dp: DataPlane, config: ConfigSpace, topology: Topology, space: HostAddressSpace) -> None:
        self.dp = dp
        # The hot path's operands, one attribute load each (under TCG every
        # load is visible in the handle_request figure).
        self.c = dp.c
        self.result = dp.result
        self.memory = dp.memory
        self.config = config
        self.topology = topology
        self.space = space
        self.control = ControlPlane(config, topology, self.map_unmap, status_for)

    def handle_request(self, readable: bytes | bytearray | memoryview, writable_len: int) -> bytes:
        """See :meth:`hostrelay.relay.Relay.handle_request`.

        The Python door; :meth:`native_door` is the same in C, and ends here
        for whatever it does not take as it is.
        """
        if type(readable) is bytes and self.dp.fast_generation == self.memory.generation:
            # MAP/UNMAP in one C call and nothing else: measured under TCG,
            # every Python step here costs about as much as a syscall.  (No
            # config freeze here: a MAP/UNMAP can only succeed after an
            # ATTACH, which took the full path and froze it.)
            # The C call takes the relay's lock itself.
            try:
                rc: int = _relay_fast(self.c, readable, len(readable), writable_len, self.result)
            except Exception:  # arguments C could not take (it ran nothing)
                log.exception("internal error handling a request")
                return internal_error(writable_len)
            if 0 <= rc < _FAST_REPORT:
                return _TAILS[rc]
            if rc >= 0:
                return self._reported(rc)
        return self._rest(readable, writable_len)

    def _reported(self, rc: int) -> bytes:
        """hr_relay_fast's ``HR_FAST_REPORT | status``: done, and a kernel
        failure to report; C kept the lock for this."""
        try:
            self.report_failure(self.result)
        except Exception:
            log.exception("internal error reporting a kernel failure")
        finally:
            self.dp.lock.release()
        return _TAILS[rc & 0xFF]

    def _rest(self, readable: bytes | bytearray | memoryview, writable_len: int) -> bytes:
        """handle_request past the fast path: the control plane under the lock."""
        try:
            if type(readable) is not bytes:
                readable = bytes(readable)  # a guest buffer view: decode from a stable copy
            with self.dp.lock:
                self.config.frozen = True  # a driver is talking: the config it read stays
                return self.control.handle(readable, writable_len)
        except Exception:  # a bug must not take the device down
            log.exception("internal error handling a request")
            return internal_error(writable_len)

    def native_door(self) -> Callable[[bytes | bytearray | memoryview, int], bytes]:
        """:meth:`handle_request` as one native call (cext/pydoor/hr_pydoor.c).

        The same checks and the same C call as the Python method's fast
        path, without its frame; anything else goes to the Python code
        (:meth:`handle_request` itself, :meth:`_rest`, :meth:`_reported`).
        The door holds this object's callables, and this object does not
        hold the door, so there is no cycle to collect.
        """
        door = _RequestDoor(int(ffi.cast("uintptr_t", self.c)), int(ffi.cast("uintptr_t", self.result)),
                            self.memory.generation_cell, self.dp.fast_cell, _TAILS, self.dp,
                            self.handle_request, self._rest, self._reported)  # fmt: skip
        handle: Callable[[bytes | bytearray | memoryview, int], bytes] = door.handle_request
        return handle

    def failure(self, res: Any) -> tuple[Any | None, Exception, str, int]:
        """A kernel failure C reported: ``(backend, exception, what, iova)`` (:meth:`DataPlane.failure`)."""
        dom = self.topology.domains.get(int(res.domain))
        native = [b for b in dom.targets if is_native(b)] if dom is not None else []
        return self.dp.failure(res, native)

    def report_failure(self, res: Any) -> None:
        """Log a kernel failure the C data plane reported and queue its fault events."""
        b, exc, what, iova = self.failure(res)
        if b is not None:
            self.topology.report(b, exc, what, iova, write=True)
        else:
            log.warning("%s at %#x failed: %s", what, iova, exc)

    # MAP (5.13.6.5) and UNMAP (5.13.6.6): checked and executed in C
    def map_unmap(self, readable: bytes, writable_len: int) -> bytes:
        """A MAP or UNMAP outside the fast path (lock held)."""
        dp = self.dp
        dp.prepare()
        res = dp.result
        n = lib.hr_relay_request(dp.c, readable, len(readable), writable_len, dp.tail, res)
        if n <= 0:
            return b""
        status = int(res.status)
        if status == lib.HR_S_DEFER:
            status = self._deferred(readable)
        elif res.reason == lib.HR_R_KERNEL or res.reason == lib.HR_R_MISMATCH:
            self.report_failure(res)
        return reply(status, n)

    def map_custom(self, domain: int, m: Mapping) -> int:
        """A MAP C checked and deferred (a domain with a VMM's own backend), carried out here: its status."""
        return self._deferred(MapRequest(domain, m.start, m.end, m.phys, m.flags).pack())

    def _deferred(self, readable: bytes) -> int:
        """A valid MAP/UNMAP (C checked it) for a domain with custom backends."""
        try:
            if readable[0] == ReqType.MAP:
                self._map_custom(MapRequest.unpack(readable[HEAD_SIZE:]))
            else:
                self._unmap_custom(UnmapRequest.unpack(readable[HEAD_SIZE:]))
        except Exception as exc:
            status = status_for(exc)
            log.log(logging.WARNING if status == Status.DEVERR else logging.DEBUG,
                    "request refused (%s): %s", status.name, exc)  # fmt: skip
            return int(status)
        return int(Status.OK)

    @staticmethod
    def _table(dom: Domain) -> MappingTable:
        table = dom.table
        assert isinstance(table, MappingTable)  # every domain's table is made by the data plane
        return table

    def _map_custom(self, req: MapRequest) -> None:
        dom = self.topology.domains[req.domain]
        table = self._table(dom)
        vs, ve, ps, flags = req.virt_start, req.virt_end, req.phys_start, req.flags
        self.space.map(dom, Mapping(vs, ve, ps, flags), lambda: table.insert(vs, ve, ps, flags))

    def _unmap_custom(self, req: UnmapRequest) -> None:
        vs, ve = req.virt_start, req.virt_end
        dom = self.topology.domains[req.domain]
        table = self._table(dom)
        if dom.targets and table.check_range(vs, ve):
            # Straddles were refused by check_range (D-32) before any backend
            # is touched; then each backend drops exactly the covered mappings.
            covered = table.covered(vs, ve)
            try:
                self.space.unmap(dom, covered, vs)
            except UnmapMismatch:
                # The kernel holds none of them: the table follows.
                table.remove_range(covered[0].start, covered[-1].end)
                raise
        # Atomic in C: RANGE with nothing removed if a mapping is straddled
        # (D-32); holes are fine (D-33).
        table.remove_range(vs, ve)
