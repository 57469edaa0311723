"""Benchmark (host side): hostrelay's vhost-user virtio-iommu against QEMU 11's built-in one, side by side.

Not a test (pytest does not collect ``bench_*.py``).  Run as root from the
repository, one testbed at a time on the machine::

    python tests/bench_viommu_sbs.py --boots 3

Boots the newer-QEMU testbed (QEMU 11.1) alternately in two configurations
and runs tests/bench_viommu.py in the guest each time:

- ``builtin``: QEMU's own ``virtio-iommu-pci`` in front of QEMU's own ``edu``
  (``hostrelay testbed run --qemu newer --iommu virtio --edu 1``);
- ``served``: hostrelay as the guest's virtio-iommu over vhost-user, with a
  VIOT naming it, in front of hostrelay's vfio-user edu
  (``hostrelay testbed run --qemu newer --served-iommu --served-edu 1``).

Both guests run the same kernel (Linux 6.12), with
``vfio_iommu_type1.allow_unsafe_interrupts=1`` (neither virtio-iommu remaps
interrupts).  The endpoints differ (an in-process QEMU device against an
out-of-process vfio-user one) but a timed MAP+UNMAP cycle does no DMA, so
what the two figures compare is the IOMMU request path: the guest driver's
kick, the device's work, the completion the driver spins on.  The DMA-checked
cycles around each round (see tests/bench_viommu.py) are not timed.

The order alternates (builtin, served, builtin, served, ...) so slow drift of
the shared host's load hits both alike.  Figures are the guest's clock, which
under TCG without -icount is the host's monotonic clock; each round's
``MARK`` lines are also stamped on arrival here with the host's own clock as a
cross-check (good to the output's polling interval, ~0.05 s a round).

Printed: every boot's rounds, each configuration's median cost per cycle,
the ratio served/builtin of the medians (goal: <= 1.25x) with the range of the
per-pair ratios, and the noise: min/max and the relative standard
deviation of the boots' medians and of the rounds within a boot.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GUEST = "tests/bench_viommu.py"
# Every boot: the same kernel argument (type1 refuses a group behind an
# IOMMU without interrupt remapping otherwise, Linux 6.12 vfio_iommu_type1).
COMMON = ("--qemu", "newer", "--kernel-arg", "vfio_iommu_type1.allow_unsafe_interrupts=1", "-q")
CONFIGS: dict[str, tuple[str, ...]] = {
    "builtin": ("--iommu", "virtio", "--edu", "1"),
    # No recording: a VMM does not record, and writing it costs host CPU the VM needs.
    "served": ("--served-iommu", "--served-edu", "1", "--no-served-record"),
}


@dataclass
class Boot:
    """One boot's figures."""

    config: str
    index: int
    rates: list[float] = field(default_factory=list)  # cycles/s, guest clock, one per round
    host_rates: list[float] = field(default_factory=list)  # the same rounds, stamped on arrival here
    iommu: str = ""
    checks: int = 0
    load: float = 0.0  # the host's 1-minute load average at the start
    wall: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def us(self) -> float:
        """Median cost of a cycle, microseconds."""
        return 1e6 / self.median


def boot(config: str, index: int, python: str, cycles: int, repeat: int, extra: tuple[str, ...],
         verbose: bool) -> Boot:  # fmt: skip
    """Boot ``config`` once and run the guest benchmark; its figures (raises if it failed)."""
    argv = [python, "-m", "hostrelay.cli", "testbed", "run", *COMMON, *CONFIGS[config], *extra, "--",
            python, GUEST, "--cycles", str(cycles), "--repeat", str(repeat)]  # fmt: skip
    if verbose:
        print("  $ " + shlex.join(argv), flush=True)
    result = Boot(config, index, load=os.getloadavg()[0])
    start = time.monotonic()
    lines: list[str] = []
    starts: dict[int, float] = {}
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    payload = None
    for raw in proc.stdout:  # the testbed streams the guest's output as it arrives
        now = time.monotonic()
        line = raw.decode(errors="replace").rstrip("\n")
        lines.append(line)
        if verbose:
            print("    | " + line, flush=True)
        words = line.split()
        if line.startswith("MARK start "):
            starts[int(words[2])] = now
        elif line.startswith("MARK end "):
            r, n = int(words[2]), int(words[3])
            if r in starts:
                result.host_rates.append(n / (now - starts[r]))
        elif line.startswith("RESULT "):
            payload = json.loads(line[len("RESULT "):])
    rc = proc.wait()
    result.wall = time.monotonic() - start
    if rc != 0 or payload is None:
        tail = "\n".join(lines[-40:])
        raise RuntimeError(f"{config} boot {index} failed (exit {rc}):\n{tail}")
    result.rates = [float(x) for x in payload["rates"]]
    result.iommu = str(payload["iommu"])
    result.checks = int(payload["checks"])
    return result


