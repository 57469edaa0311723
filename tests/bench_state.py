"""Benchmark: save_state / restore_state of 1 000 and 100 000 mappings, against the MAPs that made them.

Not a test (pytest does not collect ``bench_*.py``).  Needs VFIO with two
edu functions:
``hostrelay testbed run -q --icount --edu 2 -- python tests/bench_state.py``
(``--iommufd`` adds the iommufd backend).  Under ``--icount`` the figures
are guest-instruction time and repeat from boot to boot.

For each size and backend one relay gets the mappings as a guest makes them
(one ``handle_request`` MAP each, the baseline, measured in the same run),
split over two domains with one edu function each (type1 keeps at most
65 535 mappings a container, ``dma_entry_limit``); then ``save_state``, a
teardown, and ``restore_state`` into a new relay over the same functions
and guest memory.  Printed: the state's size, save and restore time, and
restore / baseline (what a restore costs against the guest making the same
mappings again).  An emulated-only relay (no kernel) gives the codec and
table share.  Each figure is the best of ``--repeat`` rounds.

Measured (``hostrelay testbed run -q --iommufd --icount --edu 2 -- python
tests/bench_state.py``, Linux 6.12.95, guest-instruction time):

=========  ========  =========  ========  =========  ==============
backend    mappings  state      save      restore    restore / MAPs
=========  ========  =========  ========  =========  ==============
emulated      1 000     32 826   1.90 ms    2.74 ms           1.10x
emulated    100 000  3 200 836    156 ms     188 ms           0.74x
type1         1 000     32 826   1.87 ms    7.69 ms           1.02x
type1       100 000  3 200 836    155 ms     716 ms           0.92x
iommufd       1 000     32 840   1.86 ms   10.28 ms           1.05x
iommufd     100 000  3 200 850    155 ms     935 ms           0.94x
=========  ========  =========  ========  =========  ==============

A restore costs what the guest's own MAPs cost (the same C checks and
ioctls, without a request to decode each time); a save is ~1.6 us a mapping
(export in C, the SHA-256 of 3.2 MB).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from hostrelay import GuestMemory, Relay
from hostrelay.model.wire import TAIL_SIZE, AttachRequest, MapFlag, MapRequest, Status

from edu_host import bind_every_edu

PAGE = 0x1000
MIB = 1 << 20
RW = int(MapFlag.READ | MapFlag.WRITE)
EPS = (0x18, 0x20)


def make(memory: GuestMemory, backend: str, bdfs: list[str]) -> Relay:
    r = Relay(memory, bypass=False, vfio_backend=backend if backend != "emulated" else "type1")
    for ep, bdf in zip(EPS, bdfs):
        if backend == "emulated":
            r.add_endpoint(ep)
        else:
            r.add_vfio_endpoint(ep, bdf)
    return r


def one_round(memory: GuestMemory, backend: str, bdfs: list[str], n: int) -> tuple[float, float, float, int]:
    r = make(memory, backend, bdfs)
    for dom, ep in zip((1, 2), EPS):
        assert r.handle_request(AttachRequest(dom, ep).pack(), TAIL_SIZE)[0] == Status.OK
    reqs = [MapRequest(1 + i % 2, 0x100000 + i * PAGE, 0x100000 + i * PAGE + PAGE - 1, (i * PAGE) % (8 * MIB), RW).pack()
            for i in range(n)]  # fmt: skip
    handle = r.handle_request
    t = time.perf_counter()
    for raw in reqs:
        if handle(raw, TAIL_SIZE)[0] != Status.OK:
            raise SystemExit(f"{backend}: MAP refused")
    baseline = time.perf_counter() - t
    t = time.perf_counter()
    blob = r.save_state()
    save = time.perf_counter() - t
    r.close()
    r2 = make(memory, backend, bdfs)
    t = time.perf_counter()
    r2.restore_state(blob)
    restore = time.perf_counter() - t
    if r2.mapping_count(1) + r2.mapping_count(2) != n:
        raise SystemExit(f"{backend}: restored {r2.mapping_count(1) + r2.mapping_count(2)} of {n} mappings")
    r2.close()
    return baseline, save, restore, len(blob)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,100000")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    bdfs = bind_every_edu()
    backends = ["emulated"]
    if len(bdfs) >= 2:
        backends.append("type1")
        if os.path.exists("/dev/iommu"):
            backends.append("iommufd")
    print(f"{'backend':9} {'mappings':>9} {'state':>10} {'save':>10} {'restore':>10} {'MAPs':>10} "
          f"{'us/mapping save':>16} {'restore':>8} {'restore/MAPs':>13}")  # fmt: skip
    with GuestMemory() as memory:
        memory.add_region(0, 8 * MIB)
        for backend in backends:
            for n in (int(x) for x in args.sizes.split(",")):
                rounds = [one_round(memory, backend, bdfs, n) for _ in range(args.repeat)]
                base = min(x[0] for x in rounds)
                save = min(x[1] for x in rounds)
                restore = min(x[2] for x in rounds)
                size = rounds[0][3]
                print(f"{backend:9} {n:9d} {size:10d} {save * 1e3:8.2f}ms {restore * 1e3:8.2f}ms {base * 1e3:8.2f}ms "
                      f"{save / n * 1e6:16.2f} {restore / n * 1e6:8.2f} {restore / base:12.2f}x")  # fmt: skip
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
