"""Write the seed inputs of the fuzz targets into ``corpus/<target>/seed-*``.

    python cext/fuzz/seeds.py

The seeds are guest sessions a fuzzer would take long to find from nothing:
rings holding plain, split, indirect and malformed chains of every request
type, MAPs that span two RAM regions or hit a reserved range, kernel failures
at chosen calls; request streams; table operation streams.  Each layout is
the one its target's header comment describes (``fuzz_*.c``, ``ring.h``).
The files are checked in; rerun this after changing a layout.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from hostrelay.model.wire import (  # noqa: E402  (the repository's own codec, not an installed one)
    AttachRequest,
    DetachRequest,
    MapRequest,
    ProbeRequest,
    UnmapRequest,
)

NEXT, WRITE, INDIRECT = 1, 2, 4
RW = 3
DESC, AVAIL, USED, DATA = 0x1000, 0x1200, 0x1400, 0x2000
REGION = 0x10000


class Ring:
    """A guest image (the first two RAM regions) with a 16-entry ring at DESC/AVAIL/USED."""

    def __init__(self) -> None:
        self.img = bytearray(2 * REGION)
        self.next_desc = 0
        self.heads: list[int] = []
        self.data = DATA

    def put(self, data: bytes) -> int:
        at = self.data
        self.img[at : at + len(data)] = data
        self.data = (at + len(data) + 15) & ~15
        return at

    def desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0, table: int = DESC) -> None:
        struct.pack_into("<QIHH", self.img, table + 16 * i, addr, length, flags, nxt)

    def chain(self, readable: list[bytes], writable: list[int], *, indirect: bool = False) -> int:
        segs = [(self.put(r), len(r), 0) for r in readable] + [(self.put(bytes(w)), w, WRITE) for w in writable]
        if indirect:
            table = self.put(bytes(16 * len(segs)))
            for k, (a, n, f) in enumerate(segs):
                self.desc(k, a, n, f | (NEXT if k < len(segs) - 1 else 0), k + 1, table=table)
            head = self.take(1)[0]
            self.desc(head, table, 16 * len(segs), INDIRECT)
        else:
            idx = self.take(len(segs))
            for k, (a, n, f) in enumerate(segs):
                last = k == len(segs) - 1
                self.desc(idx[k], a, n, f | (0 if last else NEXT), 0 if last else idx[k + 1])
            head = idx[0]
        self.heads.append(head)
        return head

    def take(self, n: int) -> list[int]:
        out = [(self.next_desc + k) % 16 for k in range(n)]
        self.next_desc = (self.next_desc + n) % 16
        return out

    def raw_head(self, head: int) -> None:
        self.heads.append(head)

    def encode(self, *, ncont: int = 2, fail_nth: int = 0, fail_err: int = 0, more: int = 0,
               entry_limit: int = 255, memlock: int = 0, mode: int = 0, race: bytes | None = None) -> bytes:  # fmt: skip
        for k, h in enumerate(self.heads):
            struct.pack_into("<H", self.img, AVAIL + 4 + 2 * k, h)
        n = len(self.heads) - more
        hdr = struct.pack("<BBBBHHHBBBBH", 4, ncont, fail_nth, fail_err, DESC, AVAIL, USED, n, more,
                          entry_limit, memlock, mode)  # fmt: skip
        img = bytes(self.img).rstrip(b"\0") or b"\0"
        if race is not None:
            return hdr + struct.pack("<H", len(race)) + race + img
        return hdr + img


def session(r: Ring) -> None:
    """ATTACH, MAPs of every shape, UNMAPs: a driver's ordinary session."""
    r.chain([AttachRequest(2, 0x10).pack()], [4])
    r.chain([MapRequest(2, 0x100000, 0x100FFF, 0x3000, RW).pack()], [4])
    r.chain([MapRequest(2, 0x200000, 0x201FFF, 0xF000, RW).pack()], [4])  # two pieces
    r.chain([MapRequest(1, 0x0, 0xFFF, 0x4000, 1).pack()], [4])
    r.chain([MapRequest(2, 0x300000, 0x300FFF, 0x4000, 0).pack()], [4])  # no access: table only
    r.chain([UnmapRequest(2, 0x100000, 0x100FFF).pack()], [4])
    r.chain([UnmapRequest(2, 0, 2**64 - 1).pack()], [4])


