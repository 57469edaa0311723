"""Capture a real Linux driver's strict-mode virtio-iommu request stream.

``python tests/stream_capture.py [-o tests/data/nvme_strict_stream.txt.gz]``
boots the testbed with a virtio-iommu (``TestbedConfig(iommu="virtio",
nvme=1, kernel_args=("iommu.strict=1",))``, the stock Debian 6.12 kernel),
runs direct I/O with ``dd`` on the guest's own ``nvme`` driver (never bound to
vfio-pci), and records every request the guest's ``virtio-iommu`` driver sent
QEMU's virtio-iommu device, from QEMU's trace events.  The nvme endpoint's
requests are written as a compact corpus (:func:`write_corpus`), which
``tests/bench_stream.py`` replays through the relay.

What is relied on:

- ``iommu.strict=1`` (Linux 6.12 drivers/iommu/iommu.c ``iommu_dma_strict``):
  the DMA API unmaps, and so sends UNMAP, at every ``dma_unmap_*`` instead of
  batching the invalidations in a flush queue; the guest's dmesg says "DMA
  domain TLB invalidation policy: strict mode (set via kernel command line)".
  So each nvme command is one or more MAPs while it is in flight and one UNMAP
  per ``dma_unmap_*`` when it completes.  The IOVAs come from iommu-dma's
  allocator (top down below the 32-bit boundary first, Linux 6.12
  drivers/iommu/dma-iommu.c ``iommu_dma_alloc_iova``, with its per-CPU caches
  handing the same IOVAs out again), so a 4 KiB read maps and unmaps the same
  few pages over and over.
- A scatter-gather request (``dma_map_sg``, a multi-page O_DIRECT buffer whose
  pages are not physically contiguous) gets one IOVA range with one MAP per
  physically contiguous run (``iommu_map_sg``, one ``viommu_map_pages`` each),
  and is unmapped with ONE UNMAP covering all of them: virtio-iommu allows an
  UNMAP range spanning several whole mappings (virtio 1.2 §5.13.6.6), and the
  corpus has them.
- The virtio devices of the 9p root have no ``VIRTIO_F_ACCESS_PLATFORM``, so
  their DMA does not go through the IOMMU: they are attached to domains but
  send no MAP.  Only the nvme endpoint's domain is kept anyway.
- QEMU 7.2's trace events (hw/virtio/trace-events), printed by the ``log``
  trace backend Debian's qemu-system-x86 is built with, one line per event,
  into the file given by ``-D`` (``-trace file=`` is for the ``simple`` binary
  backend only and writes nothing here)::

      virtio_iommu_attach domain=3 endpoint=16
      virtio_iommu_map domain=3 virt_start=0xfffff000 virt_end=0xffffffff phys_start=0x3d5b8000 flags=3
      virtio_iommu_unmap domain=3 virt_start=0xffffd000 virt_end=0xffffdfff

  ``virt_end`` is inclusive (the request's own field), ``flags`` is the
  request's (VIRTIO_IOMMU_MAP_F_READ 1, _WRITE 2, _MMIO 4), decimal;
  ``endpoint`` is the PCI requester ID (bus << 8 | devfn).  The events are
  emitted when QEMU handles the request (hw/virtio/virtio-iommu.c
  ``virtio_iommu_map``/``_unmap``/``_attach``), before it checks it, so a
  request QEMU refused would show too: the capture checks that the stream
  applies cleanly (:func:`check_stream`).  ``virtio_iommu_unmap_done`` is not
  enabled: it logs each mapping an UNMAP removed, not a request.

Corpus format (gzip text): ``#`` comment lines, then one request per line,
hexadecimal fields::

    M <domain> <virt_start> <virt_end> <phys_start> <flags>
    U <domain> <virt_start> <virt_end>

MAPs that the guest never unmapped (the nvme driver's queues and PRP pools,
``dma_alloc_coherent`` for the driver's lifetime) stay mapped at the end of
the stream; :func:`close_stream` gives the UNMAPs a replay appends for them.
"""

from __future__ import annotations

import argparse
import gzip
import re
import shlex
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = ROOT / "tests" / "data" / "nvme_strict_stream.txt.gz"
MAP, UNMAP = "M", "U"

