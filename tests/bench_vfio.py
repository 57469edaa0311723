"""Benchmark: guest MAP/UNMAP relayed to VFIO, against the raw kernel cost.

Not a test (pytest does not collect ``bench_*.py``).  Needs VFIO with edu
devices (the testbed: ``hostrelay testbed run --edu 4 -- python tests/bench_vfio.py``).
All figures come from one boot, so the ratios compare like with like:

- raw: a C loop of ``VFIO_IOMMU_MAP_DMA`` + ``VFIO_IOMMU_UNMAP_DMA`` of 4 KiB on
  a container of the same IOMMU (``hr_vfio_bench_map_unmap``), the floor;
- ring: 4 KiB MAP + UNMAP request pairs through the request virtqueue, in
  batches of 64 pairs, one ``process_queue`` call per batch (target <= 1.10x raw);
- handle_request: the same pairs one request at a time (target <= 2.5x raw);
- for context, the same two ioctls issued by one Python->C call each (what any
  per-request Python front end pays at least, before doing any work), the
  data plane's own MAP/UNMAP code in a C loop (no ring, no Python), and the
  ring with the driver's side in C too (``hr_relay_bench_ring``: the walker
  without Python between batches);
- the ring floor: the same ring and the same Python between kicks, but each
  request goes straight to the ioctl (``hr_relay_bench_floor``), so the ring's
  ratio minus the floor's is what the relay's own work costs;
- the ring in batches of 8 pairs as well, which splits the ring's cost into a
  part per pair and a part per kick (Python between kicks, under TCG);
- a MAP+UNMAP pair through the ring in a domain with 1, 2 and 4 VFIO groups.

The measurements are interleaved: each of ``--repeat`` rounds runs every
loop once, in turn, so slow drift of the emulated machine hits all of them
alike.  Each figure is the best round; each ratio is the median of the
per-round ratios.
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import sys
import time
from collections.abc import Callable

from hostrelay._native import ffi, lib
from hostrelay.backends.memory import GuestMemory
from hostrelay.kernel import ioctl as _kernel
from hostrelay.relay import Relay
from hostrelay.drivers.edu import DEVICE_ID, VENDOR_ID
from hostrelay.model.wire import AttachRequest, MapFlag, MapRequest, UnmapRequest
from hostrelay.host.sysfs import find_pci
from hostrelay.host.binding import bind_vfio
from hostrelay.host.udev import wait_for_vfio_node
from hostrelay.kernel.vfio import Container, Group, group_of
from hostrelay.drivers.virtqueue import DriverQueue

PAGE = 0x1000
BATCH = 64
SMALL = 8  # a second batch size, to split the ring's cost into per pair and per kick
RW = int(MapFlag.READ | MapFlag.WRITE)
IOVA = 0x100000
RING_GPA = 0x1000000


def best(fn: Callable[[], float], repeat: int) -> float:
    return min(fn() for _ in range(repeat))


def raw_pairs(bdf: str, pairs: int) -> Callable[[], float]:
    buf = mmap.mmap(-1, PAGE)
    va = _kernel.buffer_address(buf)
    container = Container()
    container.attach(Group.for_device(bdf))

    def run() -> float:
        t = time.perf_counter()
        _kernel.bench_map_unmap(container.fd, va, IOVA, PAGE, pairs)
        return (time.perf_counter() - t) / pairs

    run.container = container  # type: ignore[attr-defined]  # keep alive
    run.buf = buf  # type: ignore[attr-defined]
    return run


class RelaySetup:
    """A relay with one VFIO endpoint per function of ``bdfs`` attached to one domain and a request queue.

    ``backend`` is the relay's ``vfio_backend`` (tests/bench_iommufd.py runs both).
    """

    def __init__(self, bdfs: list[str], backend: str = "type1") -> None:
        self.memory = GuestMemory()
        self.memory.add_region(0, 64 << 20)
        self.relay = Relay(self.memory, bypass=False, vfio_backend=backend)
        for i, bdf in enumerate(bdfs):
            self.relay.add_vfio_endpoint(0x10 + i, bdf)
        for i in range(len(bdfs)):
            assert self.relay.handle_request(AttachRequest(1, 0x10 + i).pack(), 4) == bytes(4)
        self.q = DriverQueue(self.memory, RING_GPA, 4 * BATCH, data_size=4 << 20)
        self.relay.set_queue(0, size=self.q.size, desc=self.q.desc, avail=self.q.avail, used=self.q.used_ring)
        self.heads: list[int] = []
        self.tails: list[int] = []
        for i in range(BATCH):  # the same 128 chains every batch: only the avail ring is rewritten
            iova, gpa = IOVA + i * PAGE, i * PAGE
            for raw in (MapRequest(1, iova, iova + PAGE - 1, gpa, RW).pack(), UnmapRequest(1, iova, iova + PAGE - 1).pack()):
                h, (t,) = self.q.add([raw], [4], publish=False)
                self.heads.append(h)
                self.tails.append(t)
        self.requests = [(MapRequest(1, IOVA, IOVA + PAGE - 1, 0, RW).pack(), UnmapRequest(1, IOVA, IOVA + PAGE - 1).pack())]
        self.entries = self.q.pack_heads(*self.heads)

    def ring(self, batches: int, per_kick: int = BATCH) -> float:
        """MAP+UNMAP pairs through ``process_queue``, ``per_kick`` pairs a kick."""
        return self._kicks(batches, per_kick, self.relay.process_queue, 0)

    def _kicks(self, batches: int, per_kick: int, serve: Callable[..., int], *args: object) -> float:
        # The driver side does as little as a guest driver would between
        # kicks: under TCG it shares the one vCPU with the device, and every
        # bit of Python it runs cools the emulator's caches for the device
        # (measured: packing the 128 heads at each kick instead of once
        # cost the ring 0.01-0.025x).  So: post the same packed chains, kick
        # (serve(*args), the only timed part), count completions; the
        # replies are checked once at the end.
        entries = self.entries[: 4 * per_kick]  # 2 chains of 2 bytes per pair
        spent = 0.0
        for _ in range(batches):
            self.q.publish_packed(entries)
            t = time.perf_counter()
            done = serve(*args)
            spent += time.perf_counter() - t
            assert done == 2 * per_kick and self.q.consume() == 2 * per_kick, done
        assert all(self.memory.read(t, 4) == bytes(4) for t in self.tails), "a request failed"
        assert self.relay.mapping_count(1) == 0
        return spent / (batches * per_kick)

    def one_at_a_time(self, pairs: int) -> float:
        m, u = self.requests[0]
        handle = self.relay.handle_request
        ok = bytes(4)
        t = time.perf_counter()
        for _ in range(pairs):
            if handle(m, 4) != ok or handle(u, 4) != ok:
                raise RuntimeError("request failed")
        return (time.perf_counter() - t) / pairs

    def bare_ioctls(self, pairs: int) -> float:
        """One Python->C call per ioctl, no relay logic: the floor of per-request Python."""
        c = self.relay.vfio_backend(0x10).container
        va = self.memory.regions[0].hva
        out = ffi.new("uint64_t *")
        map_dma, unmap_dma, fd = lib.hr_vfio_map_dma, lib.hr_vfio_unmap_dma, c.fd
        t = time.perf_counter()
        for _ in range(pairs):
            if map_dma(fd, 3, va, IOVA, PAGE) < 0 or unmap_dma(fd, 0, IOVA, PAGE, out) < 0:
                raise RuntimeError("ioctl failed")
        return (time.perf_counter() - t) / pairs

    def c_ring(self, batches: int) -> float:
        """The ring with the driver side in C as well: no Python between batches."""
        q = self.relay._queues.queues[0]
        heads = ffi.new("uint16_t[]", self.heads)
        self.relay._dp.sync_memory()
        t = time.perf_counter()
        rc = lib.hr_relay_bench_ring(self.relay._dp.c, q.c, heads, len(self.heads), batches)
        spent = time.perf_counter() - t
        if rc:
            raise RuntimeError("C-driven ring: a request failed")
        self.q.avail_idx = (self.q.avail_idx + len(self.heads) * batches) & 0xFFFF
        assert self.q.consume() == len(self.heads) * batches
        return spent / (batches * BATCH)

    def floor(self, batches: int) -> float:
        """The ring as in :meth:`ring`, walked by ``hr_relay_bench_floor``: the
        same Python between kicks and the same ring walk, but each request goes
        straight to the container's ioctl with none of the relay's work."""
        fd = self.relay.vfio_backend(0x10).container.fd
        self.relay._dp.sync_memory()
        return self._kicks(batches, BATCH, lib.hr_relay_bench_floor, self.relay._dp.c, self.relay._queues.queues[0].c, fd)

    def c_loop(self, pairs: int) -> float:
        """hr_relay_map/hr_relay_unmap in a C loop: the data plane without the ring."""
        self.relay._dp.sync_memory()
        t = time.perf_counter()
        rc = lib.hr_relay_bench_map_unmap(self.relay._dp.c, 1, IOVA, 0, PAGE, pairs, BATCH)
        spent = time.perf_counter() - t
        if rc:
            raise RuntimeError(f"relay C loop failed with status {-rc}")
        return spent / pairs

    def close(self) -> None:
        self.relay.close()
        self.memory.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2048, help="MAP+UNMAP pairs per measurement")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    bdfs = find_pci(VENDOR_ID, DEVICE_ID)
    if not bdfs:
        print("no edu devices: run inside `hostrelay testbed run --edu 4`", file=sys.stderr)
        return 2
    for bdf in bdfs:
        bind_vfio(bdf)
        wait_for_vfio_node(group_of(bdf))
    batches = max(args.pairs // BATCH, 1)
    pairs = batches * BATCH

    raw = raw_pairs(bdfs[0], pairs)
    raw()  # warm up
    setup = RelaySetup(bdfs[1:2] or bdfs[:1])
    setup.ring(1)
    loops: dict[str, Callable[[], float]] = {
        "raw": raw,
        "ring": lambda: setup.ring(batches),
        "ring8": lambda: setup.ring(pairs // SMALL, SMALL),
        "handle": lambda: setup.one_at_a_time(pairs),
        "bare": lambda: setup.bare_ioctls(pairs),
        "cloop": lambda: setup.c_loop(pairs),
        "cring": lambda: setup.c_ring(batches),
        "floor": lambda: setup.floor(batches),
    }
    rounds = [{name: fn() for name, fn in loops.items()} for _ in range(args.repeat)]
    raw.container.close()  # type: ignore[attr-defined]
    setup.close()
    cost = {name: min(r[name] for r in rounds) for name in loops}
    ratio = {name: statistics.median(r[name] / r["raw"] for r in rounds) for name in loops}

    def line(label: str, name: str, note: str) -> None:
        print(f"  {label:<24}{cost[name] * 1e6:8.2f} us/pair  ({ratio[name]:.2f}x raw{note})")

    print(f"4 KiB MAP+UNMAP pairs, {pairs} pairs, {args.repeat} interleaved rounds")
    print(f"  {'raw C ioctl loop':<24}{cost['raw'] * 1e6:8.2f} us/pair  (1.00x)")
    line(f"ring, batches of {BATCH}", "ring", ", target <= 1.10x")
    line("handle_request 1 by 1", "handle", ", target <= 2.5x")
    line("2 bare ioctl calls", "bare", ": one Python->C call per ioctl")
    line("data plane in C loop", "cloop", ": hr_relay_map/unmap, no ring")
    line("ring driven from C", "cring", ": the same ring, no Python between batches")
    line("ring floor", "floor", ": the same ring, ioctls only, none of the relay's work")
    line(f"ring, batches of {SMALL}", "ring8", "")
    # cost(k pairs per kick) = per_pair + per_kick / k, from the two batch sizes
    # (ratios, so in raw pairs): what a kick costs beyond its requests.
    per_kick = (ratio["ring8"] - ratio["ring"]) / (1 / SMALL - 1 / BATCH)
    print(f"  split of the ring's cost: {ratio['ring'] - per_kick / BATCH:.3f}x raw per pair"
          f" + {per_kick:.2f} raw pairs per kick")
    print(f"  the relay's own work (checks, table, accounting, lock) in the ring: {ratio['ring'] - ratio['floor']:+.3f}x raw")
    raw_cost = cost["raw"]
    print("MAP+UNMAP pair through the ring by VFIO groups in the domain")
    base = None
    for n in (1, 2, 4):
        if n > len(bdfs):
            print(f"  {n} groups: skipped (only {len(bdfs)} edu devices)")
            continue
        s = RelaySetup(bdfs[:n])
        s.ring(1)
        per_pair = best(lambda: s.ring(batches), args.repeat)
        s.close()
        base = base or per_pair
        print(f"  {n} group{'s' if n > 1 else ' '}  {per_pair * 1e6:8.2f} us/pair  ({per_pair / base:.2f}x one group, {per_pair / raw_cost:.2f}x raw)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