def rel_stdev(values: list[float]) -> float:
    """Relative sample standard deviation (0 for fewer than two values)."""
    return statistics.stdev(values) / statistics.mean(values) if len(values) > 1 else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boots", type=int, default=3, help="boots of each configuration (alternated)")
    ap.add_argument("--cycles", type=int, default=100000, help="MAP+UNMAP cycles per round")
    ap.add_argument("--repeat", type=int, default=5, help="rounds per boot")
    ap.add_argument("--only", choices=sorted(CONFIGS), help="boot only this configuration")
    ap.add_argument("--python", default=sys.executable, help="the interpreter (host and guest share it)")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("-v", "--verbose", action="store_true", help="echo the commands and the guest's output")
    ap.add_argument("--testbed-arg", action="append", default=[], metavar="ARG",
                    help="extra `hostrelay testbed run` option for every boot (repeatable)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("the newer-QEMU testbed needs root", file=sys.stderr)
        return 2
    order = [args.only] if args.only else ["builtin", "served"]
    boots: list[Boot] = []
    for i in range(args.boots):
        for config in order:
            b = boot(config, i, args.python, args.cycles, args.repeat, tuple(args.testbed_arg), args.verbose)
            boots.append(b)
            host = statistics.median(b.host_rates) if b.host_rates else float("nan")
            print(f"{config:>8} boot {i}: median {b.median:8.0f} cycles/s = {b.us:6.2f} us/cycle  "
                  f"(rounds {', '.join(f'{r:.0f}' for r in b.rates)}; rounds' rel. stdev {rel_stdev(b.rates):.1%}; "
                  f"host-stamped median {host:.0f}; load {b.load:.2f}; {b.checks} DMA-checked cycles; "
                  f"IOMMU {b.iommu})", flush=True)  # fmt: skip
    print()
    print(f"4 KiB VFIO MAP+UNMAP cycles from guest userspace, {args.cycles} cycles x {args.repeat} rounds a boot, "
          f"{args.boots} boots each, alternated; QEMU 11.1 TCG, guest clock = host wall clock")  # fmt: skip
    med: dict[str, float] = {}
    for config in order:
        mine = [b for b in boots if b.config == config]
        us = [b.us for b in mine]
        med[config] = statistics.median(us)
        rounds = [1e6 / r for b in mine for r in b.rates]
        drift = [statistics.median(b.rates) / statistics.median(b.host_rates) for b in mine if b.host_rates]
        print(f"  {config:>8}: median of boots {med[config]:6.2f} us/cycle ({1e6 / med[config]:.0f} cycles/s); "
              f"boots {min(us):.2f}..{max(us):.2f} us (rel. stdev {rel_stdev(us):.1%}); "
              f"all rounds {min(rounds):.2f}..{max(rounds):.2f} us; guest/host-stamped rate "
              f"{min(drift, default=float('nan')):.3f}..{max(drift, default=float('nan')):.3f}")  # fmt: skip
    if len(order) == 2:
        pairs = [s.us / b.us for b, s in zip([b for b in boots if b.config == "builtin"],
                                             [b for b in boots if b.config == "served"])]  # fmt: skip
        ratio = med["served"] / med["builtin"]
        print(f"  served / builtin cost per cycle: {ratio:.2f}x (goal <= 1.25x); per boot pair "
              f"{', '.join(f'{p:.2f}' for p in pairs)}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps([b.__dict__ for b in boots], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
