"""Save and restore a relay's device state: :meth:`hostrelay.relay.Relay.save_state` / ``restore_state``.

A restore does not write the tables or the kernel directly: it replays the
saved state through the same code a guest's requests take.  Each endpoint
is attached as its ATTACH would be (so a type1 container, an iommufd IOAS or
an identity map is set up exactly as then), and each mapping is re-made as
its MAP would be, through the C data plane's checks and fan-out.  What the
kernel holds after a restore therefore follows from the same code as what it
held before the save, and a state that passes the codec's checks
(:mod:`hostrelay.model.state`) still cannot make a mapping a guest could not
have made.  Everything that can be checked without touching the kernel is
checked first; if the replay itself fails (a kernel refusal, a limit), every
step is undone before the error is raised, so the relay is as it was and the
kernel holds nothing of the state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from hostrelay._native import ffi, lib
from hostrelay.backends.iommufd import IommufdGroup
from hostrelay.backends.memory import GuestMemory
from hostrelay.backends.type1 import VfioBackend
from hostrelay.dataplane.handle import DataPlane
from hostrelay.dataplane.table import MappingTable
from hostrelay.dataplane.requests import Requests
from hostrelay.dataplane.ring import Queues
from hostrelay.model.config import ConfigSpace
from hostrelay.model.events import FaultLog
from hostrelay.model.mapping import Mapping
from hostrelay.model.ports import Backend
from hostrelay.model.state import (
    KNOWN_MAP_FLAGS,
    MAPPING_SIZE,
    RECORD_PROBLEMS,
    ConfigState,
    DeviceState,
    DomainState,
    EndpointState,
    QueueState,
    StateError,
    decode,
    encode,
)
from hostrelay.model.status import RelayError
from hostrelay.model.topology import Topology
from hostrelay.model.wire import AttachFlag, AttachRequest, Status

__all__ = ["StateKeeper", "StateError"]

log = logging.getLogger("hostrelay.relay")


class StateKeeper:
    """The relay's parts, seen as one state to save or to restore.

    ``bdfs`` maps each VFIO endpoint to its PCI address; ``host_backends``
    gives the VFIO backends the relay opened (they follow config bypass).
    The caller holds neither the lock nor anything else: both methods take
    the relay's lock themselves.
    """

    def __init__(self, dp: DataPlane, config: ConfigSpace, topology: Topology, queues: Queues,
                 events: FaultLog, requests: Requests, bdfs: dict[int, str],
                 host_backends: Callable[[], list[Backend]]) -> None:  # fmt: skip
        self.dp = dp
        self.memory: GuestMemory = dp.memory
        self.config = config
        self.topology = topology
        self.queues = queues
        self.events = events
        self.requests = requests
        self.bdfs = bdfs
        self.host_backends = host_backends

    # --- save -------------------------------------------------------------------

    def _endpoint(self, endpoint_id: int, backend: Backend | None) -> EndpointState:
        if backend is None:
            return EndpointState(endpoint_id, "emulated")
        if isinstance(backend, (VfioBackend, IommufdGroup)):
            kind = "type1" if isinstance(backend, VfioBackend) else "iommufd"
            return EndpointState(endpoint_id, "vfio", self.bdfs[endpoint_id], kind)
        return EndpointState(endpoint_id, "custom")

    def snapshot(self) -> DeviceState:
        """The relay's state now (lock held by the caller)."""
        c = self.config
        config = ConfigState(c.page_size_mask, (c.input_start, c.input_end), (c.domain_start, c.domain_end),
                             c.probe_size, c.mmio, c.device_features, c.driver_features, c.bypass)  # fmt: skip
        endpoints = tuple(self._endpoint(e.id, e.backend) for e in sorted(self.topology.endpoints.values(),
                                                                           key=lambda e: e.id))  # fmt: skip
        domains = tuple(
            DomainState(d.id, d.bypass, tuple(sorted(d.endpoints)), _export(d.table))
            for d in sorted(self.topology.domains.values(), key=lambda d: d.id)
        )
        queues = []
        for index, q in sorted(self.queues.queues.items()):
            vq = q.vq
            size, desc, avail, used = q.geometry
            queues.append(QueueState(index, size, desc, avail, used, int(vq.last_avail), int(vq.used_idx),
                                     bool(vq.broken)))  # fmt: skip
        memory = tuple((r.gpa, r.size) for r in self.memory.regions)
        return DeviceState(config, memory, endpoints, domains, tuple(queues), tuple(self.events.records),
                           self.events.dropped)  # fmt: skip

    def save(self) -> bytes:
        """See :meth:`hostrelay.relay.Relay.save_state`."""
        with self.dp.lock:
            self.queues.collect_records()  # a service thread's records are the recording's, not state
            state = self.snapshot()
        return encode(state)

    # --- restore ------------------------------------------------------------------

    def restore(self, data: bytes | bytearray | memoryview) -> DeviceState:
        """See :meth:`hostrelay.relay.Relay.restore_state`; returns what was restored."""
        state = decode(data, _check_records)
        with self.dp.lock:
            self._check_empty()
            self._check_fits(state)
            c = self.config
            before = (c.bypass, c.driver_features, c.frozen, c.page_size_mask, (c.input_start, c.input_end))
            try:
                self._apply(state)
            except BaseException as exc:
                self._undo(before)
                if isinstance(exc, StateError):
                    raise StateError(f"{exc}; the restore was undone, nothing of the state is left") from None
                raise StateError(f"restore failed and was undone, nothing of the state is left: {exc}") from exc
        return state

    def _check_empty(self) -> None:
        c = self.config
        held = [what for what, has in (
            ("domains", bool(self.topology.domains)),
            ("queues", bool(self.queues.queues)),
            ("pending fault records", bool(self.events.records) or bool(self.events.dropped)),
            ("acknowledged features", c.driver_features is not None),
            ("a driver that has read the config", c.frozen),
        ) if has]  # fmt: skip
        if held:
            raise StateError(f"this relay already has state ({', '.join(held)}): restore into a newly built relay")

    def _check_fits(self, state: DeviceState) -> None:
        """Everything about ``state`` that can be checked without touching the kernel."""
        here = self.snapshot()
        self._check_endpoints(state.endpoints, here.endpoints)
        s, h = state.config, here.config
        for name in ("domain_range", "probe_size", "mmio", "device_features"):
            sv, hv = getattr(s, name), getattr(h, name)
            if sv != hv:
                raise StateError(f"config {name} differs: the state has {_show(sv)}, this relay {_show(hv)} "
                                 "(a relay built with other options)")  # fmt: skip
        # The host fields may differ (another backend or host IOMMU: type1
        # reports the IOMMU's page sizes, iommufd any multiple of its
        # smallest) as long as everything the driver was shown still holds
        # here: the relay then presents the saved, narrower values.
        if s.page_size_mask & ~h.page_size_mask or s.page_size_mask & -s.page_size_mask != h.page_size_mask & -h.page_size_mask:
            raise StateError(f"config page_size_mask differs: the state has {s.page_size_mask:#x}, this relay "
                             f"{h.page_size_mask:#x}, which lacks some of its page sizes or has another granule")  # fmt: skip
        if not h.input_range[0] <= s.input_range[0] <= s.input_range[1] <= h.input_range[1]:
            raise StateError(f"config input_range differs: the state has {_show(s.input_range)}, this relay "
                             f"{_show(h.input_range)}, which does not contain it")  # fmt: skip
        if s.driver_features is not None and s.driver_features & ~s.device_features:
            raise StateError(f"driver features {s.driver_features:#x} include some the device never offered")
        # Each mapping's own checks (granule, input range, guest RAM, reserved
        # regions, MMIO with VFIO, limits) are its MAP's, in C, during the
        # replay: a refusal there is undone as a whole and named by its reason.
        for q in state.queues:
            for name, gpa, size in (("desc", q.desc, 16 * q.size), ("avail", q.avail, 6 + 2 * q.size),
                                    ("used", q.used, 6 + 8 * q.size)):  # fmt: skip
                if not self.memory.contains(gpa, size):
                    raise StateError(f"queue {q.index}: its {name} ring at GPA {gpa:#x} is outside guest memory")

    @staticmethod
    def _check_endpoints(saved: Iterable[EndpointState], here: Iterable[EndpointState]) -> None:
        # The VFIO backend may differ (a type1 state restores into an iommufd
        # relay and back): the device and its guest-visible state are the same.
        def key(e: EndpointState) -> tuple[int, str, str | None]:
            return (e.id, e.kind, e.bdf)

        a, b = {key(e) for e in saved}, {key(e) for e in here}
        if a != b:
            only_state = ", ".join(_show_endpoint(k) for k in sorted(a - b)) or "none"
            only_here = ", ".join(_show_endpoint(k) for k in sorted(b - a)) or "none"
            raise StateError(f"different endpoints: only in the state {only_state}; only in this relay {only_here}")

    def _apply(self, state: DeviceState) -> None:
        c = self.config
        self._set_host(state.config.page_size_mask, state.config.input_range)
        c.driver_features = state.config.driver_features
        c.frozen = True  # the driver had read the config the state was saved with
        if c.bypass != state.config.bypass:
            c.bypass = state.config.bypass
            self.topology.bypass_changed(self.host_backends())
        self.dp.prepare()  # guest memory and RLIMIT_MEMLOCK current in C, once for every MAP below
        for d in state.domains:
            flags = int(AttachFlag.BYPASS) if d.bypass else 0
            for e in d.endpoints:
                try:
                    self.topology.attach(AttachRequest(d.id, e, flags))
                except RelayError as exc:
                    raise StateError(f"domain {d.id}: ATTACH of endpoint {e:#x} refused ({exc})") from None
            self._restore_maps(d, state.memory)
        self.events.records.extend(state.events)
        self.events.dropped = state.dropped_events
        for q in state.queues:
            vq = self.queues.setup_locked(q.index, size=q.size, desc=q.desc, avail=q.avail, used=q.used,
                                          avail_index=q.next_avail)  # fmt: skip
            if int(vq.used_idx) != q.used_idx:
                raise StateError(f"queue {q.index}: guest memory's used index is {int(vq.used_idx)}, the state's "
                                 f"{q.used_idx}: this is not the guest memory the state was saved with")  # fmt: skip
            vq.broken = int(q.broken)

    def _restore_maps(self, d: DomainState, saved_memory: Iterable[tuple[int, int]]) -> None:
        """Every mapping of ``d`` as its MAP made it: in C, one call for the lot (lock held)."""
        dp, count = self.dp, d.count
        res = dp.result
        view = ffi.from_buffer("uint8_t[]", d.records, require_writable=False)
        done = 0
        while done < count:
            done += int(lib.hr_state_restore(dp.c, d.id, view + done * MAPPING_SIZE, count - done, res))
            if done == count:
                return
            m = d.mapping(done)
            status = int(res.status)
            if status == lib.HR_S_DEFER:
                # A domain with a VMM's own backend: C checked it, Python carries it out.
                status = self.requests.map_custom(d.id, m)
                if status == Status.OK:
                    done += 1
                    continue
                raise StateError(f"domain {d.id}: mapping {_span(m)} refused with {Status(status).name}")
            raise StateError(f"domain {d.id}: mapping {_span(m)} -> GPA {m.phys:#x} refused with "
                             f"{Status(status).name}: {self._why(res, saved_memory)}")  # fmt: skip

    def _why(self, res: Any, saved_memory: Iterable[tuple[int, int]]) -> str:
        reason = int(res.reason)
        if reason in (lib.HR_R_KERNEL, lib.HR_R_MISMATCH):
            return str(self.requests.failure(res)[1])
        why = _REASONS.get(reason, f"reason {reason}")
        if reason == lib.HR_R_NOT_RAM:
            here = [(r.gpa, r.size) for r in self.memory.regions]
            why += f" {_show_memory(here)}, saved with guest memory {_show_memory(saved_memory)}"
        return why

    def _set_host(self, page_size_mask: int, input_range: tuple[int, int]) -> None:
        c = self.config
        if (c.page_size_mask, (c.input_start, c.input_end)) != (page_size_mask, input_range):
            c.set_host(page_size_mask, input_range)
            self.dp.configure(c, self.dp.max_mappings)  # C checks MAP against them

    def _undo(self, before: tuple[bool, int | None, bool, int, tuple[int, int]]) -> None:
        """Back to the state the restore found (lock held); logged, never raises."""
        try:
            self.queues.clear()
            self.topology.detach_all()
            self.events.clear()
            self.events.dropped = 0
            bypass, features, frozen, mask, input_range = before
            c = self.config
            self._set_host(mask, input_range)
            if c.bypass != bypass:
                c.bypass = bypass
                self.topology.bypass_changed(self.host_backends())
            c.driver_features, c.frozen = features, frozen
        except Exception:
            log.exception("undoing a failed restore")


