"""A guest that maps until NOMEM, through each limit, against the real kernel.

tests/test_vfio_relay.py already pins the single refusal at each VFIO limit
(the ninth MAP under dma_entry_limit=8; one MAP larger than RLIMIT_MEMLOCK).
This goes on from there, the way a runaway or hostile guest would: map one
page after another until the relay answers NOMEM, keep asking thousands of
times more, and check that

- the relay answers every one of them NOMEM (no crash, no other status, no
  fault events: each is refused before the kernel is asked);
- it stopped exactly at the limit (the kernel's own vfio_dma count and
  locked pages say so);
- the other domains keep working (MAP/UNMAP OK), and where the limit is one
  per process (memlock) an UNMAP in the full domain makes room again;
- peak RSS barely moves while the refusals pile up;
- the full domain recovers (UNMAP, then MAP again), and every container then
  holds what the tables say.

Limits: ``entries`` (vfio_iommu_type1.dma_entry_limit=64, from the marker),
``max_mappings`` (the relay's own per-domain option), ``memlock``
(RLIMIT_MEMLOCK without CAP_IPC_LOCK) and ``table`` (the table's memory
itself, an emulated domain with no other limit, under RLIMIT_DATA).  Each runs
in its own process (tests/exhaustion_child.py).

The marker matches tests/test_fault_matrix.py's so both share one boot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vfio(edu=4, kernel_args=("vfio_iommu_type1.dma_entry_limit=64",))

ROOT = Path(__file__).resolve().parents[1]
PAGE = 0x1000
ENTRY_LIMIT = 64  # the marker's dma_entry_limit
# Peak RSS growth allowed while thousands of refusals are answered: one
# pymalloc arena (1 MiB in CPython 3.11) and change, far below what even
# 64 bytes kept per refused request would cost (1.2 MiB for 20000).
FLOOD_PEAK_KIB = 1024
TABLE_HEADROOM_KIB = 4096  # tests/exhaustion_child.py TABLE_HEADROOM


def run_child(limit: str, bdfs: list[str]) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "exhaustion_child.py"), limit, *bdfs],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, f"the guest process died (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    out: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=1))
    return out


@pytest.mark.parametrize("limit", ["entries", "max_mappings", "memlock", "table"])
def test_map_until_nomem_keeps_the_relay_answering(limit: str, edu_bdfs: list[str]) -> None:
    if len(edu_bdfs) < 3:
        pytest.skip("needs three edu functions")
    out = run_child(limit, edu_bdfs[:3])
    n = out["mapped"]
    assert isinstance(n, int)
    if limit == "entries":
        assert n == ENTRY_LIMIT, "stopped at the kernel's per-container vfio_dma limit"
    elif limit == "max_mappings":
        assert n == 16, "stopped at max_mappings"
    elif limit == "memlock":
        # A page in domain 1 is charged twice (two containers, Linux 6.12
        # type1 charges each vfio_dma); the child's cap is used up exactly.
        vmlck, cap = out["vmlck_pages"], out["cap_pages"]
        assert isinstance(vmlck, int) and isinstance(cap, int)
        assert vmlck == cap, out
    else:
        # 4 MiB of table memory: tens of thousands of mappings (about 32-64
        # bytes each in the B+ tree), not a handful and not unbounded.
        assert 10_000 < n < 1_000_000, out
    # Every answer at the limit and after it is NOMEM, none reported as a
    # kernel failure (each was refused before any ioctl).
    assert out["statuses"] == {"NOMEM": 1 + out["flood"]}, out  # type: ignore[operator]
    assert out["events"] == 0, out
    peak = out["flood_peak_kib"]
    assert isinstance(peak, int) and peak < FLOOD_PEAK_KIB, f"peak RSS grew {peak} KiB while refusing"
    # Reaching the limit costs the table and, for memlock, the pinned guest
    # pages (faulted in); the table's own memory is capped by RLIMIT_DATA.
    bound = TABLE_HEADROOM_KIB if limit == "table" else 0
    assert out["map_peak_kib"] < bound + 2 * FLOOD_PEAK_KIB, out  # type: ignore[operator]
    # The other domains keep working.
    assert out["emulated_map"] == out["emulated_unmap"] == "OK", out
    if limit == "memlock":
        assert out["vfio_map"] == "NOMEM", "RLIMIT_MEMLOCK is one budget per process"
        assert out["unmap_to_make_room"] == out["vfio_map_after_room"] == "OK", out
    else:
        assert out["vfio_map"] == "OK", out
    assert out["vfio_unmap"] == "OK", out
    # At the limit the kernel holds exactly what the tables say.
    for ep, seen in out["at_limit"].items():  # type: ignore[attr-defined]
        assert seen["kernel_entries"] == seen["table_entries"], (ep, seen)
    # Recovery, and every container empty of the full domain afterwards.
    assert out["unmap_one"] == out["map_again"] == out["unmap_everything"] == "OK", out
    assert out["left"] == 0
    for ep, (got, want) in out["unmap_all"].items():  # type: ignore[attr-defined]
        assert got == want, (ep, got, want)
