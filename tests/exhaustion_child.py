"""A guest that maps until NOMEM, as its own process (run by tests/test_exhaustion.py).

``python tests/exhaustion_child.py LIMIT BDF BDF BDF`` builds a relay with
three VFIO endpoints (A and B in domain 1, C in domain 2) and emulated ones
(E1 in domain 3, E2 in domain 4), drives domain 1 (or domain 3 for LIMIT
``table``) into the limit, keeps asking, and prints one JSON object of what
it saw.  A process of its own because two limits are process-wide and must be
set before the relay is built: RLIMIT_MEMLOCK without CAP_IPC_LOCK, and
RLIMIT_DATA for the table's own memory; and because its peak RSS is then its
own.

LIMIT is one of ``entries`` (vfio_iommu_type1.dma_entry_limit, from the
testbed's kernel arguments), ``max_mappings`` (the relay's per-domain
option), ``memlock`` or ``table``.
"""

from __future__ import annotations

import ctypes
import json
import resource
import sys
import time
from typing import Any

from hostrelay import GuestMemory, Relay
from hostrelay.model.wire import TAIL_SIZE, AttachRequest, MapRequest, Status, UnmapRequest
from hostrelay.backends.type1 import has_cap_ipc_lock, locked_bytes

PAGE = 0x1000
MIB = 1 << 20
RW = 3
A, B, C, E1, E2 = 0x10, 0x18, 0x20, 0x30, 0x38
FLOOD = {"entries": 20000, "max_mappings": 20000, "memlock": 5000, "table": 20000}
MAX_MAPPINGS = 16
# Pages of RLIMIT_MEMLOCK over what the process has locked already: one for
# the bystander's mapping, then 32 two-container MAPs of domain 1 use up the
# rest exactly, so the bystander's next MAP finds no room either.
MEMLOCK_PAGES = 65
TABLE_HEADROOM = 4 * MIB  # RLIMIT_DATA over what the process uses already