# The C data plane's refusal reasons (cext/hr_relay.h) as a restore names them.
_REASONS = {
    lib.HR_R_DOMAIN_RANGE: "outside the domain range",
    lib.HR_R_ORDER: "ends before it starts",
    lib.HR_R_ALIGN: "not aligned to the granule",
    lib.HR_R_INPUT_RANGE: "outside the input range",
    lib.HR_R_PHYS_WRAP: "wraps guest-physical space",
    lib.HR_R_BYPASS: "a bypass domain takes no mapping",
    lib.HR_R_RESERVED: "overlaps a reserved region of an endpoint",
    lib.HR_R_NOT_RAM: "outside guest memory",
    lib.HR_R_MMIO_VFIO: "an MMIO mapping in a domain with VFIO endpoints",
    lib.HR_R_LIMIT: "more mappings than this relay's max_mappings",
    lib.HR_R_OVERLAP: "overlaps another mapping",
    lib.HR_R_ENTRIES: "more than the kernel's DMA entries (dma_entry_limit)",
    lib.HR_R_MEMLOCK: "more than RLIMIT_MEMLOCK",
    lib.HR_R_FLAGS: "unknown flags",
}


def _export(table: Any) -> bytes:
    """A C table as the state's records (hr_state_export), in IOVA order."""
    assert isinstance(table, MappingTable)  # every domain's table is made by the data plane
    n = len(table)
    buf = ffi.new("uint8_t[]", max(n, 1) * MAPPING_SIZE)
    got = int(lib.hr_state_export(table.ptr, buf, n))
    assert got == n, "the table changed under the relay's lock"
    return bytes(ffi.buffer(buf, n * MAPPING_SIZE))


def _check_records(records: memoryview, count: int) -> tuple[int, str]:
    """:func:`hostrelay.model.state.check_records`, in C."""
    why = ffi.new("int *")
    bad = int(lib.hr_state_check(ffi.from_buffer("uint8_t[]", records), count, KNOWN_MAP_FLAGS, why))
    return bad, RECORD_PROBLEMS.get(why[0], "")


def _span(m: Mapping) -> str:
    return f"[{m.start:#x}, {m.end:#x}]"


def _show(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    if isinstance(v, bool):
        return str(v)
    return f"{v:#x}" if isinstance(v, int) else repr(v)


def _show_memory(regions: Iterable[tuple[int, int]]) -> str:
    return "(" + (", ".join(f"{g:#x}+{s:#x}" for g, s in regions) or "none") + ")"


def _show_endpoint(k: tuple[int, str, str | None]) -> str:
    ep, kind, bdf = k
    return f"{ep:#x} ({kind}{' ' + bdf if bdf else ''})"


# The C status names are the wire's: make sure the two agree where this module compares them.
assert int(lib.HR_S_OK) == int(Status.OK)
