"""The embedding API: :class:`Relay`, one virtio-iommu device for one guest.

A facade: it builds the parts below and delegates to them, so each has one
responsibility and a second backend or front end lands beside them.

- config space and features: :class:`hostrelay.model.config.ConfigSpace`;
- host reality (page sizes, input range, reserved regions):
  :class:`hostrelay.model.reality.HostReality`;
- domains and endpoints, ATTACH and DETACH:
  :class:`hostrelay.model.topology.Topology`, over the host address space of
  each domain, :class:`hostrelay.backends.fanout.FanOutAddressSpace`;
- request dispatch and PROBE: :class:`hostrelay.model.control.ControlPlane`;
- MAP and UNMAP, the one C implementation behind both doors:
  :class:`hostrelay.dataplane.handle.DataPlane` and
  :class:`hostrelay.dataplane.requests.Requests` (``handle_request``);
- the queue front end: :class:`hostrelay.dataplane.ring.Queues`;
- translate and fault events: :class:`hostrelay.model.translate.Translator`,
  :class:`hostrelay.model.events.FaultLog`.

``docs/architecture.md`` walks one MAP through them; ``docs/requirements.md``
lists the spec requirements (D-xx) they implement.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
import errno
import logging
from typing import Any

from hostrelay.backends.fanout import FanOutAddressSpace
from hostrelay.backends.iommufd import IoasSpace, IommufdAddressSpace, IommufdGroup, iommufd_usable
from hostrelay.backends.memory import GuestMemory
from hostrelay.backends.type1 import VfioBackend
from hostrelay.dataplane.dirty import DirtyLog
from hostrelay.dataplane.handle import DataPlane
from hostrelay.dataplane.requests import Requests
from hostrelay.dataplane.ring import QueuePosition, Queues, RecordedRequest
from hostrelay.dataplane.snapshot import StateKeeper
from hostrelay.dataplane.table import MappingTable
from hostrelay.kernel.errors import VfioError
from hostrelay.kernel.vfio import DEFAULT_DEV_ROOT, DEFAULT_SYSFS_ROOT, Device, group_of
from hostrelay.model.config import DEFAULT_PAGE_SIZE_MASK, DEFAULT_PROBE_SIZE, MAX_WRITABLE, ConfigSpace
from hostrelay.model.control import MAX_READABLE
from hostrelay.model.dirty import DirtyLogStatus, SpaceDirtyStatus
from hostrelay.model.events import DEFAULT_EVENT_LIMIT, FaultLog
from hostrelay.model.mapping import Mapping
from hostrelay.model.ports import Backend
from hostrelay.model.reality import DEFAULT_MSI_WINDOW, MAX_GUEST_GRANULE, HostIommu, HostReality
from hostrelay.model.state import DeviceState, StateError
from hostrelay.model.status import (
    DeviceFailure,
    InvalidRequest,
    NoEntry,
    NoResources,
    OutOfRange,
    RelayError,
    TranslationFault,
    Unsupported,
)
from hostrelay.model.topology import Endpoint, Topology
from hostrelay.model.translate import Translator
from hostrelay.model.wire import U32_MAX, U64_MAX, Config, ResvMem

__all__ = [
    "Backend",
    "DEFAULT_EVENT_LIMIT",
    "DEFAULT_MAX_MAPPINGS",
    "DEFAULT_MSI_WINDOW",
    "DEFAULT_PAGE_SIZE_MASK",
    "DEFAULT_PROBE_SIZE",
    "DeviceFailure",
    "DirtyLogStatus",
    "InvalidRequest",
    "MAX_GUEST_GRANULE",
    "MAX_READABLE",
    "MAX_WRITABLE",
    "Mapping",
    "NoEntry",
    "NoResources",
    "OutOfRange",
    "QueuePosition",
    "RecordedRequest",
    "Relay",
    "RelayError",
    "SpaceDirtyStatus",
    "StateError",
    "TranslationFault",
    "Unsupported",
]

log = logging.getLogger(__name__)

# Mappings one domain may hold by default: 2^20 one-page mappings are a
# B+ tree of at most about 64 MiB, more than any guest's DMA API keeps live
# (VFIO domains stop far earlier: type1's dma_entry_limit is 65535).
DEFAULT_MAX_MAPPINGS = 1 << 20


#: What ``backend=`` of :meth:`Relay.add_vfio_endpoint` accepts.
VFIO_BACKENDS = ("type1", "iommufd", "auto")


def host_iommu(backend: VfioBackend | IommufdGroup) -> HostIommu:
    """What a type1 container or an iommufd group reports, as the host-reality arithmetic takes it."""
    if isinstance(backend, IommufdGroup):
        # iommufd maps any multiple of the IOMMU's smallest page, and reports
        # the usable ranges of an IOAS the group is attached to.
        page_sizes, ranges = backend.page_sizes, backend.iova_ranges
    else:
        page_sizes, ranges = backend.info.iova_pgsizes, backend.info.iova_ranges
    return HostIommu(
        page_sizes=page_sizes,
        iova_ranges=tuple((r.start, r.end) for r in ranges),
        reserved=tuple((r.start, r.end, r.is_msi) for r in backend.host_reserved),
    )


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
    ``vfio_backend``
        how :meth:`add_vfio_endpoint` opens a device when it is not told:
        ``"type1"`` (a VFIO group in a type1 container, fanned out per
        domain), ``"iommufd"`` (a VFIO device cdev attached to one IOAS per
        domain) or ``"auto"`` (iommufd where ``/dev/iommu`` and the device's
        cdev exist and this build has it, else type1).

    Host reality (VFIO): :meth:`add_vfio_endpoint` recomputes
    ``page_size_mask`` and ``input_range`` from the containers and gives the
    endpoint RESV_MEM regions from its group's ``reserved_regions`` and the
    holes between the host's usable IOVA ranges.  The config must not change
    once the driver looked at it, so VFIO endpoints can only be added before
    the first request, :meth:`ack_features` or :meth:`set_queue` (the relay
    is then *frozen*).
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
        vfio_backend: str = "type1",
    ) -> None:
        if vfio_backend not in VFIO_BACKENDS:
            raise ValueError(f"vfio_backend must be one of {', '.join(VFIO_BACKENDS)}, not {vfio_backend!r}")
        self.vfio_backend_default = vfio_backend
        self.memory = memory
        self._config = ConfigSpace(page_size_mask=page_size_mask, input_range=input_range,
                                   domain_range=domain_range, bypass=bypass, probe=probe,
                                   probe_size=probe_size, mmio=mmio)  # fmt: skip
        self._reality = HostReality(page_size_mask=page_size_mask, input_range=input_range,
                                    probe_size=self._config.probe_size if probe else None,
                                    msi_window=msi_window, reserved_regions=reserved_regions)  # fmt: skip
        self._max_mappings = max_mappings
        self._events = FaultLog(event_limit)
        self._dp = DataPlane(memory)
        self._lock = self._dp.lock
        # Type1 containers and custom backends fan out; iommufd groups share
        # one IOAS per domain (opened only once an iommufd endpoint is added).
        self._space = IommufdAddressSpace(FanOutAddressSpace(self._report, lambda: self._dp.budget), memory,
                                          self._report, self._dp.memlock_budget)  # fmt: skip
        self._topology = Topology(self._config, self._events, self._space, self._dp, MappingTable,
                                  max_domains=max_domains)  # fmt: skip
        self._requests = Requests(self._dp, self._config, self._topology, self._space)
        self._queues = Queues(self._dp, self._config, self._requests.control, self._events,
                              self._requests.report_failure)  # fmt: skip
        self._translator = Translator(self._config, self._topology, self._events, self._lock)
        # VFIO: one backend per host IOMMU group, and the device fds a VMM keeps open.
        self._vfio: dict[int, VfioBackend] = {}
        self._iommufd: dict[int, IommufdGroup] = {}
        self._vfio_devices: dict[int, Device] = {}
        self._vfio_bdfs: dict[int, str] = {}
        self._state = StateKeeper(self._dp, self._config, self._topology, self._queues, self._events,
                                  self._requests, self._vfio_bdfs,
                                  lambda: [*self._vfio.values(), *self._iommufd.values()])  # fmt: skip
        self._dp.configure(self._config, max_mappings)
        self._dirty = DirtyLog(self._dp, memory, self._topology, self._space.fanout, self._vfio, self._iommufd,
                               lambda: self._space.identity)  # fmt: skip
        # The two hot doors become the parts' own bound methods, so a request
        # or a kick pays no second Python frame (measured under --icount: the
        # frame costs 0.42 us a request, handle_request 1.98x raw instead of
        # 1.89x).  Only while the class's methods are the ones defined below:
        # a subclass's override, or a test's patch of the class, stays in force.
        # handle_request goes one step further: a native METH_FASTCALL
        # callable (Requests.native_door, cext/pydoor/hr_pydoor.c) instead
        # of the Python method; measured under --icount (tests/bench_vfio.py
        # --pairs 1024): 16.73 -> 11.35 us a MAP+UNMAP pair, 1.88x -> 1.28x
        # raw, below the two bare Python->C ioctl calls (1.44x).
        cls = type(self)
        if cls.handle_request is _HANDLE_REQUEST:
            self.handle_request = self._requests.native_door()  # type: ignore[method-assign, assignment]
        if cls.process_queue is _PROCESS_QUEUE:
            self.process_queue = self._queues.process_queue  # type: ignore[method-assign]

    def _report(self, backend: Backend, exc: BaseException, what: str, address: int, *, write: bool) -> None:
        self._topology.report(backend, exc, what, address, write=write)

    # --- config space and features ------------------------------------------------------

    @property
    def device_features(self) -> int:
        """Feature bits the device offers (5.13.3 plus VIRTIO_F_VERSION_1)."""
        return self._config.device_features

    def ack_features(self, driver_features: int) -> int:
        """Record the features the driver accepted; returns the negotiated set.

        Optional: without it the relay assumes the driver accepted everything.
        It only gates the ``bypass`` config write (5.13.4: only when
        BYPASS_CONFIG is negotiated).
        """
        return self._config.ack_features(driver_features)

    @property
    def bypass(self) -> bool:
        """Current config ``bypass`` field."""
        return self._config.bypass

    @property
    def page_size_mask(self) -> int:
        """Config ``page_size_mask``."""
        return self._config.page_size_mask

    def config(self) -> Config:
        """The config space as a dataclass."""
        return self._config.config()

    def config_bytes(self) -> bytes:
        """The 40-byte ``struct virtio_iommu_config`` (5.13.4)."""
        return self._config.config().pack()

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to config space.

        Only ``bypass`` (offset 36) is writable, only with 0 or 1 (5.13.4,
        G-01); anything else is a driver error the device ignores so that it
        never presents another value (D-05).  Unattached VFIO endpoints
        follow the new value (5.13.6).
        """
        value = self._config.bypass_write(offset, data)
        if value is None:
            return
        with self._lock:
            changed = self._config.bypass != value
            self._config.bypass = value
            if changed:
                # The VFIO containers the relay opened and still has open; a
                # VMM's own backends follow bypass only through ATTACH/DETACH.
                self._topology.bypass_changed([*self._vfio.values(), *self._iommufd.values()])

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
        ``backend`` is where its domain's mappings take effect; ``None``
        means an emulated endpoint served by :meth:`translate`.
        """
        if not 0 <= endpoint_id <= U32_MAX:
            raise ValueError(f"endpoint id {endpoint_id} is not a u32")
        regions = self._reality.emulated_regions(reserved)
        with self._lock:
            self._topology.add(Endpoint(endpoint_id, regions, backend))

    def add_vfio_endpoint(
        self,
        endpoint_id: int,
        bdf: str,
        *,
        backend: str | None = None,
        dev_root: Path | None = None,
        sysfs_root: Path | None = None,
    ) -> Device:
        """Declare a passed-through PCI function ``bdf`` as endpoint ``endpoint_id``.

        ``backend`` (default: the relay's ``vfio_backend``) says how:

        - ``"type1"``: the function's VFIO group is opened in its own type1v2
          container, or the container is reused when a sibling of the same
          group was added already (a group moves as a unit); a domain's
          MAP/UNMAP go to each of its groups' containers;
        - ``"iommufd"``: the function's VFIO device cdev is opened and bound to
          the relay's ``/dev/iommu``; a domain is one IOAS its devices are
          attached to (one ioctl per MAP however many devices, pinned once,
          a move between domains is one replace);
        - ``"auto"``: iommufd where it is usable here, else type1.

        The device fd stays open as a VMM would keep it (returned, and later
        :meth:`vfio_device`).

        Host reality goes into the config: ``page_size_mask`` becomes the
        intersection of every host IOMMU's page sizes (type1 ``iova_pgsizes``;
        for iommufd every multiple of the IOAS alignment), further narrowed by
        the configured mask where that keeps the granule, ``input_range`` the
        intersection of the configured range with the span of every usable
        IOVA range, and the endpoint reports RESV_MEM for its group's
        ``reserved_regions`` and for the holes between its usable ranges (the
        MSI window as the MSI subtype).  Only allowed before the driver looks
        at the config (first request, :meth:`ack_features` or
        :meth:`set_queue`): raises :class:`RuntimeError` afterwards.
        """
        dev_root = DEFAULT_DEV_ROOT if dev_root is None else dev_root
        sysfs_root = DEFAULT_SYSFS_ROOT if sysfs_root is None else sysfs_root
        kind = self.vfio_backend_default if backend is None else backend
        if kind not in VFIO_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(VFIO_BACKENDS)}, not {kind!r}")
        if not 0 <= endpoint_id <= U32_MAX:
            raise ValueError(f"endpoint id {endpoint_id} is not a u32")
        with self._lock:
            if self._config.frozen:
                raise RuntimeError("the driver has read the config: add VFIO endpoints before it starts")
            if endpoint_id in self._topology.endpoints:
                raise ValueError(f"endpoint {endpoint_id:#x} already exists")
            group_id = group_of(bdf, sysfs_root)
            if kind == "auto":
                if group_id in self._vfio:
                    kind = "type1"  # a group is opened one way (cdev and group fds exclude each other)
                elif group_id in self._iommufd:
                    kind = "iommufd"
                else:
                    kind = "iommufd" if iommufd_usable(bdf, dev_root=dev_root, sysfs_root=sysfs_root) is None else "type1"
            if kind == "iommufd":
                device = self._add_iommufd(endpoint_id, bdf, group_id, dev_root, sysfs_root)
            else:
                device = self._add_type1(endpoint_id, bdf, group_id, dev_root, sysfs_root)
            self._dp.configure(self._config, self._max_mappings)
            return device

    def _hosts(self) -> list[HostIommu]:
        opened: list[VfioBackend | IommufdGroup] = [*self._vfio.values(), *self._iommufd.values()]
        return [host_iommu(b) for b in opened]

    def _add_type1(self, endpoint_id: int, bdf: str, group_id: int, dev_root: Path, sysfs_root: Path) -> Device:
        if group_id in self._iommufd:
            raise ValueError(f"group {group_id} of {bdf} is open through iommufd: add its functions with backend='iommufd'")
        backend = self._vfio.get(group_id)
        new = backend is None
        if backend is None:
            backend = VfioBackend(self.memory, group_id, budget=self._dp.memlock_budget(),
                                  dev_root=dev_root, sysfs_root=sysfs_root)  # fmt: skip
        try:
            hosts = [*self._hosts(), host_iommu(backend)] if new else self._hosts()
            mask, input_range = self._reality.config(hosts)
            regions = self._reality.regions(host_iommu(backend), input_range)
            device = backend.open_device(bdf)
            if new:
                # No domain exists before the freeze: the endpoint is
                # unattached and follows config bypass.
                backend.set_identity(self._config.bypass)
        except BaseException:
            if new:
                backend.close()
            raise
        self._vfio[group_id] = backend
        self._vfio_devices[endpoint_id] = device
        self._vfio_bdfs[endpoint_id] = bdf
        self._topology.add(Endpoint(endpoint_id, regions, backend))
        self._config.set_host(mask, input_range)
        return device

    def _add_iommufd(self, endpoint_id: int, bdf: str, group_id: int, dev_root: Path, sysfs_root: Path) -> Device:
        if group_id in self._vfio:
            raise ValueError(f"group {group_id} of {bdf} is open in a type1 container: add its functions with backend='type1'")
        why = iommufd_usable(bdf, dev_root=dev_root, sysfs_root=sysfs_root, iommu=self._space.iommu_path)
        if why is not None:
            raise VfioError(errno.ENODEV, "iommufd backend", path=bdf, hint=why)
        group = self._iommufd.get(group_id)
        new = group is None
        if group is None:
            group = self._space.add_group(group_id, dev_root=dev_root, sysfs_root=sysfs_root)
        try:
            device = group.open_device(bdf)  # the first device probes the IOMMU's ranges
            hosts = [*self._hosts(), host_iommu(group)] if new else self._hosts()
            mask, input_range = self._reality.config(hosts)
            regions = self._reality.regions(host_iommu(group), input_range)
            if new:
                # Unattached: bypass -> the shared identity IOAS, else nothing.
                self._space.follow(group, self._config.bypass)
        except BaseException:
            if new:
                try:
                    group.close()
                finally:
                    self._space.drop_group(group)
            else:
                dev = group.devices.pop(bdf, None)
                if dev is not None:
                    dev.close()
            raise
        self._iommufd[group_id] = group
        self._vfio_devices[endpoint_id] = device
        self._vfio_bdfs[endpoint_id] = bdf
        self._topology.add(Endpoint(endpoint_id, regions, group))
        self._config.set_host(mask, input_range)
        return device

    def vfio_device(self, endpoint_id: int) -> Device:
        """The open VFIO device fd of a VFIO endpoint (to drive its DMA)."""
        return self._vfio_devices[endpoint_id]

    def vfio_backend(self, endpoint_id: int) -> VfioBackend:
        """The container backend of a VFIO endpoint (shared by its group)."""
        b = self._topology.endpoint(endpoint_id).backend
        if not isinstance(b, VfioBackend):
            raise ValueError(f"endpoint {endpoint_id:#x} is not a VFIO endpoint")
        return b

    def iommufd_group(self, endpoint_id: int) -> IommufdGroup:
        """The iommufd backend of a VFIO endpoint added with ``backend="iommufd"`` (shared by its group)."""
        b = self._topology.endpoint(endpoint_id).backend
        if not isinstance(b, IommufdGroup):
            raise ValueError(f"endpoint {endpoint_id:#x} is not an iommufd endpoint")
        return b

    def domain_ioas(self, domain_id: int) -> IoasSpace | None:
        """The IOAS holding ``domain_id``'s mappings for its iommufd devices (``None``: it has none)."""
        return self._space.domains.get(domain_id)

    def bypass_ioas(self) -> IoasSpace | None:
        """The identity IOAS shared by every iommufd endpoint in bypass (``None``: none is)."""
        return self._space.identity

    def close(self) -> None:
        """Close every VFIO device, group and container (the kernel unpins everything).

        A ``close`` the kernel fails is logged and the rest carries on: Linux
        has released the fd by then, so there is nothing left to retry and
        nothing to leak.
        """
        self._queues.stop_thread()  # before the lock: the thread may be waiting for it
        with self._lock:
            if self._dirty.active:
                self._dirty.stop()  # the dirty log ends with the containers
            for b in self._vfio.values():
                try:
                    b.close()
                except OSError as exc:
                    log.warning("closing the container of group %d: %s", b.group_id, exc)
            try:
                self._space.close()
            except OSError as exc:
                log.warning("closing the iommufd devices: %s", exc)
            self._vfio.clear()
            self._iommufd.clear()
            self._vfio_devices.clear()
            self._vfio_bdfs.clear()

    def replace_memory(self, regions: Iterable[tuple[int, int, int, int]]) -> None:
        """Make guest RAM exactly ``regions``: ``(gpa, size, fd, offset)`` each, mapped shared.

        For a VMM whose memory layout arrives or changes after the relay was
        built (vhost-user's SET_MEM_TABLE comes after the driver read the
        config).  The fds stay the caller's: keep them open while they are
        guest RAM.  Only allowed while nothing holds a host address of the old
        RAM: no queue set up and no domain (so no mapping) -- a :meth:`reset`
        gets there -- and, with VFIO endpoints, only from empty guest RAM
        (their bypass identity maps were made from the old layout).  Raises
        :class:`RuntimeError` otherwise and :class:`ValueError` for a bad
        region (guest RAM is then empty).
        """
        wanted = list(regions)
        with self._lock:
            if self._queues.queues:
                raise RuntimeError("guest memory cannot change while queues are set up (reset the device first)")
            if self._topology.domains:
                raise RuntimeError("guest memory cannot change while domains exist (their mappings use it)")
            if (self._vfio or self._iommufd) and self.memory.regions:
                raise RuntimeError("guest memory cannot change under VFIO endpoints (their identity maps use it)")
            self.memory.clear()
            try:
                for gpa, size, fd, offset in wanted:
                    self.memory.add_region(gpa, size, fd=fd, offset=offset)
            except BaseException:
                self.memory.clear()
                raise
            finally:
                self._dp.sync_memory()

    # --- inspection -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Pinned-page bookkeeping, per domain and in total (kept by the C data plane).

        ``pinned_bytes`` counts each guest page once however many IOVAs and
        containers map it; ``charged_bytes`` is what type1 charges to
        RLIMIT_MEMLOCK (per container and per mapping, so the same page in two
        containers or at two IOVAs counts twice).  ``containers`` has each VFIO
        container's own counters; ``bypass`` the identity maps.
        """
        with self._lock:
            out = self._dp.stats(list(self._topology.domains.values()), self._vfio)
            if self._iommufd:
                out["iommufd"] = self._space.stats()
            return out

    def reserved_regions(self, endpoint_id: int) -> tuple[ResvMem, ...]:
        """The RESV_MEM regions PROBE reports for an endpoint."""
        return self._topology.endpoint(endpoint_id).resv

    def endpoint_domain(self, endpoint_id: int) -> int | None:
        """The domain an endpoint is attached to, if any."""
        dom = self._topology.endpoint(endpoint_id).domain
        return None if dom is None else dom.id

    def domain_ids(self) -> list[int]:
        """IDs of the live domains."""
        return sorted(self._topology.domains)

    def domain_is_bypass(self, domain_id: int) -> bool:
        """True for a domain created with ATTACH_F_BYPASS."""
        return self._topology.domains[domain_id].bypass

    def domain_endpoints(self, domain_id: int) -> list[int]:
        """Endpoints attached to a domain."""
        return sorted(self._topology.domains[domain_id].endpoints)

    def mappings(self, domain_id: int) -> list[Mapping]:
        """A domain's mappings in IOVA order (read from the C table)."""
        return list(self._topology.domains[domain_id].table)

    def mapping_count(self, domain_id: int) -> int:
        """Number of mappings in a domain."""
        return len(self._topology.domains[domain_id].table)

    def table(self, domain_id: int) -> MappingTable:
        """A domain's C table (for a C queue walker or for inspection)."""
        table = self._topology.domains[domain_id].table
        assert isinstance(table, MappingTable)
        return table

    @property
    def dropped_events(self) -> int:
        """Fault records dropped because :meth:`pop_events` was not called in time (a VMM may reset it)."""
        return self._events.dropped

    @dropped_events.setter
    def dropped_events(self, value: int) -> None:
        self._events.dropped = value

    # --- resets -----------------------------------------------------------------

    def reset(self) -> None:
        """Device reset: no endpoint stays attached (5.13.5, D-06).

        ``bypass`` keeps its value (D-04); pending fault records are dropped,
        and so are the queues: a driver sets them up again after a reset
        (virtio 1.2 §3.1.1), and a stopped queue (:attr:`needs_reset`) ends here.
        """
        self._queues.stop_thread()  # before the lock: the thread may be waiting for it
        with self._lock:
            self._queues.clear()
            self._topology.detach_all()
            self._events.clear()

    def system_reset(self) -> None:
        """System reset: device reset, and ``bypass`` back to its initial value (D-04)."""
        self.reset()
        with self._lock:
            changed = self._config.bypass != self._config.initial_bypass
            self._config.bypass = self._config.initial_bypass
            if changed:
                # Every endpoint is unattached now: the VFIO ones follow the
                # restored value as they would a driver's config write.
                self._topology.bypass_changed([*self._vfio.values(), *self._iommufd.values()])

    # --- state save and restore -------------------------------------------------------

    def save_state(self) -> bytes:
        """The device's state as a versioned, checksummed blob (``docs/state.md``).

        Config ``bypass`` and the acknowledged features, every endpoint (its
        kind, and for VFIO its PCI address), every domain with its endpoints
        and mappings, both queues' geometry and indices (the next avail index
        the device takes and the used index it publishes next: vhost's
        ``GET_VRING_BASE``) and the pending fault records.  Take it with the
        guest stopped (the vCPUs paused, so no kick arrives): a request the
        driver made available but the device has not taken is the guest's,
        in guest memory, and the restored ring takes it next.  Guest memory
        itself is the VMM's to save.
        """
        return self._state.save()

    def restore_state(self, data: bytes | bytearray | memoryview) -> DeviceState:
        """Make this new relay the device ``data`` was saved from; returns the decoded state.

        The relay must have the same endpoints (IDs; emulated or VFIO, and
        the same PCI function; the VFIO backend may differ) and nothing else
        yet: no domain, queue, acknowledged feature or request.  Every
        endpoint is attached and every mapping re-made through the same code
        its ATTACH and MAP took, so each VFIO device reaches exactly its
        domain's mappings (or guest RAM, in bypass) before this returns and
        the first request is served.  The queues resume at the saved
        indices.  Raises :class:`StateError`, naming what does not fit, for a
        blob of an unknown version, a truncated or corrupted one, different
        endpoints or config, a mapping outside guest memory or overlapping
        another, or a relay that already has state; the relay is then as it
        was and the kernel holds nothing of the state.
        """
        return self._state.restore(data)

    # --- the two doors: one request, and the virtqueues ------------------------------------

    def handle_request(self, readable: bytes | bytearray | memoryview, writable_len: int) -> bytes:
        """Process one request; return exactly the bytes the device writes.

        ``readable`` is the device-readable part (head + body) and
        ``writable_len`` the size of the device-writable part.  The tail is
        the last 4 writable bytes; the reply is ``writable_len`` bytes (tail,
        or PROBE properties + tail) so the used length always equals the
        writable length, which is what the Linux driver requires before it
        copies the reply back (``__viommu_sync_req`` copies it only when the
        used length equals the writable length, Linux 5.3+).  ``b""`` means "used length 0": an unknown
        type (D-08), a PROBE without F_PROBE (D-36) or a chain whose tail
        cannot be located (5.13.6).  No exception escapes.
        """
        return self._requests.handle_request(readable, writable_len)

    def set_queue(self, index: int, *, size: int, desc: int, avail: int, used: int,
                  avail_index: int | None = None) -> None:  # fmt: skip
        """Place virtqueue ``index`` (0 = requestq, 1 = eventq) in guest memory.

        ``desc``, ``avail`` and ``used`` are the guest-physical addresses the
        driver wrote to the transport; ``size`` is a power of two <= 32768.
        The device resumes at the used index in guest memory, or takes the
        next available buffer at ``avail_index`` when given (a restored queue:
        vhost's "vring base", see :meth:`queue_position`).
        Raises :class:`ValueError` if the geometry is invalid or the rings are
        not inside guest RAM.
        """
        if index == 0:
            self._queues.stop_thread()  # it serves the old ring
        self._queues.set_queue(index, size=size, desc=desc, avail=avail, used=used, avail_index=avail_index)

    def serve_queue_in_thread(self, index: int, kick_fd: int, call_fd: int, need_fd: int, *,
                              spin: float = 0.0, rt_priority: int = 0) -> bool:  # fmt: skip
        """Serve the request queue from a C thread woken by ``kick_fd``; False if it cannot be.

        The thread (cext/hr_kick.c) waits on the kick eventfd and completes
        every MAP/UNMAP the C walker serves itself with no Python at all,
        writing ``call_fd`` (-1: none) unless the driver set
        VRING_AVAIL_F_NO_INTERRUPT.  At anything else (ATTACH, DETACH, PROBE,
        a deferred domain, a kernel failure to report, a stopped queue, a full
        recording buffer) it stops in ring order, writes the ``need_fd``
        eventfd and waits: the caller then calls :meth:`queue_thread_handover`,
        interrupts as after :meth:`process_queue`, and :meth:`resume_queue_thread`.
        ``spin`` > 0: after a kick that completed something the thread looks
        for the driver's next request for that many seconds, with
        VRING_USED_F_NO_NOTIFY set, before it sleeps again (costs a core).
        ``rt_priority`` > 0: the thread runs SCHED_FIFO at that priority, so
        a kick wakes it at once on a busy host (needs CAP_SYS_NICE; refused,
        it runs normally and a warning is logged); not with ``spin``.

        Only queue 0, set up, and only while the C walker may serve MAP
        without a per-request RLIMIT_MEMLOCK refresh from Python (False
        otherwise: serve kicks with :meth:`process_queue`).  The fds stay the
        caller's and must stay open until :meth:`stop_queue_thread`; a reset,
        :meth:`close` and a new ring 0 stop the thread too.  Raises
        :class:`RuntimeError` if it runs already, :class:`OSError` if it
        cannot start.
        """
        if spin > 0 and rt_priority > 0:
            raise ValueError("a real-time thread must not spin: it could starve the vCPU it waits for")
        return self._queues.serve_in_thread(index, kick_fd, call_fd, need_fd, spin, rt_priority)

    def queue_thread_handover(self, index: int = 0) -> int:
        """The thread asked for Python (its ``need_fd``): report what it met, serve the queue.

        Reports the kernel failures the thread's walk met, then
        :meth:`process_queue`; returns how many buffers that completed.
        """
        return self._queues.thread_handover(index)

    def resume_queue_thread(self, index: int = 0) -> bool:
        """Let the thread serve kicks again after :meth:`queue_thread_handover`.

        False if there is none, or it ended on its own (a failed poll, logged
        by the caller): the caller then serves the kicks with :meth:`process_queue`
        after :meth:`stop_queue_thread`.
        """
        return self._queues.resume_thread()

    def stop_queue_thread(self, index: int = 0) -> None:
        """Stop and join the queue's service thread, if any (never call it with the relay's lock held)."""
        self._queues.stop_thread()

    def queue_thread_stats(self, index: int = 0) -> dict[str, int] | None:
        """The service thread's counters (kicks, served, handovers, calls, spin_hits), or None."""
        k = self._queues.kick
        return None if k is None else k.stats()

    # --- recording ---------------------------------------------------------------

    def start_recording(self) -> None:
        """Record every request served from now on, through either door.

        Each request the queues complete (MAP and UNMAP in C included) and
        each :meth:`handle_request` call is kept as a :class:`RecordedRequest`
        in completion order, for :meth:`take_recording`: a live guest's
        stream can be replayed through :meth:`handle_request` on another
        relay and must get the same replies.  While recording, the ring's
        MAP/UNMAP take the C walker's general path (the same checks and
        outcome, a little slower) and ``handle_request`` one Python frame
        more.  A chain that is no request at all (a descriptor error,
        completed with used length 0) is not recorded.  Nothing if already
        recording.
        """
        with self._lock:
            if self._queues.recording is not None:
                return
            recording: list[RecordedRequest] = []
            self._queues.start_recording(recording)
        # Wrap whichever handle_request is in force (the native door, a
        # subclass's); stop_recording puts it back.
        inner = self.__dict__.get("handle_request")
        door = inner if inner is not None else type(self).handle_request.__get__(self)

        def recording_door(readable: bytes | bytearray | memoryview, writable_len: int) -> bytes:
            reply: bytes = door(readable, writable_len)
            with self._lock:
                recording.append(RecordedRequest(bytes(readable), writable_len, reply))
            return reply

        self._door_before_recording = inner
        self.handle_request = recording_door  # type: ignore[method-assign]

    def take_recording(self) -> list[RecordedRequest]:
        """The requests recorded since :meth:`start_recording` or the last call, oldest first."""
        with self._lock:
            recording = self._queues.recording
            if recording is None:
                return []
            self._queues.collect_records()  # what a service thread's walk recorded
            taken = recording[:]
            recording.clear()
            return taken

    def stop_recording(self) -> list[RecordedRequest]:
        """Stop recording; return what was recorded and not yet taken."""
        with self._lock:
            recording = self._queues.recording
            if recording is None:
                return []
            self._queues.stop_recording()  # the walker's last records into it
            taken = recording[:]
        inner = self.__dict__.pop("_door_before_recording", None)
        if inner is not None:
            self.handle_request = inner  # type: ignore[method-assign]
        else:
            self.__dict__.pop("handle_request", None)
        return taken

    def queue_position(self, index: int) -> QueuePosition:
        """Where queue ``index`` is: the next avail index the device takes, the next used index.

        What a VMM saves to restore the queue later with
        ``set_queue(..., avail_index=)`` (vhost's GET/SET_VRING_BASE, state
        save and restore).  Raises :class:`ValueError` if it is not set up.
        """
        return self._queues.position(index)

    def process_queue(self, index: int = 0) -> int:
        """Serve every available buffer of queue ``index``; return how many were completed.

        requestq: one C call walks the ring; MAP and UNMAP are parsed, checked,
        forwarded to every container, recorded and completed without returning
        to Python; ATTACH, DETACH and PROBE come back to Python and go through
        the same code as :meth:`handle_request`.  A malformed chain is
        completed with used length 0; an available entry that names no
        descriptor, or an avail index past the ring, stops the queue instead
        (:attr:`needs_reset`).  Fault records queued meanwhile are then
        delivered to the eventq if it is set up.  eventq: fills the driver's
        buffers with pending 24-byte fault records.
        """
        return self._queues.process_queue(index)

    @property
    def needs_reset(self) -> bool:
        """True once a queue has stopped on an error only a device reset clears.

        The driver made an impossible head available (an avail ring entry >=
        the queue size: no used element can name it) or moved the avail index
        more than the queue size ahead of what the device took (virtio 1.2
        §2.7.6), so the device stops that queue (QEMU's ``virtio_error`` does
        the same).  The VMM should then set DEVICE_NEEDS_RESET (0x40) in the
        device status and send a configuration change notification (virtio
        1.2 §2.1.2); the driver resets the device, and :meth:`reset` drops the
        queues it sets up again.
        """
        return self._queues.needs_reset

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
        gpa = self._translator.translate(endpoint_id, iova, size, write=write)
        if write and self._dirty.active:
            # The dirty log: exactly what was handed out.  Under the lock,
            # as a VMM's device threads translate while another thread may
            # take dirty_pages() (which hands the notes over and starts a new
            # list) or stop the log; a note taken after that call's turn is
            # reported by the next one, before the device writes the page.
            with self._lock:
                if self._dirty.active:
                    self._dirty.note_write(gpa, size)
        return gpa

    def pop_events(self) -> list[bytes]:
        """Take the queued 24-byte fault records, oldest first."""
        with self._lock:
            return self._events.pop()

    # --- dirty log ---------------------------------------------------------------

    def start_dirty_log(self) -> DirtyLogStatus:
        """Start logging the guest pages the relay's devices write, for live migration.

        Per host address space (type1 container, iommufd, emulated endpoints,
        a VMM's own backends) the status says whether the writes are tracked
        or why not.  type1 with the migration capability: the kernel's log
        (``VFIO_IOMMU_DIRTY_PAGES``); emulated endpoints: every
        :meth:`translate` with ``write=True``; anything else is untracked and
        :meth:`dirty_pages` reports every page its devices could write.
        MAP and UNMAP keep their C paths while the log runs (each unmap of a
        logged type1 container reads its dirty bitmap with it, in C).
        ``docs/dirty-log.md`` says what a VMM does with it.  Raises
        :class:`RuntimeError` if it runs already.
        """
        with self._lock:
            return self._dirty.start()

    def dirty_pages(self) -> list[tuple[int, int]]:
        """Guest-physical ``(address, size)`` ranges written since the previous call (or the start).

        Sorted, merged and rounded out to 4 KiB pages.  Includes what mappings
        removed meanwhile (UNMAP, DETACH, bypass changes) may have had written,
        and, for untracked spaces, every page mapped writable there now or
        since the previous call (all of guest RAM while one is in bypass).
        Raises :class:`RuntimeError` without a running log.
        """
        with self._lock:
            return self._dirty.dirty_pages()

    def stop_dirty_log(self) -> None:
        """Stop the dirty log (what was not read is dropped); :class:`RuntimeError` if none runs."""
        with self._lock:
            self._dirty.stop()

    @property
    def dirty_log_running(self) -> bool:
        """True between :meth:`start_dirty_log` and :meth:`stop_dirty_log`."""
        return self._dirty.active


# What Relay.__init__ compares against to know that handle_request and
# process_queue are still the facade's own (see there).
_HANDLE_REQUEST = Relay.handle_request
_PROCESS_QUEUE = Relay.process_queue