def ring_seeds() -> dict[str, bytes]:
    out = {}
    r = Ring()
    session(r)
    out["session"] = r.encode()
    for err in range(1, 8):
        for nth in (0, 1, 3):
            r = Ring()
            session(r)
            out[f"fail-{nth}-{err}"] = r.encode(ncont=3, fail_nth=nth, fail_err=err)
    r = Ring()
    r.chain([MapRequest(2, 0x100000, 0x100FFF, 0x3000, RW).pack()[:10], MapRequest(2, 0x100000, 0x100FFF, 0x3000, RW).pack()[10:]], [2, 2])
    r.chain([MapRequest(1, 0x5000, 0x5FFF, 0x5000, RW).pack()], [4], indirect=True)
    r.chain([ProbeRequest(0x10).pack()], [512 + 4])
    r.chain([DetachRequest(2, 0x10).pack()], [4])
    r.chain([bytes([9, 0, 0, 0])], [4])  # unknown type
    r.chain([MapRequest(4, 0x1000, 0x1FFF, 0x1000, RW).pack()], [4])  # custom domain: the caller's
    r.chain([UnmapRequest(4, 0x1000, 0x1FFF).pack()], [4])
    r.chain([MapRequest(2, 0xFEE00000, 0xFEE00FFF, 0x1000, RW).pack()], [4])  # reserved
    r.chain([MapRequest(2, 0x1000, 0x1FFF, 0x80000, RW).pack()], [4])  # not RAM
    r.chain([MapRequest(2, 0x1000, 0x1FFF, 0x1000, 7).pack()], [4])  # MMIO into VFIO
    r.chain([MapRequest(3, 0x1000, 0x1FFF, 0x1000, RW).pack()], [4])  # bypass domain
    r.chain([MapRequest(9, 0x1000, 0x1FFF, 0x1000, RW).pack()], [4])  # out of range
    out["shapes"] = r.encode(more=4)
    r = Ring()
    r.chain([MapRequest(2, 0x1000, 0x1FFF, 0x1000, RW).pack()], [4])
    r.raw_head(16 + 3)  # no such descriptor: the queue breaks
    r.chain([MapRequest(2, 0x2000, 0x2FFF, 0x1000, RW).pack()], [4])
    out["bad-head"] = r.encode()
    r = Ring()
    a, b = r.take(2)
    r.desc(a, 0x3000, 36, NEXT, b)
    r.desc(b, 0x3100, 4, NEXT | WRITE, a)  # loop
    r.raw_head(a)
    c, d = r.take(2)
    r.desc(c, 0x90000, 0, NEXT, d)  # empty and outside RAM
    r.desc(d, 0x3100, 4, WRITE)
    r.raw_head(c)
    e, f = r.take(2)
    r.desc(e, 0x3100, 4, WRITE | NEXT, f)  # writable first
    r.desc(f, 0x3000, 36, 0)
    r.raw_head(e)
    g = r.take(1)[0]
    r.desc(g, 0x3000, 48, INDIRECT)  # indirect table 3 entries, one nested indirect
    struct.pack_into("<QIHH", r.img, 0x3000, 0x3200, 16, INDIRECT, 0)
    r.raw_head(g)
    r.chain([AttachRequest(2, 0x10).pack(), bytes(1 << 12)], [4])  # longer than any request
    r.chain([MapRequest(2, 0x1000, 0x1FFF, 0x1000, RW).pack()], [70000])  # longer than any reply
    out["malformed"] = r.encode()
    r = Ring()
    for k in range(12):
        r.chain([MapRequest(2, k << 12, (k << 12) + 0xFFF, 0x1000, RW).pack()], [4])
    out["limits"] = r.encode(ncont=3, entry_limit=3, memlock=6)
    r = Ring()
    session(r)
    out["floor"] = r.encode(mode=1)
    out["locked"] = r.encode(mode=2)
    return out


def race_seeds() -> dict[str, bytes]:
    out = {}
    r = Ring()
    session(r)
    # Rewrite descriptor 1's length and flags and the avail index while it runs.
    script = bytes([0x18, 0x10, 0x1C, 0x01, 0x02, 0x12, 0x0C, 0x10])
    out["session"] = r.encode(race=script)
    return out