# The guest's I/O: reads of the whole 16 MiB disk (hostrelay.testbed.vm makes
# each nvme image 16 MiB) with 4 KiB direct I/O, several passes, then writes
# and reads of bigger blocks (multi-page and scatter-gather MAPs), all
# O_DIRECT so that every block is one nvme command, none served from the page
# cache.  Plus a few buffered reads so that the stream has readahead too.
GUEST_IO = """
set -e
dev=/dev/nvme0n1
bdf=$(basename "$(readlink -f /sys/class/nvme/nvme0/device)")
echo "nvme-bdf $bdf"
dmesg | grep -i 'invalidation policy' || true
for pass in 1 2 3 4; do dd if=$dev of=/dev/null bs=4k count=4096 iflag=direct status=none; done
dd if=/dev/urandom of=/tmp/blk bs=1M count=4 status=none
dd if=/tmp/blk of=$dev bs=4k count=1024 oflag=direct status=none
dd if=/tmp/blk of=$dev bs=64k count=64 seek=64 oflag=direct status=none
dd if=/tmp/blk of=$dev bs=128k count=32 seek=64 oflag=direct status=none
dd if=$dev of=/dev/null bs=64k count=256 iflag=direct status=none
dd if=$dev of=/dev/null bs=16k count=512 iflag=direct status=none
dd if=$dev of=/dev/null bs=1M count=16 status=none
sync
echo capture-io-done
"""

_TRACE = re.compile(
    r"virtio_iommu_(?P<ev>map|unmap|attach) domain=(?P<domain>\d+)"
    r"(?: endpoint=(?P<ep>\d+)| virt_start=0x(?P<vs>[0-9a-f]+) virt_end=0x(?P<ve>[0-9a-f]+)"
    r"(?: phys_start=0x(?P<ps>[0-9a-f]+) flags=(?P<flags>\d+))?)"
)


class Op(NamedTuple):
    """One guest request: ``op`` is MAP ("M") or UNMAP ("U"); ``virt_end`` inclusive."""

    op: str
    domain: int
    virt_start: int
    virt_end: int
    phys_start: int = 0
    flags: int = 0


def parse_trace(lines: Iterable[str], endpoint: int) -> list[Op]:
    """The MAP/UNMAP requests of ``endpoint``'s domain, from QEMU's trace lines.

    The domain is the one ``endpoint`` was last attached to before each
    request (the guest attaches it once, at probe; a later attach moves it).
    Lines of other events, other domains or other programs are skipped.
    """
    domain: int | None = None
    ops: list[Op] = []
    for line in lines:
        m = _TRACE.search(line)
        if m is None:
            continue
        d = int(m["domain"])
        if m["ev"] == "attach":
            if int(m["ep"]) == endpoint:
                domain = d
            continue
        if d != domain or m["vs"] is None:
            continue
        if m["ev"] == "map":
            if m["ps"] is None:
                continue
            ops.append(Op(MAP, d, int(m["vs"], 16), int(m["ve"], 16), int(m["ps"], 16), int(m["flags"])))
        else:
            ops.append(Op(UNMAP, d, int(m["vs"], 16), int(m["ve"], 16)))
    return ops


def check_stream(ops: Iterable[Op]) -> dict[int, Op]:
    """Apply the stream to a model of the device's table; the mappings left.

    Raises ValueError where a request is one the device would refuse: a MAP
    overlapping a live mapping (virtio 1.2 §5.13.6.5, QEMU 7.2 answers
    VIRTIO_IOMMU_S_INVAL), an UNMAP that splits a mapping (§5.13.6.6,
    S_RANGE) or one that removes nothing (allowed by the spec, but the Linux
    driver never sends one: it would mean the capture lost a MAP).
    """
    # The live set stays small (the requests in flight plus the driver's
    # long-lived maps), so a scan is fast enough for a 50 000-request stream.
    live: dict[int, Op] = {}  # virt_start -> MAP
    for i, op in enumerate(ops):
        if op.virt_end < op.virt_start:
            raise ValueError(f"request {i}: empty range {op}")
        if op.op == MAP:
            if any(m.virt_start <= op.virt_end and op.virt_start <= m.virt_end for m in live.values()):
                raise ValueError(f"request {i}: MAP overlaps a live mapping: {op}")
            live[op.virt_start] = op
        else:
            hit = [m for m in live.values() if m.virt_start <= op.virt_end and op.virt_start <= m.virt_end]
            if not hit:
                raise ValueError(f"request {i}: UNMAP removes nothing: {op}")
            for m in hit:
                if m.virt_start < op.virt_start or m.virt_end > op.virt_end:
                    raise ValueError(f"request {i}: UNMAP splits a mapping {m}: {op}")
                del live[m.virt_start]
    return live


