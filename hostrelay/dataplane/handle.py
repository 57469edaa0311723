"""The C relay handle: the one implementation of MAP and UNMAP.

:class:`DataPlane` owns a ``hr_relay`` (``cext/hr_relay.h``): the domains'
tables and containers as C sees them, guest RAM's layout, the limits, and the
mutex that is the relay's only lock.  Both doors into MAP/UNMAP --
:meth:`hostrelay.relay.Relay.handle_request` and the ring walker -- end in
the same C code, so a request gets the same checks, fan-out, rollback and
status whichever way it came.  This module keeps C's copy of everything MAP
and UNMAP read current (config, memory, RLIMIT_MEMLOCK, the domains) and turns
what C reports back into Python terms.
"""

from __future__ import annotations

import array
import logging
from typing import TYPE_CHECKING, Any

from hostrelay._native import ffi, lib
from hostrelay.backends.memory import GuestMemory
from hostrelay.backends.type1 import MemlockBudget, VfioBackend, locked_bytes
from hostrelay.dataplane.table import MappingTable
from hostrelay.kernel.errors import vfio_error
from hostrelay.model.config import MAX_WRITABLE, ConfigSpace
from hostrelay.model.status import DeviceFailure
from hostrelay.model.status import status_for as _model_status_for
from hostrelay.model.wire import U64_MAX, ReqType, Status

if TYPE_CHECKING:
    from hostrelay.model.topology import Domain

log = logging.getLogger("hostrelay.relay")

_errno_status = lib.hr_status_for_errno


def status_for(exc: BaseException) -> Status:
    """:func:`hostrelay.model.status.status_for` with the data plane's errno table."""
    return _model_status_for(exc, _errno_status)


def is_native(backend: object) -> bool:
    """True for a backend the C data plane drives itself (a VFIO container)."""
    return getattr(backend, "c", None) is not None


class RelayLock:
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