def request_seeds() -> dict[str, bytes]:
    def rec(op: int, req: bytes, wlen: int) -> bytes:
        return bytes([op, len(req)]) + req + struct.pack("<H", wlen)

    def fail(nth: int, err: int) -> bytes:
        return bytes([0xF0, nth | err << 3])

    maps = [MapRequest(d, k << 12, (k << 12) + 0xFFF, 0x1000 * (k % 30), RW).pack() for d in (1, 2) for k in range(8)]
    out = {}
    body = b"".join(rec(k & 1, m, 4) for k, m in enumerate(maps))
    body += rec(0, UnmapRequest(1, 0x2000, 0x2FFF).pack(), 4) + rec(1, UnmapRequest(2, 0, 2**64 - 1).pack(), 4)
    body += rec(0, MapRequest(2, 0x20000, 0x21FFF, 0xF000, RW).pack(), 4)  # two pieces
    body += rec(0, UnmapRequest(2, 0x20000, 0x20FFF).pack(), 4)  # straddles: RANGE
    out["basic"] = bytes([2, 255, 0, 0]) + body
    for err in range(1, 8):
        s = bytes([3, 255, 0, 0])
        s += fail(1, err) + rec(0, MapRequest(2, 0x20000, 0x21FFF, 0xF000, RW).pack(), 4)
        s += rec(0, MapRequest(2, 0x40000, 0x40FFF, 0x1000, RW).pack(), 4)
        s += fail(2, err) + rec(1, UnmapRequest(2, 0, 2**64 - 1).pack(), 4)
        out[f"fail-{err}"] = s
    odd = bytes([1, 255, 0, 0]) + rec(0, MapRequest(2, 0, 0xFFF, 0, RW).pack()[:30], 4)
    odd += rec(0, MapRequest(2, 0, 0xFFF, 0, RW).pack(), 8) + rec(0x40, UnmapRequest(2, 0, 0xFFF).pack(), 0x300)
    odd += rec(0, UnmapRequest(2, 0, 0xFFF).pack()[:24] + b"\1\0\0\0", 4)  # reserved field
    odd += rec(0, AttachRequest(2, 1).pack(), 4) + bytes([0xE0, 4])  # bench loop
    out["framing"] = odd
    out["limits"] = bytes([2, 2, 3, 0]) + body
    return out


def table_seeds() -> dict[str, bytes]:
    def op(kind: int, page: int, pages: int, flags: int = 3, extra: int = 0, high: bool = False) -> bytes:
        return bytes([kind | (0x80 if high else 0)]) + struct.pack("<II", page, pages) + bytes([flags, 1, 2, extra])

    out = {}
    s = b"".join(op(0, k * 3, 1) for k in range(300))
    s += b"".join(op(4, k, 0) + op(5, k * 3, 2 << 16, 1) for k in range(50))
    s += b"".join(op(2, 0, k, extra=1) for k in range(100)) + op(3, 0, 400) + op(6, 0, 0)
    out["scale"] = s
    deep = op(7, 0, 4095, extra=0x80) + op(7, 0x100000, 4095, extra=0x80)
    deep += op(7, 0, 5, extra=0x40) + op(3, 0, 0x1000) + op(7, 0, 1, extra=0x40) + op(3, 0, 0xFFFF)
    out["deep"] = deep + op(7, 0, 4095, extra=0x80) + op(7, 0, 0, extra=0x40) + op(7, 0, 1, extra=0x40)
    out["high"] = b"".join(op(0, 0xFFFFFF - k, 0, high=True) for k in range(20)) + op(3, 0, 0xFFFF, high=True)
    return out


def main() -> None:
    for target, seeds in (("fuzz_ring", ring_seeds()), ("fuzz_ring_race", race_seeds()),
                          ("fuzz_request", request_seeds()), ("fuzz_table", table_seeds())):  # fmt: skip
        folder = HERE / "corpus" / target
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("seed-*"):
            old.unlink()
        for name, data in seeds.items():
            (folder / f"seed-{name}").write_bytes(data)
        print(f"{target}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
