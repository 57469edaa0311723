"""The virtio-iommu device model: domains, endpoints, mappings, config, faults.

:class:`Relay` is the state machine behind the embedding API of
``shared/notes/design.md``.  It receives requests as the driver wrote them
(:meth:`Relay.handle_request`), applies the semantics of the OASIS virtio
specification v1.2–v1.4 "IOMMU Device" (5.13) including its SHOULDs, and
returns the bytes the device writes back.  Requirement numbers D-xx refer to
``shared/research/virtio_iommu.md`` §2.

Where mappings take effect:

- every domain owns one C :class:`~hostrelay._table.MappingTable` (the
  emulated endpoints' translation, and the record UNMAP is checked against);
- an endpoint may carry a :class:`Backend` (issue 4: a VFIO container,
  :class:`hostrelay.vfio_backend.VfioBackend`, one per host IOMMU group,
  created by :meth:`Relay.add_vfio_endpoint`).  The domain forwards MAP/UNMAP
  to the distinct backends of its endpoints, replays its mappings into a
  backend on ATTACH and removes them on DETACH.  The table is only changed
  after every backend agreed, so a refused request leaves all state as it was;
  a backend's refusal is also logged and queued as a fault event, because the
  Linux guest driver never reads MAP/UNMAP statuses.
- a backend with ``set_identity`` (VFIO) gets guest RAM identity-mapped while
  its endpoints are in bypass (unattached with config ``bypass`` = 1, or in a
  bypass domain).

Host reality (VFIO): :meth:`Relay.add_vfio_endpoint` recomputes
``page_size_mask`` and ``input_range`` from the containers and gives the
endpoint RESV_MEM regions from its group's ``reserved_regions`` and the holes
between the host's usable IOVA ranges.  The config must not change once the
driver looked at it, so VFIO endpoints can only be added before the first
request, :meth:`Relay.ack_features` or :meth:`Relay.set_queue` (the relay is
then *frozen*).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from hostrelay._native import ffi, lib
from hostrelay._table import Mapping, MappingTable, OverlapError, TranslateError
from hostrelay.memory import GuestMemory
from hostrelay.protocol import (
    ATTACH_F_MASK,
    CONFIG_BYPASS_OFFSET,
    HEAD_SIZE,
    MAP_F_MASK,
    REQUEST_CLASSES,
    RESV_MEM_SIZE,
    TAIL_SIZE,
    U32_MAX,
    U64_MAX,
    AttachFlag,
    AttachRequest,
    Config,
    DetachRequest,
    Fault,
    FaultFlag,
    FaultReason,
    Feature,
    MapFlag,
    MapRequest,
    ProbeRequest,
    ReqType,
    ResvMem,
    ResvMemType,
    Status,
    UnmapRequest,
    pack_properties,
    pack_tail,
)
from hostrelay.status import (
    DeviceFailure,
    InvalidRequest,
    NoEntry,
    NoResources,
    OutOfRange,
    RelayError,
    TranslationFault,
    Unsupported,
    status_for,
)

from hostrelay.vfio_backend import MemlockBudget, UnmapMismatch, VfioBackend, locked_bytes

if TYPE_CHECKING:
    from hostrelay.vfio import Device

__all__ = [
    "Backend",
    "DEFAULT_MSI_WINDOW",
    "DEFAULT_PAGE_SIZE_MASK",
    "DEFAULT_PROBE_SIZE",
    "DeviceFailure",
    "InvalidRequest",
    "Mapping",
    "NoEntry",
    "NoResources",
    "OutOfRange",
    "Relay",
    "RelayError",
    "TranslationFault",
    "Unsupported",
]

log = logging.getLogger(__name__)

_relay_fast = lib.hr_relay_fast
_relay_process = lib.hr_relay_process
_relay_process_locked = lib.hr_relay_process_locked
# hr_relay_process's result word (cext/hr_relay.h).
_PROCESS_SHIFT: int = lib.HR_PROCESS_SHIFT
_PROCESS_ERRORS: int = lib.HR_PROCESS_ERRORS
_PROCESS_CODE: int = lib.HR_PROCESS_CODE
_PROCESS_CALLER: int = lib.HR_PROCESS_CALLER
_PROCESS_IDLE: int = lib.HR_PROCESS_IDLE
_PROCESS_BROKEN: int = lib.HR_PROCESS_BROKEN
_PROCESS_ANY = _PROCESS_CODE | _PROCESS_ERRORS  # anything but "all done"
_FAST_REPORT = lib.HR_FAST_REPORT
_TAILS: tuple[bytes, ...] = tuple(pack_tail(s) for s in range(256))

# 4 KiB granule with every larger power of two as a hint (5.13.6: "the least
# significant bit set defines the page granularity"; the others are hints).
DEFAULT_PAGE_SIZE_MASK = U64_MAX & ~0xFFF
# x86 MSI doorbell window; reporting it stops Linux from carving its own
# software MSI window at 0x8000000 (research §2.8, §4.1).
DEFAULT_MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF)
# Room for 21 RESV_MEM properties; QEMU uses the same size.
DEFAULT_PROBE_SIZE = 512
# The longest readable part of any request (PROBE's head + body, 72 bytes).  A
# chain whose readable part is longer is none of them (INVAL, or used length 0
# for an unknown type, as any size mismatch) and is read no further than one
# byte past this: the guest controls that length, and a copy of it would let
# it make the host allocate as much as it has RAM.
MAX_READABLE = max(cls.readable_size() for cls in REQUEST_CLASSES.values())
# The longest writable part the device answers.  A refused request's reply
# fills the writable part (zeros, then the tail: the Linux driver reads the
# status only when the used length equals the writable length), so this bounds
# what one request can make the host build and write.  64 KiB is 128 times
# QEMU's probe_size; a longer writable part cannot be a virtio-iommu reply
# and the chain is unparseable (used length 0, nothing written).
MAX_WRITABLE = 64 << 10
# Mappings one domain may hold by default: 2^20 one-page mappings are a
# B+ tree of at most about 64 MiB, more than any guest's DMA API keeps live
# (VFIO domains stop far earlier: type1's dma_entry_limit is 65535).
DEFAULT_MAX_MAPPINGS = 1 << 20
# Fault records kept until pop_events(); 5.13.6.9 lets the device drop events
# when no buffer is available, and the eventq has 256 entries in practice.
DEFAULT_EVENT_LIMIT = 256

_ZERO4 = b"\0" * 4
_PAGE = 0x1000
# The Linux virtio-iommu driver refuses a granule larger than the guest's
# PAGE_SIZE (viommu_probe: "granule ... larger than system page size"), 4 KiB
# on x86 guests.
MAX_GUEST_GRANULE = 0x1000


class Backend(Protocol):
    """Where a domain's mappings take effect for some of its endpoints.

    Issue 4 implements this with a VFIO container; emulated endpoints have no
    backend (the domain's table is their translation).  Endpoints that share
    a backend (devices of one VFIO group) share one object: the relay calls
    each distinct backend of a domain once per request.

    Each call either fully succeeds or raises and leaves the backend as it
    was; the relay turns the exception into a status through
    :func:`hostrelay.status.status_for` (an ``OSError`` keeps its errno).
    """

    def map(self, mapping: Mapping) -> None:
        """Make ``mapping`` (exact range, no splitting) take effect."""

    def unmap(self, mappings: Sequence[Mapping]) -> None:
        """Remove exactly these mappings (all previously given to :meth:`map`)."""


def _is_native(b: object) -> bool:
    """True for a backend the C data plane drives itself (a VFIO container)."""
    return getattr(b, "c", None) is not None


class _RelayLock:
    """The data plane's mutex (``hr_relay_lock``) as a Python lock.

    handle_request's and process_queue's fast paths take it inside their one
    C call, so the relay needs no second lock and those paths no lock call
    from Python (under TCG each such call costs about a microsecond).
    Blocking happens in C with the GIL released.
    """

    __slots__ = ("_c",)

    def __init__(self, c: Any) -> None:
        self._c = c

    def acquire(self) -> bool:
        lib.hr_relay_lock(self._c)
        return True

    def release(self) -> None:
        lib.hr_relay_unlock(self._c)

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Queue:
    """A split virtqueue the C walker serves (``struct hr_queue``, cext/hr_relay.h)."""

    __slots__ = ("c", "vq", "chain", "buf")

    def __init__(self) -> None:
        self.c = ffi.new("struct hr_queue *")
        self.vq = ffi.addressof(self.c, "vq")
        self.chain = ffi.addressof(self.c, "chain")
        self.buf = ffi.new("uint8_t[]", MAX_READABLE + 1)  # _serve_pending reads no more


class _Endpoint:
    __slots__ = ("id", "resv", "backend", "domain")

    def __init__(self, endpoint_id: int, resv: tuple[ResvMem, ...], backend: Backend | None) -> None:
        self.id = endpoint_id
        self.resv = resv  # every RESV_MEM region PROBE reports for it
        self.backend = backend
        self.domain: _Domain | None = None


class _Domain:
    __slots__ = ("id", "bypass", "table", "endpoints", "resv", "backends")

    def __init__(self, domain_id: int, bypass: bool) -> None:
        self.id = domain_id
        self.bypass = bypass
        self.table = MappingTable()
        self.endpoints: dict[int, _Endpoint] = {}
        # Derived from the members on every ATTACH/DETACH so MAP and UNMAP
        # pay nothing for them.
        self.resv: tuple[ResvMem, ...] = ()
        self.backends: tuple[Backend, ...] = ()

    def has_backend(self, backend: Backend) -> bool:
        return any(b is backend for b in self.backends)

    def refresh(self) -> None:
        resv: dict[tuple[int, int, int], ResvMem] = {}
        backends: list[Backend] = []
        for ep in self.endpoints.values():
            for r in ep.resv:
                resv[(r.subtype, r.start, r.end)] = r
            if ep.backend is not None and not any(b is ep.backend for b in backends):
                backends.append(ep.backend)
        self.resv = tuple(resv.values())
        self.backends = tuple(backends)


def _as_regions(ranges: Iterable[tuple[int, int] | ResvMem], subtype: int) -> list[ResvMem]:
    out = []
    for r in ranges:
        region = r if isinstance(r, ResvMem) else ResvMem(subtype, int(r[0]), int(r[1]))
        if not 0 <= region.start <= region.end <= U64_MAX:
            raise ValueError(f"bad reserved region [{region.start:#x}, {region.end:#x}]")
        out.append(region)
    return out


def _union(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge inclusive intervals into disjoint sorted ones (touching ones join)."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _subtract(intervals: Iterable[tuple[int, int]], holes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive ``intervals`` minus every interval of ``holes``."""
    out = []
    for s, e in intervals:
        pieces = [(s, e)]
        for hs, he in holes:
            nxt = []
            for ps, pe in pieces:
                if he < ps or hs > pe:
                    nxt.append((ps, pe))
                    continue
                if ps < hs:
                    nxt.append((ps, hs - 1))
                if he < pe:
                    nxt.append((he + 1, pe))
            pieces = nxt
        out += pieces
    return out


def _check_disjoint(regions: Sequence[ResvMem]) -> None:
    # D-43: no overlapping RESV_MEM properties for one endpoint;
    # D-42: at most one MSI property per endpoint.
    ordered = sorted(regions, key=lambda r: r.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start <= a.end:
            raise ValueError(f"reserved regions overlap: {a} and {b}")
    if sum(1 for r in regions if r.subtype == ResvMemType.MSI) > 1:
        raise ValueError("more than one MSI region")


class Relay:
    """A virtio-iommu device (5.13) for one guest.

    Options (all keyword-only):

    ``page_size_mask``
        config ``page_size_mask``; its lowest set bit is the granule MAP
        enforces (D-23).  Bit 0 allows byte-granular mappings (5.13.6), which
        the QEMU conformance sequences need.
    ``input_range``, ``domain_range``
        inclusive ``(start, end)`` IOVA and domain-ID limits; requests outside
        them are refused with RANGE.
    ``bypass``
        initial config ``bypass`` (D-04: survives :meth:`reset`, restored by
        :meth:`system_reset`).
    ``probe``, ``probe_size``
        offer ``VIRTIO_IOMMU_F_PROBE`` and the size of its properties area.
    ``msi_window``
        the RESV_MEM MSI region every endpoint reports (``None`` for none).
    ``reserved_regions``
        further RESV_MEM RESERVED regions of every endpoint.
    ``mmio``
        offer ``VIRTIO_IOMMU_F_MMIO`` (otherwise MAP_F_MMIO is an unknown flag).
    ``max_domains``, ``max_mappings``
        resource limits (per device, per domain) answered with NOMEM; ``None``
        is no limit.  ``max_mappings`` defaults to :data:`DEFAULT_MAX_MAPPINGS`
        so that a guest cannot grow an emulated domain's table until the
        host runs out of memory (a domain lives only while an endpoint is
        attached to it, so endpoints × this bounds the tables).
    ``event_limit``
        how many fault records wait for :meth:`pop_events` before new ones
        are dropped.
    """

    def __init__(
        self,
        memory: GuestMemory,
        *,
        page_size_mask: int = DEFAULT_PAGE_SIZE_MASK,
        input_range: tuple[int, int] = (0, U64_MAX),
        domain_range: tuple[int, int] = (0, U32_MAX),
        bypass: bool = True,
        probe: bool = True,
        probe_size: int = DEFAULT_PROBE_SIZE,
        msi_window: tuple[int, int] | None = DEFAULT_MSI_WINDOW,
        reserved_regions: Iterable[tuple[int, int]] = (),
        mmio: bool = True,
        max_domains: int | None = None,
        max_mappings: int | None = DEFAULT_MAX_MAPPINGS,
        event_limit: int = DEFAULT_EVENT_LIMIT,
    ) -> None:
        if not 0 < page_size_mask <= U64_MAX:
            raise ValueError("page_size_mask must have at least one bit set (D-03)")
        if not 0 <= input_range[0] <= input_range[1] <= U64_MAX:
            raise ValueError("bad input_range")
        if not 0 <= domain_range[0] <= domain_range[1] <= U32_MAX:
            raise ValueError("bad domain_range")
        if probe and not 0 <= probe_size <= MAX_WRITABLE - TAIL_SIZE:
            raise ValueError(f"probe_size must be 0 to {MAX_WRITABLE - TAIL_SIZE}")
        self.memory = memory
        # As configured; add_vfio_endpoint() narrows the live values below.
        self._user_page_size_mask = page_size_mask
        self._user_input_range = (input_range[0], input_range[1])
        self._user_reserved = _as_regions(reserved_regions, ResvMemType.RESERVED)
        self._page_size_mask = page_size_mask
        self._granule = page_size_mask & -page_size_mask
        self._input_start, self._input_end = input_range
        self._domain_start, self._domain_end = domain_range
        self._probe = probe
        self._probe_size = probe_size if probe else 0
        self._mmio = mmio
        self._map_flags_mask = MAP_F_MASK if mmio else MAP_F_MASK & ~MapFlag.MMIO
        self._initial_bypass = bool(bypass)
        self._bypass = self._initial_bypass
        self._max_domains = max_domains
        self._max_mappings = max_mappings
        self._driver_features: int | None = None

        resv: list[ResvMem] = []
        if msi_window is not None:
            resv += _as_regions([msi_window], ResvMemType.MSI)
        resv += _as_regions(reserved_regions, ResvMemType.RESERVED)
        _check_disjoint(resv)
        self._check_fits(resv)
        self._common_resv = tuple(sorted(resv, key=lambda r: (r.subtype != ResvMemType.MSI, r.start)))

        # VFIO (issue 4): one backend per host IOMMU group, the device fds a
        # VMM keeps open, and the process-wide RLIMIT_MEMLOCK budget.
        self._vfio: dict[int, VfioBackend] = {}
        self._vfio_devices: dict[int, Device] = {}
        self._budget: MemlockBudget | None = None
        self._frozen = False  # config seen by the driver: no more VFIO endpoints

        self._endpoints: dict[int, _Endpoint] = {}
        self._domains: dict[int, _Domain] = {}
        self._events: deque[bytes] = deque()
        self._event_limit = event_limit
        self.dropped_events = 0
        # The MAP/UNMAP data plane (cext/hr_relay.c): the one implementation
        # of MAP and UNMAP, shared by handle_request and the ring walker.
        self._c = ffi.gc(lib.hr_relay_new(), lib.hr_relay_free)
        if self._c == ffi.NULL:
            raise MemoryError("hr_relay_new")
        # One lock, the data plane's own: a VMM may translate() from device
        # threads while the request queue is processed elsewhere, and the
        # MAP/UNMAP fast paths take it inside their one C call.
        self._lock = _RelayLock(self._c)
        self._c_result = ffi.new("struct hr_result *")
        self._c_tail = ffi.new("uint8_t[4]")
        self._mem_generation = -1
        self._fast = True  # False while every MAP needs a RLIMIT_MEMLOCK refresh first
        # The memory generation the fast path may run at (-1: never): one
        # compare on the hot path covers both "C has the current guest RAM
        # layout" and "no per-MAP memlock refresh is needed".
        self._fast_generation = -1
        self._queues: dict[int, _Queue] = {}
        self._requestq: _Queue | None = None  # _queues[0], for process_queue's fast path
        self._configure_c()

        self._handlers: dict[int, Callable[[Any], None]] = {
            ReqType.ATTACH: self._attach_req,
            ReqType.DETACH: self._detach_req,
        }

    # --- configuration --------------------------------------------------------

    def _check_fits(self, regions: Sequence[ResvMem]) -> None:
        if self._probe and len(regions) * RESV_MEM_SIZE > self._probe_size:
            raise ValueError(
                f"{len(regions)} RESV_MEM properties do not fit probe_size {self._probe_size}"
            )

    @property
    def device_features(self) -> int:
        """Feature bits the device offers (5.13.3 plus VIRTIO_F_VERSION_1)."""
        f = (
            Feature.VERSION_1
            | Feature.MAP_UNMAP
            | Feature.INPUT_RANGE
            | Feature.DOMAIN_RANGE
            | Feature.BYPASS_CONFIG  # never legacy F_BYPASS as well (D-02)
        )
        if self._probe:
            f |= Feature.PROBE
        if self._mmio:
            f |= Feature.MMIO
        return int(f)

    def ack_features(self, driver_features: int) -> int:
        """Record the features the driver accepted; returns the negotiated set.

        Optional: without it the relay assumes the driver accepted everything.
        It only gates the ``bypass`` config write (5.13.4: only when
        BYPASS_CONFIG is negotiated).
        """
        self._driver_features = driver_features & self.device_features
        self._frozen = True  # the driver has read the config by now
        return self._driver_features

    @property
    def bypass(self) -> bool:
        """Current config ``bypass`` field."""
        return self._bypass

    @property
    def page_size_mask(self) -> int:
        """Config ``page_size_mask``."""
        return self._page_size_mask

    def config(self) -> Config:
        """The config space as a dataclass."""
        return Config(
            page_size_mask=self._page_size_mask,
            input_start=self._input_start,
            input_end=self._input_end,
            domain_start=self._domain_start,
            domain_end=self._domain_end,
            probe_size=self._probe_size,
            bypass=int(self._bypass),  # only ever 0 or 1 (D-05)
        )

    def config_bytes(self) -> bytes:
        """The 40-byte ``struct virtio_iommu_config`` (5.13.4)."""
        return self.config().pack()

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to config space.

        Only ``bypass`` (offset 36) is writable, only with 0 or 1 (5.13.4,
        G-01); anything else is a driver error the device ignores so that it
        never presents another value (D-05).  Bytes of a wider write that fall
        on read-only fields are ignored too.
        """
        if not offset <= CONFIG_BYPASS_OFFSET < offset + len(data):
            log.debug("ignored config write at %d (%d bytes)", offset, len(data))
            return
        if self._driver_features is not None and not (
            self._driver_features & Feature.BYPASS_CONFIG
        ):
            log.debug("ignored bypass write: BYPASS_CONFIG not negotiated")
            return
        value = data[CONFIG_BYPASS_OFFSET - offset]
        if value not in (0, 1):
            log.debug("ignored bypass write of %d", value)
            return
        with self._lock:
            changed = self._bypass != bool(value)
            self._bypass = bool(value)
            if changed:
                # Unattached VFIO endpoints follow config bypass (5.13.6).
                for b in self._vfio.values():
                    if not self._attached_domains(b):
                        self._sync_identity(b)

    # --- the C data plane -------------------------------------------------------

    def _configure_c(self) -> None:
        """Push the config MAP checks depend on into the C data plane."""
        lib.hr_relay_configure(self._c, self._granule, self._input_start, self._input_end,
                               self._domain_start, self._domain_end, int(self._map_flags_mask),
                               self._max_mappings or 0, MAX_WRITABLE)  # fmt: skip

    def _sync_memory(self) -> None:
        """Give C the current guest RAM layout (GuestMemory may grow after construction)."""
        gen = self.memory.generation
        if gen == self._mem_generation:
            return
        regions = self.memory.regions
        arr = ffi.new("struct hr_gmem_region[]", max(len(regions), 1))
        for i, r in enumerate(regions):
            arr[i].gpa, arr[i].size, arr[i].hva = r.gpa, r.size, r.hva
        if lib.hr_relay_set_memory(self._c, arr, len(regions)) < 0:
            raise ValueError(f"guest memory has more than {lib.HR_GMEM_MAX_REGIONS} regions")
        self._mem_generation = gen
        self._fast_generation = gen if self._fast else -1

    def _sync_memlock(self) -> None:
        """Tell C how much RLIMIT_MEMLOCK is left, as the kernel will count it.

        Free when the limit does not apply (CAP_IPC_LOCK, infinite limit, or
        no VFIO endpoint); otherwise reads VmLck so memory the VMM locked
        itself counts, as type1 counts it (Linux >= 3.x vfio_lock_acct).
        """
        limit = self._budget.limit() if self._budget is not None else None
        if limit is None:
            lib.hr_relay_set_memlock(self._c, U64_MAX, 0)
        else:
            charged = int(lib.hr_relay_charged(self._c))
            lib.hr_relay_set_memlock(self._c, limit, max(locked_bytes() - charged, 0))

    def _new_domain(self, domain_id: int, bypass: bool) -> _Domain:
        dom = _Domain(domain_id, bypass)
        if lib.hr_relay_domain_add(self._c, domain_id, dom.table.ptr, int(bypass)) < 0:
            raise MemoryError("hr_relay_domain_add")
        self._domains[domain_id] = dom
        return dom

    def _refresh(self, dom: _Domain) -> None:
        """Recompute a domain's derived state and mirror it into C."""
        dom.refresh()
        pairs = [v for r in dom.resv for v in (r.start, r.end)]
        lib.hr_relay_domain_set_resv(self._c, dom.id, ffi.new("uint64_t[]", pairs or [0]), len(dom.resv))
        custom = not all(_is_native(b) for b in dom.backends)
        lib.hr_relay_domain_set_custom(self._c, dom.id, int(custom))
        # Every container C can account for, even in a custom domain (where
        # C only checks and the caller fans out): the stats read them.
        counted = [b.c for b in dom.backends if isinstance(b, VfioBackend)]
        lib.hr_relay_domain_set_containers(self._c, dom.id, ffi.new("struct hr_container *[]", counted or [ffi.NULL]),
                                           len(counted))  # fmt: skip

    def _c_failure(self, res: Any) -> None:
        """Log a kernel failure the C data plane reported and queue its fault events."""
        dom = self._domains.get(int(res.domain))
        what = "MAP" if res.req_type == ReqType.MAP else "UNMAP"
        native = [b for b in dom.backends if _is_native(b)] if dom is not None else []
        b = native[res.container] if 0 <= res.container < len(native) else None
        if res.reason == lib.HR_R_MISMATCH:
            exc: Exception = DeviceFailure(
                f"kernel unmapped {int(res.got):#x} bytes of [{int(res.iova):#x}, +{int(res.size):#x}], "
                "not what the table held; every container and the table now hold none of it"
            )
        else:
            from hostrelay.errors import vfio_error

            exc = vfio_error(int(res.err), f"VFIO_IOMMU_{what}_DMA", iova=int(res.iova), size=int(res.size))
        if b is not None:
            self._backend_failed(b, exc, what, int(res.iova), write=True)
        else:
            log.warning("%s at %#x failed: %s", what, int(res.iova), exc)

    # --- endpoints ------------------------------------------------------------

    def add_endpoint(
        self,
        endpoint_id: int,
        *,
        reserved: Iterable[tuple[int, int]] = (),
        backend: Backend | None = None,
    ) -> None:
        """Declare an endpoint (a PCI requester ID) behind this IOMMU.

        ``reserved`` adds RESV_MEM RESERVED regions for this endpoint only;
        ``backend`` is where its domain's mappings take effect (issue 4:
        VFIO); ``None`` means an emulated endpoint served by :meth:`translate`.
        """
        if not 0 <= endpoint_id <= U32_MAX:
            raise ValueError(f"endpoint id {endpoint_id} is not a u32")
        regions = list(self._common_resv) + _as_regions(reserved, ResvMemType.RESERVED)
        _check_disjoint(regions)
        self._check_fits(regions)
        with self._lock:
            if endpoint_id in self._endpoints:
                raise ValueError(f"endpoint {endpoint_id:#x} already exists")
            self._endpoints[endpoint_id] = _Endpoint(endpoint_id, tuple(regions), backend)

    def add_vfio_endpoint(
        self,
        endpoint_id: int,
        bdf: str,
        *,
        dev_root: Path | None = None,
        sysfs_root: Path | None = None,
    ) -> Device:
        """Declare a passed-through PCI function ``bdf`` as endpoint ``endpoint_id``.

        Opens the function's VFIO group in its own type1v2 container, or
        reuses the container when a sibling of the same group was added
        already (a group moves as a unit), opens the device fd and keeps it
        open as a VMM would (returned, and later :meth:`vfio_device`).

        Host reality goes into the config: ``page_size_mask`` becomes the
        intersection of every container's ``iova_pgsizes`` (further narrowed
        by the configured mask where that keeps the granule), ``input_range``
        the intersection of the configured range with the span of every
        container's usable IOVA ranges, and the endpoint reports RESV_MEM for
        its group's ``reserved_regions`` and for the holes between its
        container's usable ranges (the MSI window as the MSI subtype).  Only
        allowed before the driver looks at the config (first request,
        :meth:`ack_features` or :meth:`set_queue`): raises :class:`RuntimeError`
        afterwards.
        """
        from hostrelay.vfio import DEFAULT_DEV_ROOT, DEFAULT_SYSFS_ROOT, group_of

        dev_root = DEFAULT_DEV_ROOT if dev_root is None else dev_root
        sysfs_root = DEFAULT_SYSFS_ROOT if sysfs_root is None else sysfs_root
        if not 0 <= endpoint_id <= U32_MAX:
            raise ValueError(f"endpoint id {endpoint_id} is not a u32")
        with self._lock:
            if self._frozen:
                raise RuntimeError("the driver has read the config: add VFIO endpoints before it starts")
            if endpoint_id in self._endpoints:
                raise ValueError(f"endpoint {endpoint_id:#x} already exists")
            group_id = group_of(bdf, sysfs_root)
            backend = self._vfio.get(group_id)
            new = backend is None
            if backend is None:
                if self._budget is None:
                    self._budget = MemlockBudget(self._c)
                    # With CAP_IPC_LOCK type1 checks no limit (Linux >= 3.x
                    # vfio_lock_acct), so there is nothing to refresh per MAP.
                    self._fast = self._budget.lock_cap
                    self._fast_generation = self._mem_generation if self._fast else -1
                backend = VfioBackend(self.memory, group_id, budget=self._budget,
                                      dev_root=dev_root, sysfs_root=sysfs_root)  # fmt: skip
            try:
                backends = [*self._vfio.values(), backend] if new else list(self._vfio.values())
                mask, input_range = self._host_config(backends)
                regions = self._host_regions(backend, input_range)
                self._check_fits(regions)
                device = backend.open_device(bdf)
                if new:
                    # No domain exists before the freeze: the endpoint is
                    # unattached and follows config bypass.
                    backend.set_identity(self._bypass)
            except BaseException:
                if new:
                    backend.close()
                raise
            self._vfio[group_id] = backend
            self._vfio_devices[endpoint_id] = device
            self._endpoints[endpoint_id] = _Endpoint(endpoint_id, tuple(regions), backend)
            self._page_size_mask = mask
            self._granule = mask & -mask
            self._input_start, self._input_end = input_range
            self._configure_c()
            return device

    def _host_config(self, backends: Sequence[VfioBackend]) -> tuple[int, tuple[int, int]]:
        """``page_size_mask`` and ``input_range`` for these containers (Linux >= 5.4 reports ranges)."""
        hosts = U64_MAX
        start, end = self._user_input_range
        for b in backends:
            hosts &= b.info.iova_pgsizes
            if b.info.iova_ranges:
                start = max(start, min(r.start for r in b.info.iova_ranges))
                end = min(end, max(r.end for r in b.info.iova_ranges))
        if not hosts:
            raise ValueError("the host IOMMUs have no page size in common")
        granule = hosts & -hosts
        if granule > MAX_GUEST_GRANULE:
            raise ValueError(
                f"host IOMMU granule {granule:#x} is larger than {MAX_GUEST_GRANULE:#x}: "
                "an x86 guest's virtio-iommu driver cannot use it"
            )
        narrowed = hosts & self._user_page_size_mask
        mask = narrowed if narrowed and narrowed & -narrowed == granule else hosts
        if start > end:
            raise ValueError("the host IOMMUs have no usable IOVA range in common with input_range")
        return mask, (start, end)

    def _host_regions(self, backend: VfioBackend, input_range: tuple[int, int]) -> list[ResvMem]:
        """RESV_MEM regions of an endpoint of ``backend``: configured + host reserved + range holes."""
        lo, hi = input_range
        msi = [(r.start, r.end) for r in self._common_resv if r.subtype == ResvMemType.MSI]
        msi += [(r.start, r.end) for r in backend.host_reserved if r.is_msi]
        reserved = [(r.start, r.end) for r in self._user_reserved]
        reserved += [(r.start, r.end) for r in backend.host_reserved if not r.is_msi]
        ranges = sorted((r.start, r.end) for r in backend.info.iova_ranges)
        # Holes between usable ranges: type1 refuses MAPs there (EINVAL).
        reserved += [(a[1] + 1, b[0] - 1) for a, b in zip(ranges, ranges[1:]) if b[0] > a[1] + 1]
        msi_u = _union(msi)
        if len(msi_u) > 1:  # D-42: one MSI property per endpoint; the rest stays reserved
            reserved += msi_u[1:]
            msi_u = msi_u[:1]
        clipped = [(max(s, lo), min(e, hi)) for s, e in _union(reserved) if s <= hi and e >= lo]
        out = [ResvMem(ResvMemType.MSI, s, e) for s, e in msi_u]
        out += [ResvMem(ResvMemType.RESERVED, s, e) for s, e in _subtract(clipped, msi_u)]
        _check_disjoint(out)
        return out

    def vfio_device(self, endpoint_id: int) -> Device:
        """The open VFIO device fd of a VFIO endpoint (to drive its DMA)."""
        return self._vfio_devices[endpoint_id]

    def vfio_backend(self, endpoint_id: int) -> VfioBackend:
        """The container backend of a VFIO endpoint (shared by its group)."""
        b = self._endpoints[endpoint_id].backend
        if not isinstance(b, VfioBackend):
            raise ValueError(f"endpoint {endpoint_id:#x} is not a VFIO endpoint")
        return b

    def close(self) -> None:
        """Close every VFIO device, group and container (the kernel unpins everything).

        A ``close`` the kernel fails is logged and the rest carries on: Linux
        has released the fd by then, so there is nothing left to retry and
        nothing to leak.
        """
        with self._lock:
            for b in self._vfio.values():
                try:
                    b.close()
                except OSError as exc:
                    log.warning("closing the container of group %d: %s", b.group_id, exc)
            self._vfio.clear()
            self._vfio_devices.clear()

    def stats(self) -> dict[str, Any]:
        """Pinned-page bookkeeping, per domain and in total (kept by the C data plane).

        ``pinned_bytes`` counts each guest page once however many IOVAs and
        containers map it; ``charged_bytes`` is what type1 charges to
        RLIMIT_MEMLOCK (per container and per mapping, so the same page in two
        containers or at two IOVAs counts twice).  ``containers`` has each VFIO
        container's own counters; ``bypass`` the identity maps.
        """
        with self._lock:
            mapped = ffi.new("uint64_t *")
            domains: dict[int, dict[str, int]] = {}
            for dom in self._domains.values():
                n_vfio = sum(1 for b in dom.backends if isinstance(b, VfioBackend))
                pinned = int(lib.hr_relay_pinned(self._c, dom.id, ffi.NULL, 0, mapped))
                domains[dom.id] = {
                    "mappings": len(dom.table),
                    "containers": n_vfio,
                    "pinned_bytes": pinned,
                    "charged_bytes": int(mapped[0]) * n_vfio,
                }
            identity = [v for b in self._vfio.values() for gpa, size in b.identity_pieces() for v in (gpa, gpa + size - 1)]
            extra = ffi.new("uint64_t[]", identity or [0])
            containers = {gid: b.stats() for gid, b in self._vfio.items()}
            return {
                "domains": domains,
                "bypass": {
                    "containers": sum(1 for b in self._vfio.values() if b.identity_mapped),
                    "pinned_bytes": int(lib.hr_relay_pinned(self._c, -2, extra, len(identity) // 2, ffi.NULL)),
                    "charged_bytes": sum(c["identity_bytes"] for c in containers.values()),
                },
                "total": {
                    "pinned_bytes": int(lib.hr_relay_pinned(self._c, -1, extra, len(identity) // 2, ffi.NULL)),
                    "charged_bytes": int(lib.hr_relay_charged(self._c)),
                    "entries": sum(c["entries"] for c in containers.values()),
                },
                "containers": containers,
            }

    def reserved_regions(self, endpoint_id: int) -> tuple[ResvMem, ...]:
        """The RESV_MEM regions PROBE reports for an endpoint."""
        return self._endpoints[endpoint_id].resv

    def endpoint_domain(self, endpoint_id: int) -> int | None:
        """The domain an endpoint is attached to, if any."""
        dom = self._endpoints[endpoint_id].domain
        return None if dom is None else dom.id

    def domain_ids(self) -> list[int]:
        """IDs of the live domains."""
        return sorted(self._domains)

    def domain_is_bypass(self, domain_id: int) -> bool:
        """True for a domain created with ATTACH_F_BYPASS."""
        return self._domains[domain_id].bypass

    def domain_endpoints(self, domain_id: int) -> list[int]:
        """Endpoints attached to a domain."""
        return sorted(self._domains[domain_id].endpoints)

    def mappings(self, domain_id: int) -> list[Mapping]:
        """A domain's mappings in IOVA order (read from the C table)."""
        return list(self._domains[domain_id].table)

    def mapping_count(self, domain_id: int) -> int:
        """Number of mappings in a domain."""
        return len(self._domains[domain_id].table)

    def table(self, domain_id: int) -> MappingTable:
        """A domain's C table (for a C queue walker or for inspection)."""
        return self._domains[domain_id].table

    # --- resets -----------------------------------------------------------------

    def reset(self) -> None:
        """Device reset: no endpoint stays attached (5.13.5, D-06).

        ``bypass`` keeps its value (D-04); pending fault records are dropped,
        and so are the queues: a driver sets them up again after a reset
        (virtio 1.2 §3.1.1), and a stopped queue (:attr:`needs_reset`) ends here.
        """
        with self._lock:
            self._queues.clear()
            self._requestq = None
            for ep in self._endpoints.values():
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
                            self._sync_identity(ep.backend)
            self._events.clear()

    def system_reset(self) -> None:
        """System reset: device reset, and ``bypass`` back to its initial value (D-04)."""
        self.reset()
        self._bypass = self._initial_bypass

    # --- requests ---------------------------------------------------------------

    def handle_request(self, readable: bytes | bytearray | memoryview, writable_len: int) -> bytes:
        """Process one request; return exactly the bytes the device writes.

        ``readable`` is the device-readable part (head + body) and
        ``writable_len`` the size of the device-writable part.  The tail is
        the last 4 writable bytes; the reply is ``writable_len`` bytes (tail,
        or PROBE properties + tail) so the used length always equals the
        writable length, which is what the Linux driver requires before it
        copies the status back (research §1.4).  ``b""`` means "used length
        0": an unknown type (D-08), a PROBE without F_PROBE (D-36) or a chain
        whose tail cannot be located (5.13.6).  No exception escapes.
        """
        if type(readable) is bytes and self._fast_generation == self.memory.generation:
            # MAP/UNMAP in one C call and nothing else: measured under TCG,
            # every Python step here costs about as much as a syscall.  (No
            # config freeze here: a MAP/UNMAP can only succeed after an
            # ATTACH, which took the full path and froze it.)
            # The C call takes the relay's lock itself.
            try:
                rc: int = _relay_fast(self._c, readable, len(readable), writable_len, self._c_result)
            except Exception:  # arguments C could not take (it ran nothing)
                log.exception("internal error handling a request")
                return self._internal_error(writable_len)
            if 0 <= rc < _FAST_REPORT:
                return _TAILS[rc]
            if rc >= 0:  # done, and a kernel failure to report: C kept the lock for this
                try:
                    self._c_failure(self._c_result)
                except Exception:
                    log.exception("internal error reporting a kernel failure")
                finally:
                    self._lock.release()
                return _TAILS[rc & 0xFF]
        try:
            if type(readable) is not bytes:
                readable = bytes(readable)  # a guest buffer view: decode from a stable copy
            with self._lock:
                self._frozen = True  # a driver is talking: the config it read stays
                return self._handle(readable, writable_len)
        except Exception:  # a bug must not take the device down
            log.exception("internal error handling a request")
            return self._internal_error(writable_len)

    @classmethod
    def _internal_error(cls, writable_len: int) -> bytes:
        """The reply to a request the relay failed on itself: DEVERR if the
        writable part can hold a reply, else used length 0 (also for a
        ``writable_len`` that is not even an int)."""
        if isinstance(writable_len, int) and TAIL_SIZE <= writable_len <= MAX_WRITABLE:
            return cls._reply(Status.DEVERR, writable_len)
        return b""

    def _handle(self, readable: bytes, writable_len: int) -> bytes:
        n = len(readable)
        if n < HEAD_SIZE or not TAIL_SIZE <= writable_len <= MAX_WRITABLE:
            return b""
        req_type = readable[0]  # head.reserved ignored (D-09)
        cls = REQUEST_CLASSES.get(req_type)
        if cls is None:
            return b""  # D-08
        if req_type == ReqType.MAP or req_type == ReqType.UNMAP:
            return self._map_unmap(readable, writable_len)
        if req_type == ReqType.PROBE:
            if not self._probe:
                return b""  # D-36
            return self._probe_req(readable, writable_len)
        # The writable part of ATTACH/DETACH/MAP/UNMAP is the tail alone and
        # the readable part is exactly head + body: any other split is an
        # inconsistent buffer, refused before anything is decoded.
        if n != cls.readable_size() or writable_len != TAIL_SIZE:
            return self._reply(Status.INVAL, writable_len)
        req = cls.unpack(readable[HEAD_SIZE:])
        try:
            self._handlers[req_type](req)
        except Exception as exc:
            status = status_for(exc)
            if status == Status.DEVERR:
                log.warning("%s failed: %r", cls.TYPE.name, exc)
            else:
                log.debug("%s refused (%s): %s", cls.TYPE.name, status.name, exc)
            return pack_tail(status)
        return pack_tail(Status.OK)

    @staticmethod
    def _reply(status: int, writable_len: int) -> bytes:
        # Zeros up to the tail: properties a failed PROBE does not write are
        # zero-filled (D-39, D-40), and the used length is the writable length.
        return bytes(writable_len - TAIL_SIZE) + pack_tail(status)

    def _check_domain_id(self, domain_id: int) -> None:
        # G-03 forbids the driver such IDs; 5.13.6 names no status, and
        # "out-of-range parameters" is what RANGE means.
        if not self._domain_start <= domain_id <= self._domain_end:
            raise OutOfRange(f"domain {domain_id} outside domain_range")

    # ATTACH (5.13.6.3)
    def _attach_req(self, req: AttachRequest) -> None:
        if req.reserved != _ZERO4:
            raise InvalidRequest("ATTACH reserved is not zero")  # D-11 (MUST)
        if req.flags & ~ATTACH_F_MASK:
            raise InvalidRequest(f"unknown ATTACH flags {req.flags:#x}")  # D-12 (MUST)
        ep = self._endpoints.get(req.endpoint)
        if ep is None:
            raise NoEntry(f"no endpoint {req.endpoint:#x}")  # D-13 (MUST)
        self._check_domain_id(req.domain)
        bypass = bool(req.flags & AttachFlag.BYPASS)
        dom = self._domains.get(req.domain)
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
        elif self._max_domains is not None:
            frees_one = ep.domain is not None and len(ep.domain.endpoints) == 1
            if len(self._domains) - frees_one >= self._max_domains:
                raise NoResources("domain limit reached")
        if ep.backend is not None:
            # A host IOMMU group is one container: its devices cannot be in
            # different domains (crosvm answers the same; research §2.11).
            for o in self._endpoints.values():
                if o is not ep and o.backend is ep.backend and o.domain is not None and o.domain.id != req.domain:
                    raise Unsupported(
                        f"endpoint {ep.id:#x} shares a host IOMMU group with {o.id:#x}, which is in domain {o.domain.id}"
                    )
        if ep.domain is not None:
            # D-16: as if DETACH, then ATTACH; the bypass identity map is
            # settled by _link (no map-then-unmap of all guest RAM).
            self._detach(ep, sync=False)
        if dom is None:
            dom = self._new_domain(req.domain, bypass)
        try:
            self._link(ep, dom)
        except BaseException:
            if not dom.endpoints:
                self._drop_domain(dom)
            if ep.backend is not None:
                self._sync_identity(ep.backend)  # unattached now: follow config bypass
            raise

    def _link(self, ep: _Endpoint, dom: _Domain) -> None:
        b = ep.backend
        if b is not None and not dom.has_backend(b):
            set_identity = getattr(b, "set_identity", None)
            try:
                if set_identity is not None:
                    # Bypass domain: guest RAM at IOVA = GPA; otherwise the
                    # identity map goes before the domain's mappings come in.
                    set_identity(dom.bypass)
                if not dom.bypass and len(dom.table):
                    self._replay(b, dom)
            except BaseException as exc:
                self._backend_failed(b, exc, "ATTACH", 0, write=True)
                raise
        dom.endpoints[ep.id] = ep
        ep.domain = dom
        self._refresh(dom)

    @staticmethod
    def _replay(b: Backend, dom: _Domain) -> None:
        # A backend new to the domain gets every existing mapping
        # (QEMU/CH replay on attach); undo on failure so it ends clean.
        done: list[Mapping] = []
        try:
            for m in dom.table:
                b.map(m)
                done.append(m)
        except BaseException:
            if done:
                try:
                    b.unmap(done)
                except Exception:
                    log.exception("rollback of ATTACH replay failed")
            raise

    def _attached_domains(self, b: Backend) -> list[_Domain]:
        return [o.domain for o in self._endpoints.values() if o.backend is b and o.domain is not None]

    def _sync_identity(self, b: Backend) -> None:
        """Give ``b`` the identity map iff its endpoints are in bypass; failures are logged."""
        set_identity = getattr(b, "set_identity", None)
        if set_identity is None:
            return
        doms = self._attached_domains(b)
        want = doms[0].bypass if doms else self._bypass
        try:
            set_identity(want)
        except Exception as exc:
            self._backend_failed(b, exc, "bypass identity map" if want else "bypass identity unmap", 0, write=True)

    def _backend_failed(self, b: Backend, exc: BaseException, what: str, address: int, *, write: bool) -> None:
        """Log a backend's refusal and queue a fault record per endpoint it serves.

        The Linux driver ignores MAP/UNMAP statuses, so the event queue (and
        the host log) is where a refused relay becomes visible; reason UNKNOWN
        because 5.13.6.9 has no better one for "the host could not do it".
        """
        eps = [o.id for o in self._endpoints.values() if o.backend is b]
        log.warning("%s at %#x refused by the backend of endpoint(s) %s: %s", what, address,
                    ", ".join(f"{e:#x}" for e in eps), exc)  # fmt: skip
        flags = int((FaultFlag.WRITE if write else FaultFlag.READ) | FaultFlag.ADDRESS)
        for e in eps:
            self._queue_event(Fault(FaultReason.UNKNOWN, flags, e, address).pack())

    def _queue_event(self, record: bytes) -> None:
        if len(self._events) < self._event_limit:
            self._events.append(record)
        else:
            self.dropped_events += 1  # 5.13.6.9: the device may drop events

    def _detach(self, ep: _Endpoint, *, sync: bool = True) -> None:
        """Take ``ep`` out of its domain; all or nothing.

        Every kernel step happens before the endpoint is unlinked, so a
        refusal leaves it attached with its container as it was: the
        domain's mappings out (D-22), then, with ``sync``, the identity map
        the container needs once unattached (config ``bypass``, 5.13.6).  If
        the identity step fails the mappings are put back.
        """
        dom = ep.domain
        assert dom is not None
        b = ep.backend
        # The container leaves the domain only with the last endpoint of its group.
        leaving = b is not None and not any(o.backend is b for o in dom.endpoints.values() if o is not ep)
        unmapped = False
        if leaving and b is not None and not dom.bypass and len(dom.table):
            # D-22: after DETACH the endpoint reaches none of the domain's mappings.
            try:
                b.unmap(list(dom.table))
            except UnmapMismatch as exc:
                # The container holds none of them now: finish the detach.
                self._backend_failed(b, exc, "DETACH", 0, write=True)
                self._unlink(ep)
                if sync:
                    self._sync_identity(b)
                raise
            except BaseException as exc:
                self._backend_failed(b, exc, "DETACH", 0, write=True)
                raise
            unmapped = True
        set_identity = getattr(b, "set_identity", None) if leaving else None
        if sync and set_identity is not None and dom.bypass != self._bypass:
            # Unattached, the container follows config bypass: the identity
            # map comes (a normal domain, bypass 1) or goes (a bypass
            # domain, bypass 0).  set_identity is all or nothing itself.
            assert b is not None
            try:
                set_identity(self._bypass)
            except BaseException as exc:
                self._backend_failed(b, exc, "DETACH (bypass identity map)", 0, write=True)
                if unmapped:
                    try:
                        self._replay(b, dom)
                    except Exception:
                        # Two failures in a row: the container holds none of
                        # the domain's mappings, so the endpoint is detached.
                        log.exception("DETACH: could not put the mappings of domain %d back", dom.id)
                        self._unlink(ep)
                raise
        self._unlink(ep)

    def _unlink(self, ep: _Endpoint) -> None:
        dom = ep.domain
        assert dom is not None
        del dom.endpoints[ep.id]
        ep.domain = None
        if dom.endpoints:
            self._refresh(dom)
        else:
            self._drop_domain(dom)  # the domain dies with its last endpoint

    def _drop_domain(self, dom: _Domain) -> None:
        self._domains.pop(dom.id, None)
        lib.hr_relay_domain_remove(self._c, dom.id)
        dom.table.clear()

    # DETACH (5.13.6.4); reserved is ignored (D-19)
    def _detach_req(self, req: DetachRequest) -> None:
        ep = self._endpoints.get(req.endpoint)
        if ep is None:
            raise NoEntry(f"no endpoint {req.endpoint:#x}")  # D-20 (MUST)
        self._check_domain_id(req.domain)
        if ep.domain is None or ep.domain.id != req.domain:
            raise InvalidRequest(f"endpoint {ep.id:#x} is not in domain {req.domain}")  # D-21
        self._detach(ep)

    # MAP (5.13.6.5) and UNMAP (5.13.6.6): checked and executed in C
    def _map_unmap(self, readable: bytes, writable_len: int) -> bytes:
        self._sync_memory()
        if self._budget is not None:
            self._sync_memlock()
        res = self._c_result
        n = lib.hr_relay_request(self._c, readable, len(readable), writable_len, self._c_tail, res)
        if n <= 0:
            return b""
        status = int(res.status)
        if status == lib.HR_S_DEFER:
            status = self._deferred(readable)
        elif res.reason == lib.HR_R_KERNEL or res.reason == lib.HR_R_MISMATCH:
            self._c_failure(res)
        return self._reply(status, n)

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

    def _map_custom(self, req: MapRequest) -> None:
        vs, ve, ps, flags = req.virt_start, req.virt_end, req.phys_start, req.flags
        dom = self._domains[req.domain]
        table = dom.table
        mapping = Mapping(vs, ve, ps, flags)
        current: Backend | None = None
        done: list[Backend] = []
        try:
            # Limits before any ioctl (design: "before the kernel trips"):
            # each container's entries and ranges, then the memlock charge of
            # all of them together, since type1 charges one process counter.
            charge = 0
            for b in dom.backends:
                current = b
                precheck = getattr(b, "precheck", None)
                if precheck is not None:
                    charge += precheck(mapping)
            current = None
            if charge and self._budget is not None:
                self._budget.check(charge)
            for b in dom.backends:
                current = b
                b.map(mapping)
                done.append(b)
            current = None
            table.insert(vs, ve, ps, flags)
        except BaseException as exc:
            # Design: a MAP that fails in one backend is undone in the others.
            for b in done:
                try:
                    b.unmap([mapping])
                except Exception:
                    log.exception("rollback of MAP %s failed", mapping)
            for b in [current] if current is not None else dom.backends:
                self._backend_failed(b, exc, "MAP", vs, write=bool(flags & MapFlag.WRITE))
            raise

    def _unmap_custom(self, req: UnmapRequest) -> None:
        vs, ve = req.virt_start, req.virt_end
        dom = self._domains[req.domain]
        table = dom.table
        if dom.backends and table.check_range(vs, ve):
            # Straddles were refused by check_range (D-32) before any backend
            # is touched; then each backend drops exactly the covered mappings.
            self._unmap_backends(dom, table.covered(vs, ve), vs)
        # Atomic in C: RANGE with nothing removed if a mapping is straddled
        # (D-32); holes are fine (D-33).
        table.remove_range(vs, ve)

    def _unmap_backends(self, dom: _Domain, covered: list[Mapping], address: int) -> None:
        """Fan an UNMAP out; a refusal re-maps the backends already done.

        A kernel byte-count mismatch (:class:`UnmapMismatch`) leaves that
        container without the mappings, so the others and the table follow
        (all converge on "unmapped") and the mismatch is then reported.
        """
        mismatch: UnmapMismatch | None = None
        done: list[Backend] = []
        for b in dom.backends:
            try:
                b.unmap(covered)
            except UnmapMismatch as exc:
                self._backend_failed(b, exc, "UNMAP", address, write=True)
                mismatch = exc
            except BaseException as exc:
                self._backend_failed(b, exc, "UNMAP", address, write=True)
                for d in done:
                    for m in covered:
                        try:
                            d.map(m)
                        except Exception:
                            log.exception("rollback of UNMAP: re-map of %s failed", m)
                raise
            done.append(b)
        if mismatch is not None:
            dom.table.remove_range(covered[0].start, covered[-1].end)
            raise mismatch

    # PROBE (5.13.6.7); request reserved is ignored (D-34)
    def _probe_req(self, readable: bytes, writable_len: int) -> bytes:
        if len(readable) != ProbeRequest.readable_size():
            return self._reply(Status.INVAL, writable_len)
        if writable_len != self._probe_size + TAIL_SIZE:
            # D-39: a properties area smaller than probe_size gets no property
            # and INVAL; a larger one breaks the driver's MUST as well.
            return self._reply(Status.INVAL, writable_len)
        req = ProbeRequest.unpack(readable[HEAD_SIZE:])
        ep = self._endpoints.get(req.endpoint)
        if ep is None:
            return self._reply(Status.NOENT, writable_len)  # D-35
        # Sizes were checked when the regions were configured; D-37/38/40/41
        # are the codec's job (zero reserved bits, length 20, zero fill).
        return pack_properties(list(ep.resv), self._probe_size) + pack_tail(Status.OK)

    # --- the virtqueues -----------------------------------------------------------

    def set_queue(self, index: int, *, size: int, desc: int, avail: int, used: int) -> None:
        """Place virtqueue ``index`` (0 = requestq, 1 = eventq) in guest memory.

        ``desc``, ``avail`` and ``used`` are the guest-physical addresses the
        driver wrote to the transport; ``size`` is a power of two <= 32768.
        Raises :class:`ValueError` if the geometry is invalid or the rings are
        not inside guest RAM.
        """
        if index not in (0, 1):
            raise ValueError("virtio-iommu has two queues: 0 (requestq) and 1 (eventq)")
        with self._lock:
            self._sync_memory()
            q = _Queue()
            rc = lib.hr_vq_setup(q.vq, lib.hr_relay_memory(self._c), size, desc, avail, used)
            if rc < 0:
                raise ValueError(f"queue {index}: invalid geometry or rings outside guest RAM (errno {-rc})")
            self._queues[index] = q
            if index == 0:
                self._requestq = q
            # A driver sets up its queues after reading the config (virtio
            # 1.2 §3.1.1 steps 5-7), so process_queue need not say it again.
            self._frozen = True

    def process_queue(self, index: int = 0) -> int:
        """Serve every available buffer of queue ``index``; return how many were completed.

        requestq: one C call walks the ring; MAP and UNMAP are parsed, checked,
        forwarded to every container, recorded and completed without returning
        to Python; ATTACH, DETACH and PROBE come back here and go through the
        same code as :meth:`handle_request`.  A malformed chain is completed
        with used length 0; an available entry that names no descriptor, or
        an avail index past the ring, stops the queue instead (:attr:`needs_reset`).  Fault records queued meanwhile are then delivered
        to the eventq if it is set up.  eventq: fills the driver's buffers with
        pending 24-byte fault records.
        """
        q = self._requestq
        if index == 0 and q is not None and self._fast_generation == self.memory.generation and not self._events:
            # The usual call, kept short: measured under TCG, the Python
            # around the C walker is a fixed cost paid once per kick.  The C
            # call takes the lock itself and keeps it when there is more to do.
            rc: int = _relay_process_locked(self._c, q.c)
            if not rc & _PROCESS_ANY:
                return rc >> _PROCESS_SHIFT  # every request done in C
            try:
                return self._process_rest(q, rc)
            finally:
                self._lock.release()
        with self._lock:
            q = self._queues.get(index)
            if q is None:
                raise ValueError(f"queue {index} is not set up")
            if index == 1:
                return self._fill_events(q)
            if self._fast_generation != self.memory.generation:
                self._sync_memory()
                if not self._fast:
                    self._sync_memlock()
            # Per call, not per request: the C walker completes every
            # MAP/UNMAP itself and returns only for what needs Python.
            return self._process_rest(q, _relay_process(self._c, q.c))

    def _process_rest(self, q: _Queue, rc: int) -> int:
        """process_queue after the first C call: failures to report, requests
        for the control plane, fault records for the eventq.  Lock held."""
        c, qc, done = self._c, q.c, 0
        while True:
            done += rc >> _PROCESS_SHIFT
            if rc & _PROCESS_ERRORS:
                for i in range(qc.nerrs):
                    self._c_failure(qc.errs[i])
            code = rc & _PROCESS_CODE
            if code == _PROCESS_IDLE:
                break
            if code == _PROCESS_BROKEN:
                self._queue_broke(0)
                break
            if code == _PROCESS_CALLER:
                self._serve_pending(q)
                done += 1
            rc = _relay_process(c, qc)
        events = self._queues.get(1)
        if events is not None and self._events:
            self._fill_events(events)
        return done

    def _serve_pending(self, q: _Queue) -> None:
        chain = q.chain
        # At most MAX_READABLE + 1 bytes, whatever the chain claims: one byte
        # more than any request tells "too long" as well as the whole would.
        n = lib.hr_chain_read(chain, q.buf, len(q.buf))
        wlen = int(chain.write_len)
        try:
            reply = self._handle(bytes(ffi.buffer(q.buf, n)), wlen)
        except Exception:  # as in handle_request: a bug must not take the device down
            log.exception("internal error handling a request from the ring")
            reply = self._internal_error(wlen)
        lib.hr_relay_complete(q.vq, chain, reply, len(reply))

    @staticmethod
    def _queue_broke(index: int) -> None:
        log.error(
            "queue %d: the driver made a descriptor index >= the queue size available, or moved "
            "the avail index more than the queue size ahead; the queue is stopped until the "
            "device is reset (set DEVICE_NEEDS_RESET)",
            index,
        )

    @property
    def needs_reset(self) -> bool:
        """True once a queue has stopped on an error only a device reset clears.

        The driver made an impossible head available (an avail ring entry >=
        the queue size: no used element can name it) or moved the avail index
        more than the queue size ahead of what the device took (virtio 1.2
        §2.7.6), so the device stops that queue (QEMU's ``virtio_error`` does
        the same).  The VMM should
        then set DEVICE_NEEDS_RESET (0x40) in the device status and send a
        configuration change notification (virtio 1.2 §2.1.2); the driver
        resets the device, and :meth:`reset` drops the queues it sets up again.
        """
        return any(q.vq.broken for q in self._queues.values())

    def _fill_events(self, q: _Queue) -> int:
        # 5.13.6.9: each event buffer gets one 24-byte fault record; buffers
        # stay with the device until there is something to report.
        done = 0
        while self._events and lib.hr_vq_pending(q.vq):
            if lib.hr_vq_pop(q.vq, q.chain, ffi.NULL) != 1:
                if q.vq.broken:
                    self._queue_broke(1)
                    break
                lib.hr_vq_push(q.vq, q.chain.head, 0)  # malformed: give it back empty
                continue
            record = self._events.popleft()
            if q.chain.write_len < len(record):
                lib.hr_vq_push(q.vq, q.chain.head, 0)
                self._events.appendleft(record)
                continue
            lib.hr_relay_complete(q.vq, q.chain, record, len(record))
            done += 1
        return done

    # --- emulated endpoints ---------------------------------------------------

    def translate(self, endpoint_id: int, iova: int, size: int, *, write: bool) -> int:
        """GPA of an emulated endpoint's DMA to ``[iova, iova + size - 1]``.

        Identity in bypass (5.13.6: unattached with ``bypass`` = 1, or a
        bypass domain) and inside the MSI doorbell window.  A span may cross
        mappings that are adjacent in IOVA and contiguous in GPA.  Otherwise
        raises :class:`TranslationFault` after queueing a 24-byte fault record
        (5.13.6.9): reason DOMAIN for an unattached endpoint, MAPPING for an
        unmapped address or missing READ/WRITE permission (D-28).
        """
        if size <= 0 or iova < 0 or iova + size - 1 > U64_MAX:
            raise ValueError(f"bad DMA span {iova:#x}+{size:#x}")
        with self._lock:
            ep = self._endpoints.get(endpoint_id)
            if ep is None:
                raise ValueError(f"unknown endpoint {endpoint_id:#x}")
            dom = ep.domain
            if dom is None:
                if self._bypass:
                    return iova
                # D-10: unattached, non-bypass endpoints reach nothing.
                raise self._fault(FaultReason.DOMAIN, ep.id, iova, write)
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
                raise self._fault(FaultReason.MAPPING, ep.id, exc.address, write) from None

    def _fault(self, reason: FaultReason, endpoint: int, address: int, write: bool) -> TranslationFault:
        flags = (FaultFlag.WRITE if write else FaultFlag.READ) | FaultFlag.ADDRESS
        self._queue_event(Fault(reason, int(flags), endpoint, address).pack())
        return TranslationFault(reason, endpoint, address, write=write)

    def pop_events(self) -> list[bytes]:
        """Take the queued 24-byte fault records, oldest first."""
        with self._lock:
            out = list(self._events)
            self._events.clear()
        return out

