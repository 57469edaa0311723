"""Benchmark: the iommufd backend against type1, both in one boot.

Not a test (pytest does not collect ``bench_*.py``).  Needs the iommufd
testbed kernel (it keeps the type1 container too) and four edu devices:

    hostrelay testbed run -q --iommufd --icount --edu 4 -- python tests/bench_iommufd.py

Under ``--icount`` a figure is a count of guest instructions (1 ns each) and
repeats from boot to boot.  Every ratio is to a raw C loop of the *same*
backend measured in the same boot:

- raw: 4 KiB map+unmap pairs with no relay at all.  type1: ``VFIO_IOMMU_MAP_DMA``
  + ``VFIO_IOMMU_UNMAP_DMA`` (``hr_vfio_bench_map_unmap``) on each of N
  containers of one group each, so N ioctl pairs a guest pair, which is what
  the relay's type1 fan-out issues for a domain of N groups.  iommufd:
  ``IOMMU_IOAS_MAP`` + ``IOMMU_IOAS_UNMAP`` (``hr_iommufd_bench_map_unmap``) on
  one IOAS with N devices attached, one ioctl pair whatever N;
- ring: MAP + UNMAP request pairs through the request virtqueue, in batches
  of 64 pairs a kick (``bench_vfio.RelaySetup.ring``, the same ring and the
  same driver side as ``tests/bench_vfio.py``), in a domain of N devices;
- handle_request: the same pairs one request at a time, one device;
- for the profile: the data plane's MAP/UNMAP in a C loop (no ring, no
  Python: ``hr_relay_bench_map_unmap``) and the ring driven from C
  (``hr_relay_bench_ring``), one device;
- the cost of moving a device (an ATTACH to another domain) between two
  domains that each keep another device attached and hold 1 .. 10 000
  mappings: iommufd replaces the device's page table, type1 replays the new
  domain into the device's container and removes the old one's; beside
  them the bare replace (``VFIO_DEVICE_ATTACH_IOMMUFD_PT`` from Python, no
  relay), the kernel's part of an iommufd move.

Rounds are interleaved as in ``tests/bench_vfio.py``: each of ``--repeat``
rounds runs every loop once, in turn.  A device is driven either through
its group (type1) or its cdev (iommufd), never both at once (Linux 6.12
``vfio_device_block_group``/``vfio_group_fops_open`` refuse with EBUSY), so each
round opens each loop's devices, measures and closes them again.  Each figure
is the best round; each ratio is the median of the per-round ratios.  A move
is timed ``--moves`` times each way and the best ATTACH is reported.
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from bench_vfio import BATCH, IOVA, PAGE, RW, RelaySetup  # tests/ is sys.path[0] when run as a script
from hostrelay._native import lib
from hostrelay.backends.memory import GuestMemory
from hostrelay.drivers.edu import DEVICE_ID, VENDOR_ID
from hostrelay.host.binding import bind_vfio
from hostrelay.host.sysfs import find_pci
from hostrelay.host.udev import wait_for_vfio_cdev, wait_for_vfio_node
from hostrelay.kernel import ioctl as _kernel
from hostrelay.kernel import iommufd as k
from hostrelay.kernel.errors import vfio_error
from hostrelay.kernel.vfio import Container, Group, group_of
from hostrelay.model.wire import AttachRequest, MapRequest
from hostrelay.relay import Relay

BACKENDS = ("type1", "iommufd")
DEVICES = (1, 2, 4)
MOVE_MAPPINGS = (1, 100, 1000, 10_000)
OK = bytes(4)
# Targets (the issue's): the iommufd ring with 4 devices against its own
# 1-device figure and against type1's 4-device figure, and the ring against
# the raw IOAS loop.
TARGET_FLAT = 1.05
TARGET_VS_TYPE1 = 0.45
TARGET_RING = 1.08

Loop = Callable[[], float]


@contextmanager
def raw_type1(bdfs: list[str], pairs: int) -> Iterator[Loop]:
    """``len(bdfs)`` type1 containers of one group each; a loop of ``pairs`` map+unmap pairs on each.

    One container per group, as the relay's type1 backend has them (a group
    cannot leave its container while a device fd is open: Linux >= 3.6
    ``vfio_group_unset_container`` EBUSY), so a guest pair is N ioctl pairs.
    """
    buf = mmap.mmap(-1, PAGE)
    va = _kernel.buffer_address(buf)
    containers: list[Container] = []
    try:
        for bdf in bdfs:
            c = Container()
            containers.append(c)
            c.attach(Group.for_device(bdf))

        def run() -> float:
            t = time.perf_counter()
            for c in containers:
                _kernel.bench_map_unmap(c.fd, va, IOVA, PAGE, pairs)
            return (time.perf_counter() - t) / pairs

        yield run
    finally:
        for c in containers:
            c.close()
        buf.close()


@contextmanager
def raw_iommufd(bdfs: list[str], pairs: int) -> Iterator[Loop]:
    """One IOAS with every device of ``bdfs`` attached; a loop of ``pairs`` map+unmap pairs on it.

    The kernel puts every compatible device of an IOAS on one hardware page
    table (Linux 6.12 ``iommufd_device_auto_get_domain`` reuses the IOAS's
    existing one: the notes saw one page-table id for all four edu devices),
    so a map or an unmap is one ioctl and one page-table update whatever N.
    """
    buf = mmap.mmap(-1, PAGE)
    va = _kernel.buffer_address(buf)
    fd = k.Iommufd()
    devices: list[k.IommufdDevice] = []
    try:
        ioas = fd.ioas()
        for bdf in bdfs:
            devices.append(k.IommufdDevice(bdf, fd))
            devices[-1].attach(ioas.id)

        def run() -> float:
            t = time.perf_counter()
            rc = lib.hr_iommufd_bench_map_unmap(fd.fd, ioas.id, va, IOVA, PAGE, pairs, 1)
            spent = time.perf_counter() - t
            if rc < 0:
                raise vfio_error(-rc, "bench IOMMU_IOAS_MAP/UNMAP", fd=fd.fd, iova=IOVA, size=PAGE)
            return spent / pairs

        yield run
    finally:
        for d in devices:
            d.close()
        fd.close()  # destroys the IOAS
        buf.close()


RAW = {"type1": raw_type1, "iommufd": raw_iommufd}


def one_round(bdfs: list[str], pairs: int) -> dict[str, float]:
    """Every loop once, in turn: seconds per map+unmap pair, by name."""
    batches = pairs // BATCH
    out: dict[str, float] = {}
    for backend in BACKENDS:
        for n in DEVICES:
            with RAW[backend](bdfs[:n], pairs) as raw:
                raw()  # warm up (the emulator's code cache; under --icount nothing changes)
                out[f"raw/{backend}/{n}"] = raw()
            s = RelaySetup(bdfs[:n], backend)
            try:
                s.ring(1)
                out[f"ring/{backend}/{n}"] = s.ring(batches)
                if n == 1:
                    out[f"handle/{backend}/1"] = s.one_at_a_time(pairs)
                    out[f"cloop/{backend}/1"] = s.c_loop(pairs)
                    out[f"cring/{backend}/1"] = s.c_ring(batches)
            finally:
                s.close()
    return out


def move_cost(bdfs: list[str], backend: str, mappings: int, moves: int) -> float:
    """Seconds of the best ATTACH that moves device A between two busy domains.

    Domain 1 holds device X, domain 2 device B, each with ``mappings``
    one-page mappings; A starts in domain 1 and goes to 2 and back ``moves``
    times.  Both domains keep a device, so with iommufd both IOASes keep
    their page tables and the move is one ``VFIO_DEVICE_ATTACH_IOMMUFD_PT``
    replace (Linux >= 6.9; constant cost when the target already has a
    page table, as measured in the notes); with type1, A's container loses
    domain 1's mappings (one unmap per contiguous run) and gets domain 2's
    replayed, one ``VFIO_IOMMU_MAP_DMA`` each.
    """
    memory = GuestMemory()
    memory.add_region(0, 8 << 20)
    relay = Relay(memory, bypass=False, vfio_backend=backend)
    a, x, b = 0x10, 0x18, 0x20
    try:
        for ep, bdf in zip((a, x, b), bdfs):
            relay.add_vfio_endpoint(ep, bdf)
        base = {1: 0x1000000, 2: 0x4000000}  # IOVAs: 40 MiB of pages each, under the MSI window
        for dom, ep in ((1, x), (2, b)):
            if relay.handle_request(AttachRequest(dom, ep).pack(), 4) != OK:
                raise RuntimeError(f"ATTACH of {ep:#x} to {dom} failed")
            for i in range(mappings):
                iova = base[dom] + i * PAGE
                req = MapRequest(dom, iova, iova + PAGE - 1, (i % 256) * PAGE, RW).pack()
                if relay.handle_request(req, 4) != OK:
                    raise RuntimeError(f"MAP {i} into domain {dom} failed")
        attach = {dom: AttachRequest(dom, a).pack() for dom in (1, 2)}
        if relay.handle_request(attach[1], 4) != OK:
            raise RuntimeError("ATTACH of A failed")
        best = float("inf")
        for _ in range(moves):
            for dom in (2, 1):
                t = time.perf_counter()
                rep = relay.handle_request(attach[dom], 4)
                spent = time.perf_counter() - t
                if rep != OK:
                    raise RuntimeError(f"move of A to domain {dom} failed")
                best = min(best, spent)
        if relay.mapping_count(1) != mappings or relay.mapping_count(2) != mappings:
            raise RuntimeError("a domain lost mappings")
        if backend == "iommufd":
            # One replace: A shares the page table of the domain it is in.
            pts = {ep: relay.iommufd_group(ep).pt_ids for ep in (a, x)}
            if len({pt for ids in pts.values() for pt in ids.values()}) != 1:
                raise RuntimeError(f"A is not on domain 1's page table: {pts}")
        return best
    finally:
        relay.close()
        memory.close()


def raw_replace(bdfs: list[str], mappings: int, moves: int) -> float:
    """Seconds of the best bare replace (one Python->C call each) in the layout of :func:`move_cost`.

    The kernel's part of an iommufd move: two IOASes of ``mappings`` pages
    each, one with device X and one with device B attached, and device A
    attached back and forth between them, no relay.
    """
    buf = mmap.mmap(-1, 256 * PAGE)
    va = _kernel.buffer_address(buf)
    fd = k.Iommufd()
    devices: list[k.IommufdDevice] = []
    try:
        ioas = {1: fd.ioas(), 2: fd.ioas()}
        for dom, base in ((1, 0x1000000), (2, 0x4000000)):
            for i in range(mappings):
                ioas[dom].map(base + i * PAGE, PAGE, va + (i % 256) * PAGE)
        a, x, b = (k.IommufdDevice(bdf, fd) for bdf in bdfs[:3])
        devices += [a, x, b]
        x.attach(ioas[1].id)
        b.attach(ioas[2].id)
        a.attach(ioas[1].id)
        best = float("inf")
        for _ in range(moves):
            for dom in (2, 1):
                t = time.perf_counter()
                a.attach(ioas[dom].id)
                best = min(best, time.perf_counter() - t)
        return best
    finally:
        for d in devices:
            d.close()
        fd.close()
        buf.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=1024, help="map+unmap pairs per measurement (a multiple of 64)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--moves", type=int, default=5, help="moves each way per mapping count")
    ap.add_argument("--mappings", type=int, nargs="+", default=list(MOVE_MAPPINGS),
                    help="mapping counts of the move benchmark")  # fmt: skip
    args = ap.parse_args()
    if not k.AVAILABLE:
        print("this build of hostrelay has no iommufd (run python3 cext/uapi.py, then rebuild)", file=sys.stderr)
        return 2
    bdfs = find_pci(VENDOR_ID, DEVICE_ID)
    if len(bdfs) < max(DEVICES):
        print(f"needs {max(DEVICES)} edu devices, found {len(bdfs)}: run inside "
              "`hostrelay testbed run --iommufd --edu 4`", file=sys.stderr)  # fmt: skip
        return 2
    for bdf in bdfs:
        bind_vfio(bdf)
        wait_for_vfio_node(group_of(bdf))
        wait_for_vfio_cdev(k.cdev_of(bdf))
    pairs = max(args.pairs // BATCH, 1) * BATCH  # whole kicks of the ring

    rounds = [one_round(bdfs, pairs) for _ in range(args.repeat)]
    cost = {name: min(r[name] for r in rounds) for name in rounds[0]}

    def ratio(num: str, den: str) -> float:
        return statistics.median(r[num] / r[den] for r in rounds)

    def us(name: str) -> str:
        return f"{cost[name] * 1e6:8.2f} us"

    print(f"4 KiB MAP+UNMAP pairs, {pairs} pairs, {args.repeat} interleaved rounds; ratios to the same backend's raw loop")
    for backend in BACKENDS:
        what = "N containers, N ioctl pairs" if backend == "type1" else "one IOAS, N devices attached"
        print(f"{backend} ({what})")
        for n in DEVICES:
            print(f"  {f'raw {n} device' + ('s' if n > 1 else ''):<20}{us(f'raw/{backend}/{n}')}/pair"
                  f"  ({ratio(f'raw/{backend}/{n}', f'raw/{backend}/1'):.2f}x raw 1 device)")  # fmt: skip
        for n in DEVICES:
            r, raw = f"ring/{backend}/{n}", f"raw/{backend}/{n}"
            more = f", {ratio(r, f'raw/{backend}/1'):.2f}x raw 1, {ratio(r, f'ring/{backend}/1'):.2f}x ring 1" if n > 1 else ""
            print(f"  {f'ring {n} device' + ('s' if n > 1 else ''):<20}{us(r)}/pair  ({ratio(r, raw):.2f}x raw {n}{more})")
        for name, label in (("handle", "handle_request"), ("cloop", "data plane C loop"), ("cring", "ring driven from C")):
            key = f"{name}/{backend}/1"
            print(f"  {label:<20}{us(key)}/pair  ({ratio(key, f'raw/{backend}/1'):.2f}x raw 1, 1 device)")
    print("targets")
    checks = [
        ("iommufd ring 4 devices / iommufd ring 1 device", ratio("ring/iommufd/4", "ring/iommufd/1"), TARGET_FLAT),
        ("iommufd ring 4 devices / type1 ring 4 devices", ratio("ring/iommufd/4", "ring/type1/4"), TARGET_VS_TYPE1),
        ("iommufd ring 1 device / iommufd raw 1 device", ratio("ring/iommufd/1", "raw/iommufd/1"), TARGET_RING),
        ("iommufd ring 4 devices / iommufd raw 4 devices", ratio("ring/iommufd/4", "raw/iommufd/4"), TARGET_RING),
    ]
    for label, value, target in checks:
        verdict = "met" if value <= target else f"MISSED by {value / target - 1:+.1%}"
        print(f"  {label:<48}{value:6.3f}x  (target <= {target:.2f}x: {verdict})")

    print(f"move: ATTACH of a device to the other of two busy domains, best of {2 * args.moves}")
    moved = {(backend, n): move_cost(bdfs, backend, n, args.moves) for n in args.mappings for backend in BACKENDS}
    bare = {n: raw_replace(bdfs, n, args.moves) for n in args.mappings}
    for n in args.mappings:
        t1, fd = moved["type1", n], moved["iommufd", n]
        print(f"  {n:>6} mappings  type1 {t1 * 1e6:10.2f} us  iommufd {fd * 1e6:8.2f} us  (type1 {t1 / fd:.1f}x iommufd)"
              f"  bare replace {bare[n] * 1e6:6.2f} us  (iommufd {fd / bare[n]:.1f}x bare)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