def close_stream(ops: Iterable[Op]) -> list[Op]:
    """UNMAPs for the mappings the stream leaves (in IOVA order)."""
    return [Op(UNMAP, m.domain, m.virt_start, m.virt_end) for _, m in sorted(check_stream(ops).items())]


def write_corpus(path: Path, ops: Iterable[Op], header: Iterable[str] = ()) -> None:
    with gzip.open(path, "wt", encoding="ascii", compresslevel=9) as f:
        for h in header:
            f.write(f"# {h}\n")
        for op in ops:
            if op.op == MAP:
                f.write(f"M {op.domain:x} {op.virt_start:x} {op.virt_end:x} {op.phys_start:x} {op.flags:x}\n")
            else:
                f.write(f"U {op.domain:x} {op.virt_start:x} {op.virt_end:x}\n")


def read_corpus(path: Path = DEFAULT_CORPUS) -> list[Op]:
    ops: list[Op] = []
    with gzip.open(path, "rt", encoding="ascii") as f:
        for n, line in enumerate(f, 1):
            if not line.strip() or line.startswith("#"):
                continue
            kind, *fields = line.split()
            v = [int(x, 16) for x in fields]
            if kind == MAP and len(v) == 5:
                ops.append(Op(MAP, *v))
            elif kind == UNMAP and len(v) == 3:
                ops.append(Op(UNMAP, *v))
            else:
                raise ValueError(f"{path}:{n}: not a corpus line: {line!r}")
    return ops


def _requester_id(bdf: str) -> int:
    """0000:00:02.0 -> 0x10 (bus << 8 | device << 3 | function)."""
    _, bus, devfn = bdf.split(":")
    dev, fn = devfn.split(".")
    return int(bus, 16) << 8 | int(dev, 16) << 3 | int(fn, 16)


def capture(out: Path, log: bool = True) -> list[Op]:
    from hostrelay.testbed import TestbedConfig, run

    with tempfile.TemporaryDirectory(prefix="hostrelay-capture-") as tmp:
        trace = Path(tmp) / "trace.log"
        events = ("virtio_iommu_attach", "virtio_iommu_map", "virtio_iommu_unmap")
        config = TestbedConfig(
            iommu="virtio", edu=0, nvme=1, kernel_args=("iommu.strict=1",),
            extra_qemu_args=("-D", str(trace), *(a for e in events for a in ("-trace", f"enable={e}"))),
        )  # fmt: skip
        result = run(["sh", "-c", GUEST_IO], config, timeout=1200, log=print if log else None)
        if result.returncode != 0 or "capture-io-done" not in result.output:
            raise RuntimeError(f"guest I/O failed (exit {result.returncode}):\n{result.output[-3000:]}")
        m = re.search(r"^nvme-bdf (\S+)", result.output, re.M)
        if m is None:
            raise RuntimeError(f"the guest did not say where its nvme is:\n{result.output[-2000:]}")
        endpoint = _requester_id(m[1])
        with open(trace, encoding="ascii", errors="replace") as f:
            ops = parse_trace(f, endpoint)
    left = check_stream(ops)
    maps = sum(op.op == MAP for op in ops)
    header = [
        "hostrelay virtio-iommu request stream: Linux 6.12 nvme driver, iommu.strict=1, QEMU 7.2 virtio-iommu-pci",
        f"captured by tests/stream_capture.py from trace events of endpoint {endpoint:#x} ({m[1]}); guest I/O:",
        *(f"  {line}" for line in GUEST_IO.strip().splitlines() if line.startswith("dd ") or line.startswith("for ")),
        f"{len(ops)} requests: {maps} MAP, {len(ops) - maps} UNMAP; {len(left)} mappings live at the end",
        "M domain virt_start virt_end(incl) phys_start flags | U domain virt_start virt_end (hex)",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_corpus(out, ops, header)
    if log:
        print(f"{len(ops)} requests ({maps} MAP, {len(ops) - maps} UNMAP, {len(left)} left mapped) -> {out}")
        print(f"guest said: {shlex.quote(result.output.strip()[-400:])}")
    return ops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=DEFAULT_CORPUS)
    args = ap.parse_args()
    capture(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
