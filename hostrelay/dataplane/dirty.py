"""The migration dirty log: which guest pages the relay's devices may have written.

:class:`DirtyLog` is what :meth:`hostrelay.relay.Relay.start_dirty_log`,
:meth:`~hostrelay.relay.Relay.dirty_pages` and
:meth:`~hostrelay.relay.Relay.stop_dirty_log` drive.  Per host address space:

- **type1 containers** with the migration capability: the kernel's log
  (``VFIO_IOMMU_DIRTY_PAGES``), read per IOVA-contiguous run of the
  container's ``vfio_dma`` entries and translated through the domain's table
  (:meth:`hostrelay.backends.type1.VfioBackend.dirty_collect`).  Mappings
  removed meanwhile are read with their unmap
  (``VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP``), wherever the unmap happens: a
  guest UNMAP in the C data plane, which records the GPAs of the pages the
  bitmap names (``hr_relay_dirty_set``, cext/hr_fanout.c) for
  :meth:`dirty_pages` to take, so MAP and UNMAP keep their C paths while the
  log runs; a DETACH or a bypass identity map removed in the Python
  fan-out (``MappedSpace._kunmap_logged``).
- **emulated endpoints**: every :meth:`~hostrelay.relay.Relay.translate`
  with ``write=True`` (:meth:`note_write`) -- the relay handed out exactly
  that range.
- **untracked spaces** (iommufd IOASes, a type1 container without the
  capability, a VMM's own backends): every page a device there could write
  since the previous call: the writable mappings of their domains now and at
  the previous call, every writable mapping made meanwhile (the C UNMAP
  records each one it removes; the Python fan-out each one it maps), the
  domains they joined meanwhile, and all of guest RAM while one is in bypass.

Everything here runs under the relay's lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hostrelay._native import ffi, lib
from hostrelay.backends.iommufd import IommufdGroup
from hostrelay.backends.memory import GuestMemory
from hostrelay.backends.type1 import VfioBackend
from hostrelay.dataplane.handle import DataPlane
from hostrelay.kernel.errors import VfioError
from hostrelay.model.dirty import DirtyLogStatus, SpaceDirtyStatus, merge_pages
from hostrelay.model.mapping import Mapping
from hostrelay.model.wire import MapFlag

if TYPE_CHECKING:
    from hostrelay.model.ports import Backend
    from hostrelay.model.topology import Domain, Topology

__all__ = ["DirtyLog", "iommufd_reason"]

log = logging.getLogger("hostrelay.relay")

_W = int(MapFlag.WRITE)
_TAKE = 4096  # C records taken per call


def iommufd_reason(caps: list[int]) -> str:
    """Why an iommufd IOAS is not tracked, from each device's ``IOMMU_GET_HW_INFO`` ``out_capabilities``.

    Dirty tracking in iommufd (Linux >= 6.7) is a property of a HWPT
    allocated with ``IOMMU_HWPT_ALLOC_DIRTY_TRACKING`` (``IOMMU_HWPT_SET_DIRTY_TRACKING``,
    ``IOMMU_HWPT_GET_DIRTY_BITMAP``), and only on an IOMMU that reports
    ``IOMMU_HW_CAP_DIRTY_TRACKING``; hostrelay attaches devices to an IOAS,
    whose auto-domain the kernel allocates without that flag.
    """
    from hostrelay.kernel.iommufd import HW_CAP_DIRTY_TRACKING

    if caps and all(c & HW_CAP_DIRTY_TRACKING for c in caps):
        return ("the IOMMU reports IOMMU_HW_CAP_DIRTY_TRACKING, but hostrelay attaches devices to IOAS "
                "auto-domains, which the kernel allocates without IOMMU_HWPT_ALLOC_DIRTY_TRACKING")  # fmt: skip
    shown = ", ".join(f"{c:#x}" for c in caps) or "no device bound"
    return f"the IOMMU reports no IOMMU_HW_CAP_DIRTY_TRACKING (IOMMU_GET_HW_INFO out_capabilities {shown})"


class DirtyLog:
    """The relay's dirty log; ``active`` while it runs.

    It reads the relay's parts at each step: the topology, the type1
    backends and iommufd groups (by group id, the relay's own dicts), and
    ``identity()``, the IOAS of iommufd endpoints in bypass (``None``: none).
    ``fanout`` is the :class:`~hostrelay.backends.fanout.FanOutAddressSpace`
    that tells it of MAPs and joins while it runs.
    """

    def __init__(self, dp: DataPlane, memory: GuestMemory, topology: Topology, fanout: Any,
                 vfio: dict[int, VfioBackend], iommufd: dict[int, IommufdGroup],
                 identity: Callable[[], Any]) -> None:  # fmt: skip
        self.dp = dp
        self.memory = memory
        self.topology = topology
        self.fanout = fanout
        self.vfio = vfio
        self.iommufd = iommufd
        self.identity = identity
        self.active = False
        self._tracked: list[VfioBackend] = []
        # GPA ranges since the previous call: emulated writes, and what
        # untracked devices could reach (snapshot at the previous call, plus
        # what they were given meanwhile).
        self._emulated: list[tuple[int, int]] = []
        self._exposed: list[tuple[int, int]] = []

    # --- start and stop ----------------------------------------------------------------

    def start(self) -> DirtyLogStatus:
        """Start logging (see :meth:`hostrelay.relay.Relay.start_dirty_log`)."""
        if self.active:
            raise RuntimeError("the dirty log is running already")
        spaces: list[SpaceDirtyStatus] = []
        self._tracked = []
        for gid, b in sorted(self.vfio.items()):
            try:
                pgsize = b.dirty_start()
            except VfioError as exc:
                spaces.append(SpaceDirtyStatus("type1", b.label, False, f"dirty logging refused: {exc}"))
                continue
            self._tracked.append(b)
            spaces.append(SpaceDirtyStatus("type1", b.label, True, pgsize=pgsize))
        if self.iommufd:
            caps = []
            for g in self.iommufd.values():
                for dev in g.devices.values():
                    try:
                        caps.append(dev.hw_info().out_capabilities)
                    except VfioError as exc:
                        log.warning("dirty log: IOMMU_GET_HW_INFO of %s: %s", dev, exc)
                        caps.append(0)
            spaces.append(SpaceDirtyStatus("iommufd", "iommufd", False, iommufd_reason(caps)))
        custom = {id(ep.backend): ep.backend for ep in self.topology.endpoints.values()
                  if ep.backend is not None and not isinstance(ep.backend, (VfioBackend, IommufdGroup))}  # fmt: skip
        for own in custom.values():
            spaces.append(SpaceDirtyStatus("custom", type(own).__name__, False,
                                           "a VMM's own backend: the relay cannot see its DMA"))  # fmt: skip
        spaces.append(SpaceDirtyStatus("emulated", "translate", True))
        status = DirtyLogStatus(tuple(spaces))
        self.active = True
        self._emulated = []
        self._exposed = self._exposure_now()
        self.fanout.dirty = self
        lib.hr_relay_dirty_set(self.dp.c, 1)
        return status

    def stop(self) -> None:
        """Stop logging; the kernel logs end and the C fast path is back."""
        if not self.active:
            raise RuntimeError("the dirty log is not running")
        self.active = False
        self.fanout.dirty = None
        lib.hr_relay_dirty_set(self.dp.c, 0)
        for b in self._tracked:
            try:
                b.dirty_stop()
            except VfioError as exc:
                log.warning("dirty log: stopping %s: %s", b.label, exc)
        self._tracked = []
        self._emulated = []
        self._exposed = []

    # --- what happens meanwhile ----------------------------------------------------------

    def note_write(self, gpa: int, size: int) -> None:
        """An emulated endpoint was given ``[gpa, gpa + size)`` to write."""
        self._emulated.append((gpa, size))

    def _all_ram(self) -> list[tuple[int, int]]:
        """Every page of guest RAM: what a device in bypass could write."""
        return [(r.gpa, r.size) for r in self.memory.regions]

    def _untracked(self, backend: Backend) -> bool:
        return not any(backend is t for t in self._tracked)

    def mapped(self, domain: Domain, mapping: Mapping) -> None:
        """A MAP went into ``domain``: an untracked device there may write it."""
        if mapping.flags & _W and any(self._untracked(b) for b in domain.backends):
            self._exposed.append((mapping.phys, mapping.size))

    def exposed(self, domain: Domain | None, backend: Backend) -> None:
        """``backend`` joined ``domain`` (``None``: the bypass identity map): it may write what is there."""
        if not self._untracked(backend):
            return
        if domain is None or domain.bypass:
            self._exposed += self._all_ram()
        else:
            self._exposed += [(m.phys, m.size) for m in domain.table if m.flags & _W]

    def _exposure_now(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for dom in self.topology.domains.values():
            if any(self._untracked(b) for b in dom.backends):
                if dom.bypass:
                    return self._all_ram()
                out += [(m.phys, m.size) for m in dom.table if m.flags & _W]
        identity = self.identity()
        if identity is not None and any(g.attached is identity for g in self.iommufd.values()):
            return self._all_ram()
        if any(b.identity_mapped and self._untracked(b) for b in self.vfio.values()):
            return self._all_ram()
        return out

    # --- the report ----------------------------------------------------------------------

    def dirty_pages(self) -> list[tuple[int, int]]:
        """Every GPA range written since the previous call (see :meth:`hostrelay.relay.Relay.dirty_pages`)."""
        if not self.active:
            raise RuntimeError("dirty_pages() without a dirty log: call start_dirty_log() first")
        out: list[tuple[int, int]] = []
        for b in self._tracked:
            # attached_domains names a domain once per endpoint of b in it.
            doms = {d.id: d for d in self.topology.attached_domains(b) if not d.bypass}
            out += b.dirty_collect([m for d in doms.values() for m in d.table])
        now = self._exposure_now()
        out += self._exposed + now
        self._exposed = now
        out += self._emulated
        self._emulated = []
        out += self._take_c()
        return merge_pages(out)

    def _take_c(self) -> list[tuple[int, int]]:
        """What the C UNMAP recorded since the previous call (all guest RAM if it lost some)."""
        buf = ffi.new("struct hr_dirty_range[]", _TAKE)
        lost = ffi.new("uint32_t *")
        out: list[tuple[int, int]] = []
        while True:
            n = int(lib.hr_relay_dirty_take(self.dp.c, buf, _TAKE, lost))
            out += [(int(buf[i].gpa), int(buf[i].size)) for i in range(n)]
            if lost[0]:
                log.warning("dirty log: the C records overflowed; reporting all guest RAM")
                out += self._all_ram()
            if n < _TAKE:
                return out
