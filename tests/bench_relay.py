"""Benchmark: MAP+UNMAP request pairs through ``Relay.handle_request``.

Not a test (pytest does not collect ``bench_*.py``).  Run::

    python tests/bench_relay.py [--pairs N] [--repeat R]

It prints, for an emulated endpoint (no VFIO, no kernel calls):

- MAP+UNMAP request pairs per second through ``handle_request`` with 16 live
  mappings in the domain, and with 64 Ki live mappings;
- the per-operation cost at 64 Ki live mappings relative to 16 (target
  <= 1.3x), both measured in this same run;
- for reference, the same pair done directly on the C table (no request
  parsing), which shows how much of the cost is the table itself.

The timed MAP/UNMAP pairs use IOVAs interleaved with the live mappings
(live ones on even 4 KiB pages, timed ones on odd pages spread over the whole
live range), so every operation descends the full depth of the tree.
Each figure is the best of ``--repeat`` runs, the usual way to filter out
noise from other load on the machine.
"""

from __future__ import annotations

import argparse
import time

from hostrelay import GuestMemory, Relay
from hostrelay._native import lib
from hostrelay.dataplane.table import MappingTable
from hostrelay.model.wire import AttachRequest, MapRequest, UnmapRequest

PAGE = 0x1000
SMALL = 16
LARGE = 64 * 1024
RAM = 64 << 20
TAIL_OK = bytes(4)


def build(live: int) -> tuple[Relay, list[tuple[bytes, bytes]]]:
    memory = GuestMemory()
    memory.add_region(0, RAM)  # sparse memfd: untouched pages cost nothing
    relay = Relay(memory, msi_window=None)
    relay.add_endpoint(0)
    assert relay.handle_request(AttachRequest(1, 0).pack(), 4) == TAIL_OK
    for i in range(live):
        req = MapRequest(1, 2 * i * PAGE, 2 * i * PAGE + PAGE - 1, (i * PAGE) % RAM, 3)
        assert relay.handle_request(req.pack(), 4) == TAIL_OK
    assert relay.mapping_count(1) == live
    # Odd pages spread evenly across the live range; pre-encoded like the
    # bytes a VMM hands over from the virtqueue.
    slots = min(live, 1024)
    pairs = []
    for k in range(slots):
        page = 2 * ((k * live) // slots) + 1
        iova = page * PAGE
        pairs.append(
            (
                MapRequest(1, iova, iova + PAGE - 1, (k * PAGE) % RAM, 3).pack(),
                UnmapRequest(1, iova, iova + PAGE - 1).pack(),
            )
        )
    return relay, pairs


def time_requests(relay: Relay, pairs: list[tuple[bytes, bytes]], n: int) -> float:
    """Seconds per MAP+UNMAP pair."""
    handle = relay.handle_request
    count = len(pairs)
    t0 = time.perf_counter()
    for i in range(n):
        m, u = pairs[i % count]
        handle(m, 4)
        handle(u, 4)
    elapsed = time.perf_counter() - t0
    # Sanity: every timed pair succeeded and left the table as it was.
    m, u = pairs[0]
    assert handle(m, 4) == TAIL_OK and handle(u, 4) == TAIL_OK
    return elapsed / n


def time_table(live: int, n: int) -> float:
    """Seconds per insert+remove pair on the bare C table."""
    t = MappingTable()
    ptr = t.ptr
    for i in range(live):
        lib.hr_table_insert(ptr, 2 * i * PAGE, 2 * i * PAGE + PAGE - 1, 0, 3)
    slots = min(live, 1024)
    iovas = [(2 * ((k * live) // slots) + 1) * PAGE for k in range(slots)]
    insert, remove = lib.hr_table_insert, lib.hr_table_remove_range
    t0 = time.perf_counter()
    for i in range(n):
        a = iovas[i % slots]
        insert(ptr, a, a + PAGE - 1, 0, 3)
        remove(ptr, a, a + PAGE - 1)
    elapsed = time.perf_counter() - t0
    assert len(t) == live
    return elapsed / n


def best(f: object, repeat: int, *args: object) -> float:
    assert callable(f)
    return min(f(*args) for _ in range(repeat))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--pairs", type=int, default=100_000, help="timed MAP+UNMAP pairs per run")
    ap.add_argument("--repeat", type=int, default=5, help="runs per figure (best is kept)")
    args = ap.parse_args()

    small_relay, small_pairs = build(SMALL)
    large_relay, large_pairs = build(LARGE)
    # Alternate the two sizes so drifting machine load hits both alike.
    small_t, large_t = [], []
    for _ in range(args.repeat):
        small_t.append(time_requests(small_relay, small_pairs, args.pairs))
        large_t.append(time_requests(large_relay, large_pairs, args.pairs))
    s, l_ = min(small_t), min(large_t)
    ts = best(time_table, args.repeat, SMALL, args.pairs)
    tl = best(time_table, args.repeat, LARGE, args.pairs)

    print(f"handle_request MAP+UNMAP, emulated endpoint, {args.pairs} pairs x best of {args.repeat}")
    print(f"  {SMALL:>6} live mappings: {1 / s:12,.0f} pairs/s  ({s * 1e6 / 2:6.2f} us per request)")
    print(f"  {LARGE:>6} live mappings: {1 / l_:12,.0f} pairs/s  ({l_ * 1e6 / 2:6.2f} us per request)")
    verdict = "OK" if l_ / s <= 1.3 else "ABOVE TARGET"
    print(f"  cost at {LARGE} / cost at {SMALL}: {l_ / s:.3f}x  (target <= 1.3x: {verdict})")
    print("bare C table insert+remove (via cffi, no request parsing)")
    print(f"  {SMALL:>6} live mappings: {ts * 1e9:8.0f} ns per pair")
    print(f"  {LARGE:>6} live mappings: {tl * 1e9:8.0f} ns per pair  ({tl / ts:.3f}x)")


if __name__ == "__main__":
    main()
