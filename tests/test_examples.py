"""Every example and the main job run for real (examples in the testbed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    # The benchmark imports hostrelay from this tree (PYTHONPATH), not from
    # wherever the interpreter's environment has it installed.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.run([sys.executable, str(ROOT / "tests" / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)  # fmt: skip


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)  # fmt: skip


@pytest.mark.vfio(edu=1, nvme=1)
@pytest.mark.parametrize(
    "script,expected",
    [
        ("dma_roundtrip.py", "data round trip matches"),
        ("vmm_virtqueue.py", "was blocked by the IOMMU"),
        ("nvme_identify.py", "serial 'hostrelay-nvme0'"),
        ("bypass.py", "attached to a bypass domain"),
    ],
)
def test_example_runs_and_passes(script: str, expected: str) -> None:
    proc = _run(script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RESULT: PASS" in proc.stdout
    assert expected in proc.stdout


@pytest.mark.vfio(edu=2)
def test_vfio_benchmark_runs_and_checks_itself() -> None:
    # Not a timing test: the benchmark's loops check their own results (every
    # request answered OK, the table empty again, the C-driven ring and the
    # floor walker completing every chain), so running it small keeps its C
    # helpers (hr_relay_bench_*) and its figures from rotting between runs.
    proc = _bench("bench_vfio.py", "--pairs", "128", "--repeat", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = dict(re.findall(r"^ {2}(\S.*?) +(\d+\.\d+) us/pair", proc.stdout, re.M))
    for label in ("raw C ioctl loop", "ring, batches of 64", "handle_request 1 by 1", "ring driven from C",
                  "ring floor", "data plane in C loop", "1 group", "2 groups"):  # fmt: skip
        assert float(figures[label]) > 0, (label, proc.stdout)
    assert "the relay's own work" in proc.stdout
    assert "4 groups: skipped (only 2 edu devices)" in proc.stdout


@pytest.mark.vfio(edu=4, iommufd=True)
def test_iommufd_benchmark_runs_and_checks_itself() -> None:
    # Not a timing test either: tests/bench_iommufd.py's loops check their
    # own results (the raw loops' unmapped byte counts, every ring request
    # answered OK and the table empty again, every move answered OK with
    # both domains' mappings kept and, for iommufd, the moved device on the
    # page table of its domain), so running it small keeps its C raw loop
    # (hr_iommufd_bench_map_unmap), both backends' setups and the output
    # format working.  What it prints is checked for shape, never for speed.
    proc = _bench("bench_iommufd.py", "--pairs", "64", "--repeat", "1", "--moves", "1", "--mappings", "1", "100")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures: dict[tuple[str, str], float] = {}
    section = ""
    for line in proc.stdout.splitlines():
        if not line.startswith("  "):
            section = line.split(" (")[0]
        elif m := re.match(r"^ {2}(\S.*?) +(\d+\.\d+) us/pair  \(\d+\.\d+x raw", line):
            figures[section, m[1]] = float(m[2])
    for backend in ("type1", "iommufd"):
        labels = [f"{what} {n} device{'s' if n > 1 else ''}" for what in ("raw", "ring") for n in (1, 2, 4)]
        for label in [*labels, "handle_request", "data plane C loop", "ring driven from C"]:
            assert figures.get((backend, label), 0) > 0, (backend, label, proc.stdout)
    targets = re.findall(r"^ {2}iommufd ring .+? (\d+\.\d+)x  \(target <= (\d\.\d\d)x: (met|MISSED by [+-]\d+\.\d%)\)$",
                         proc.stdout, re.M)  # fmt: skip
    assert len(targets) == 4, proc.stdout
    moves = re.findall(r"^ +(\d+) mappings  type1 +(\d+\.\d+) us  iommufd +(\d+\.\d+) us  \(type1 \d+\.\d+x iommufd\)"
                       r"  bare replace +(\d+\.\d+) us", proc.stdout, re.M)  # fmt: skip
    assert [m[0] for m in moves] == ["1", "100"], proc.stdout
    assert all(float(t) > 0 for m in moves for t in m[1:]), proc.stdout


@pytest.mark.skipif(bool(os.environ.get("HOSTRELAY_TESTBED")), reason="boots the testbed itself; not nested inside it")
def test_hostrelay_demo_end_to_end() -> None:
    if shutil.which("qemu-system-x86_64") is None:
        if os.environ.get("CI") == "true" or os.environ.get("HOSTRELAY_REQUIRE_VFIO") == "1":
            pytest.fail("qemu-system-x86_64 missing on CI: .ci/run must install qemu-system-x86")
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    proc = subprocess.run([sys.executable, "-m", "hostrelay.cli", "demo"], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    assert "ok   the DMA landed in guest memory" in out
    assert "ok   the DMA did not land (the IOMMU blocked it)" in out
    assert "ok   the host IOMMU reported the fault" in out
    assert "serial 'hostrelay-nvme0'" in out
    assert "16 of 16 checks passed" in out
    assert "booted in" in proc.stderr  # progress shown while booting


@pytest.mark.vfio(edu=1, nvme=1, iommufd=True)
def test_hostrelay_demo_on_the_iommufd_backend() -> None:
    """``hostrelay testbed run --iommufd -- hostrelay demo --backend iommufd``: every check holds."""
    proc = subprocess.run([sys.executable, "-m", "hostrelay.cli", "demo", "--backend", "iommufd"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    assert "VFIO device cdev /dev/vfio/devices/vfio" in out
    assert "ok   the DMA did not land (the IOMMU blocked it)" in out
    assert "serial 'hostrelay-nvme0'" in out
    assert "ok   domain 3's IOAS is gone with its last device" in out
    assert "22 of 22 checks passed" in out
