"""Benchmark: what a running dirty log costs a guest's MAP+UNMAP (type1).

Not a test (pytest does not collect ``bench_*.py``).  Needs VFIO with an edu
device (the testbed: ``hostrelay testbed run --edu 1 -- python tests/bench_dirty_log.py``).
4 KiB MAP + UNMAP request pairs through ``handle_request`` on one type1
container, with the log stopped and running (the C path either way; while
logging each unmap is ``VFIO_IOMMU_UNMAP_DMA`` with
``VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP``, its bits translated to GPAs in C).  Rounds alternate so drift hits all alike; figures
are the best round, the ratios the median of the per-round ratios.

Measured (``hostrelay testbed run -q --iommufd --icount --edu 2 -- python
tests/bench_dirty_log.py --repeat 3``, Linux 6.12.95): stopped 10.86 us a
pair, running 11.45 us (1.05x).  (A first version sent every MAP/UNMAP
through the Python fan-out while logging: 301.39 us, 27.75x.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from hostrelay.backends.memory import GuestMemory
from hostrelay.model.wire import TAIL_SIZE, AttachRequest, MapRequest, UnmapRequest
from hostrelay.relay import Relay

from edu_host import bind_every_edu

PAGE = 0x1000


def pairs(r: Relay, n: int) -> float:
    """Seconds per MAP+UNMAP pair over ``n`` pairs cycling through 64 pages."""
    maps = [MapRequest(1, 0x100000 + (i % 64) * PAGE, 0x100FFF + (i % 64) * PAGE, 0x200000 + (i % 64) * PAGE, 3).pack()
            for i in range(64)]  # fmt: skip
    unmaps = [UnmapRequest(1, 0x100000 + i * PAGE, 0x100FFF + i * PAGE).pack() for i in range(64)]
    hr = r.handle_request
    t = time.perf_counter()
    for i in range(n):
        if hr(maps[i % 64], TAIL_SIZE)[0] or hr(unmaps[i % 64], TAIL_SIZE)[0]:
            raise RuntimeError("a request failed")
    return (time.perf_counter() - t) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    bdfs = bind_every_edu()
    if not bdfs:
        print("no edu devices: run inside `hostrelay testbed run --edu 1`", file=sys.stderr)
        return 2
    with GuestMemory() as mem:
        mem.add_region(0, 8 << 20)
        r = Relay(mem, bypass=False)
        try:
            r.add_vfio_endpoint(1, bdfs[0])
            if r.handle_request(AttachRequest(1, 1).pack(), TAIL_SIZE)[0]:
                raise RuntimeError("ATTACH failed")
            off, on, ratios = [], [], []
            for _ in range(args.repeat):
                a = pairs(r, args.pairs)
                r.start_dirty_log()
                b = pairs(r, args.pairs)
                r.stop_dirty_log()
                off.append(a)
                on.append(b)
                ratios.append(b / a)
            print(f"MAP+UNMAP pair, log stopped: {min(off) * 1e6:.2f} us; running: {min(on) * 1e6:.2f} us "
                  f"({statistics.median(ratios):.2f}x) ({args.pairs} pairs, {args.repeat} rounds)")  # fmt: skip
        finally:
            r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