class DataPlane:
    """A ``hr_relay`` and what keeps it current; also the domains' :class:`~hostrelay.model.ports.DomainMirror`."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.c = ffi.gc(lib.hr_relay_new(), lib.hr_relay_free)
        if self.c == ffi.NULL:
            raise MemoryError("hr_relay_new")
        # One lock, the data plane's own: a VMM may translate() from device
        # threads while the request queue is processed elsewhere, and the
        # MAP/UNMAP fast paths take it inside their one C call.
        self.lock = RelayLock(self.c)
        self.result = ffi.new("struct hr_result *")
        self.tail = ffi.new("uint8_t[4]")
        self.budget: MemlockBudget | None = None
        self.max_mappings: int | None = None  # as configure() last gave it
        self.mem_generation = -1
        self.fast = True  # False while every MAP needs a RLIMIT_MEMLOCK refresh first
        # The memory generation the fast path may run at (-1: never): one
        # compare on the hot path covers both "C has the current guest RAM
        # layout" and "no per-MAP memlock refresh is needed".
        self.fast_generation = -1
        # The same number for C (handle_request's native door); written only
        # by _set_fast_generation, with the attribute.
        self.fast_cell = array.array("q", [-1])

    def _set_fast_generation(self, gen: int) -> None:
        self.fast_generation = gen
        self.fast_cell[0] = gen

    def configure(self, config: ConfigSpace, max_mappings: int | None) -> None:
        """Push the config MAP checks depend on into C."""
        self.max_mappings = max_mappings
        lib.hr_relay_configure(self.c, config.granule, config.input_start, config.input_end,
                               config.domain_start, config.domain_end, int(config.map_flags_mask),
                               max_mappings or 0, MAX_WRITABLE)  # fmt: skip

    def memlock_budget(self) -> MemlockBudget:
        """The relay's RLIMIT_MEMLOCK budget, made with the first VFIO endpoint."""
        if self.budget is None:
            self.budget = MemlockBudget(self.c)
            # With CAP_IPC_LOCK type1 checks no limit (Linux >= 3.x
            # vfio_lock_acct), so there is nothing to refresh per MAP.
            self.fast = self.budget.lock_cap
            self._set_fast_generation(self.mem_generation if self.fast else -1)
        return self.budget

    def sync_memory(self) -> None:
        """Give C the current guest RAM layout (GuestMemory may grow after construction)."""
        gen = self.memory.generation
        if gen == self.mem_generation:
            return
        regions = self.memory.regions
        arr = ffi.new("struct hr_gmem_region[]", max(len(regions), 1))
        for i, r in enumerate(regions):
            arr[i].gpa, arr[i].size, arr[i].hva = r.gpa, r.size, r.hva
        if lib.hr_relay_set_memory(self.c, arr, len(regions)) < 0:
            raise ValueError(f"guest memory has more than {lib.HR_GMEM_MAX_REGIONS} regions")
        self.mem_generation = gen
        self._set_fast_generation(gen if self.fast else -1)

    def sync_memlock(self) -> None:
        """Tell C how much RLIMIT_MEMLOCK is left, as the kernel will count it.

        Free when the limit does not apply (CAP_IPC_LOCK, infinite limit, or
        no VFIO endpoint); otherwise reads VmLck so memory the VMM locked
        itself counts, as type1 counts it (Linux >= 3.x vfio_lock_acct).
        """
        limit = self.budget.limit() if self.budget is not None else None
        if limit is None:
            lib.hr_relay_set_memlock(self.c, U64_MAX, 0)
        else:
            charged = int(lib.hr_relay_charged(self.c))
            lib.hr_relay_set_memlock(self.c, limit, max(locked_bytes() - charged, 0))

    def prepare(self) -> None:
        """Before a MAP/UNMAP outside the fast path: memory and memlock current."""
        self.sync_memory()
        if self.budget is not None:
            self.sync_memlock()

    # --- the domains, mirrored (DomainMirror) ------------------------------------------

    def add(self, domain: Domain) -> None:
        """A new domain: C gets its table and bypass flag."""
        table = domain.table
        assert isinstance(table, MappingTable)  # every domain's table is made by the data plane
        if lib.hr_relay_domain_add(self.c, domain.id, table.ptr, int(domain.bypass)) < 0:
            raise MemoryError("hr_relay_domain_add")

    def update(self, domain: Domain) -> None:
        """Mirror a domain's reserved regions and containers into C."""
        pairs = [v for r in domain.resv for v in (r.start, r.end)]
        lib.hr_relay_domain_set_resv(self.c, domain.id, ffi.new("uint64_t[]", pairs or [0]), len(domain.resv))
        custom = not all(is_native(b) for b in domain.targets)
        lib.hr_relay_domain_set_custom(self.c, domain.id, int(custom))
        # Every container C can account for, even in a custom domain (where
        # C only checks and the caller fans out): the stats read them.
        counted = [c for c in (getattr(b, "c", None) for b in domain.targets) if c is not None]
        lib.hr_relay_domain_set_containers(self.c, domain.id, ffi.new("struct hr_container *[]", counted or [ffi.NULL]),
                                           len(counted))  # fmt: skip

    def remove(self, domain: Domain) -> None:
        """The domain is gone from C."""
        lib.hr_relay_domain_remove(self.c, domain.id)

    # --- what C reports ----------------------------------------------------------------

    def failure(self, res: Any, native: list[Any]) -> tuple[Any | None, Exception, str, int]:
        """A kernel failure C reported: ``(backend, exception, what, iova)``.

        ``native`` are the C-driven backends of the failed request's domain,
        in the order C was given them (``res.container`` indexes it).
        """
        what = "MAP" if res.req_type == ReqType.MAP else "UNMAP"
        b = native[res.container] if 0 <= res.container < len(native) else None
        if res.reason == lib.HR_R_MISMATCH:
            exc: Exception = DeviceFailure(
                f"kernel unmapped {int(res.got):#x} bytes of [{int(res.iova):#x}, +{int(res.size):#x}], "
                "not what the table held; every container and the table now hold none of it"
            )
        else:
            c = getattr(b, "c", None)
            op = f"IOMMU_IOAS_{what}" if c is not None and c.kind == lib.HR_CONT_IOAS else f"VFIO_IOMMU_{what}_DMA"
            exc = vfio_error(int(res.err), op, iova=int(res.iova), size=int(res.size))
        return b, exc, what, int(res.iova)

    def stats(self, domains: list[Domain], vfio: dict[int, VfioBackend]) -> dict[str, Any]:
        """Pinned-page bookkeeping per domain and in total (see :meth:`hostrelay.relay.Relay.stats`)."""
        mapped = ffi.new("uint64_t *")
        per_domain: dict[int, dict[str, int]] = {}
        for dom in domains:
            n_vfio = sum(1 for b in dom.targets if getattr(b, "c", None) is not None)
            pinned = int(lib.hr_relay_pinned(self.c, dom.id, ffi.NULL, 0, mapped))
            per_domain[dom.id] = {
                "mappings": len(dom.table),
                "containers": n_vfio,
                "pinned_bytes": pinned,
                "charged_bytes": int(mapped[0]) * n_vfio,
            }
        identity = [v for b in vfio.values() for gpa, size in b.identity_pieces() for v in (gpa, gpa + size - 1)]
        extra = ffi.new("uint64_t[]", identity or [0])
        containers = {gid: b.stats() for gid, b in vfio.items()}
        return {
            "domains": per_domain,
            "bypass": {
                "containers": sum(1 for b in vfio.values() if b.identity_mapped),
                "pinned_bytes": int(lib.hr_relay_pinned(self.c, -2, extra, len(identity) // 2, ffi.NULL)),
                "charged_bytes": sum(c["identity_bytes"] for c in containers.values()),
            },
            "total": {
                "pinned_bytes": int(lib.hr_relay_pinned(self.c, -1, extra, len(identity) // 2, ffi.NULL)),
                "charged_bytes": int(lib.hr_relay_charged(self.c)),
                "entries": sum(c["entries"] for c in containers.values()),
            },
            "containers": containers,
        }