def status_kib(name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> int:
    """Start VmHWM again from the current RSS (Linux >= 4.0: clear_refs "5"); returns that RSS in KiB."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    return status_kib("VmRSS")


class DataLimit:
    """RLIMIT_DATA at ``headroom`` bytes over the data the process has now.

    Since Linux 4.7 it counts private writable mappings, so it bounds
    malloc (brk and mmap alike) and Python's arenas, not the MAP_SHARED
    memfd guest RAM.  ``lifted()`` lets this process's own bookkeeping
    (opening /proc files) allocate while the relay's table is at the limit;
    nothing is freed meanwhile, so the same limit is just as full after.
    """

    def __init__(self, headroom: int) -> None:
        self.soft = status_kib("VmData") * 1024 + headroom
        self.hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
        resource.setrlimit(resource.RLIMIT_DATA, (self.soft, self.hard))

    def lift(self) -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (self.hard, self.hard))

    def impose(self) -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (self.soft, self.hard))


def drop_cap_ipc_lock() -> None:
    """Root keeps every other capability, so /dev/vfio stays usable."""

    class Hdr(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    hdr, data = Hdr(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[0].effective &= ~(1 << 14)
    data[0].permitted &= ~(1 << 14)
    if libc.capset(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    assert not has_cap_ipc_lock()


def main(limit: str, bdfs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"limit": limit}
    if limit == "memlock":
        drop_cap_ipc_lock()
        cap = locked_bytes() + MEMLOCK_PAGES * PAGE
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (cap, cap))
    with GuestMemory() as mem:
        mem.add_region(0, 4 * MIB)
        mem.add_region(4 * MIB, 4 * MIB)
        r = Relay(mem, bypass=False, max_mappings=MAX_MAPPINGS if limit == "max_mappings" else None)
        for ep, bdf in zip((A, B, C), bdfs):
            r.add_vfio_endpoint(ep, bdf)
        r.add_endpoint(E1)
        r.add_endpoint(E2)
        h = r.handle_request

        def send(req: Any) -> Status:
            return Status(h(req.pack(), TAIL_SIZE)[0])

        for dom, ep in ((1, A), (1, B), (2, C), (3, E1), (4, E2)):
            assert send(AttachRequest(dom, ep)) == Status.OK
        # The bystanders hold a mapping each before the limit is reached.
        assert send(MapRequest(2, 0x10000000, 0x10000FFF, 0x300000, RW)) == Status.OK
        assert send(MapRequest(4, 0x10000000, 0x10000FFF, 0x300000, RW)) == Status.OK
        target = 3 if limit == "table" else 1
        rss0 = reset_peak_rss()
        data = DataLimit(TABLE_HEADROOM) if limit == "table" else None
        # Map one page after another until the relay says NOMEM.  The IOVAs
        # climb; the GPAs cycle over guest RAM (aliases are charged again,
        # which is what the memlock limit counts).
        statuses: dict[str, int] = {}

        def fill(n: int) -> tuple[int, Status]:
            """Map at page n, n + 1, ... until a refusal; (next page, its status)."""
            while n <= 4_000_000:  # past that there is no limit: the status assertion says so
                st = send(MapRequest(target, n * PAGE, n * PAGE + PAGE - 1, (n % 1024) * PAGE, RW))
                if st != Status.OK:
                    return n, st
                n += 1
            return n, Status.OK

        started = time.monotonic()
        n, st = fill(0)
        statuses[st.name] = 1
        out["map_seconds"] = round(time.monotonic() - started, 2)
        events_at_limit = len(r.pop_events())
        if limit == "memlock":
            out["vmlck_pages"] = locked_bytes() // PAGE
            out["cap_pages"] = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] // PAGE
        if data is not None:
            data.lift()
        peak0 = status_kib("VmHWM") - rss0
        rss1 = reset_peak_rss()
        if data is not None:
            data.impose()
            # What reading /proc freed meanwhile is the table's to take
            # again: fill it up before the refusals are counted.
            n, st = fill(n)
        out["mapped"] = n
        # Keep asking, at new IOVAs: every answer must be NOMEM, at no memory cost.
        for i in range(FLOOD[limit]):
            k = n + 1 + i
            st = send(MapRequest(target, k * PAGE, k * PAGE + PAGE - 1, 0, RW))
            statuses[st.name] = statuses.get(st.name, 0) + 1
        out["flood"] = FLOOD[limit]
        out["statuses"] = statuses
        out["events"] = events_at_limit + len(r.pop_events())
        # The other domains, meanwhile.
        out["emulated_map"] = send(MapRequest(4, 0x20000000, 0x20000FFF, 0x301000, RW)).name
        out["emulated_unmap"] = send(UnmapRequest(4, 0x20000000, 0x20000FFF)).name
        out["vfio_map"] = send(MapRequest(2, 0x20000000, 0x20000FFF, 0x301000, RW)).name
        if out["vfio_map"] == Status.NOMEM.name:
            # memlock is one counter per process (type1 charges the mm, Linux
            # 6.12 vfio_lock_acct): room comes from an UNMAP in domain 1.
            last = (n - 1) * PAGE
            out["unmap_to_make_room"] = send(UnmapRequest(target, last, last + PAGE - 1)).name
            n -= 1
            out["vfio_map_after_room"] = send(MapRequest(2, 0x20000000, 0x20000FFF, 0x301000, RW)).name
        out["vfio_unmap"] = send(UnmapRequest(2, 0x20000000, 0x20000FFF)).name
        if data is not None:
            data.lift()
        # Peak RSS over the refusals and the bystanders' requests (VmHWM
        # since the reset), and over mapping up to the limit before that.
        out["flood_peak_kib"] = status_kib("VmHWM") - rss1
        out["map_peak_kib"] = peak0
        # The relay's tables against the kernel, at the limit: vfio_dma
        # entries per container (DMA_AVAIL, Linux >= 5.10) and, for
        # memlock, the pages the process has locked.
        out["at_limit"] = {
            hex(ep): {"kernel_entries": b.entry_limit - (b.container.iommu_info().dma_avail or 0),
                      "table_entries": r.mapping_count(2 if ep == C else 1)}  # fmt: skip
            for ep, b in ((ep, r.vfio_backend(ep)) for ep in (A, B, C))
        }
        # Recovery: the domain at its limit maps again after an UNMAP.
        last = (n - 1) * PAGE
        out["unmap_one"] = send(UnmapRequest(target, last, last + PAGE - 1)).name
        out["map_again"] = send(MapRequest(target, last, last + PAGE - 1, 0, RW)).name
        out["unmap_everything"] = send(UnmapRequest(target, 0, (1 << 40) - 1)).name
        out["left"] = r.mapping_count(target)
        # And what each container holds at the end, by unmap-all.
        out["unmap_all"] = {hex(ep): [r.vfio_backend(ep).unmap_all(), r.mapping_count(2 if ep == C else 1) * PAGE]
                            for ep in (A, B, C)}  # fmt: skip
        r.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2:])))
