"""The C fuzz targets (cext/fuzz/) in the test suite: the checked-in corpus
replayed, then each target fuzzed for a bounded time, all under ASan + UBSan.

A finding (crash, out-of-bounds access, UB, leak, hang, broken invariant)
fails the test with libFuzzer's report; the input is left in
build/fuzz/artifacts/.  ``./dev fuzz [SECONDS]`` runs the same targets for
longer.  Needs Debian's clang-14 and libclang-rt-14-dev (``./dev`` installs
them); without them the test skips with that reason, except under CI, where
it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "cext" / "fuzz" / "run.py"
SECONDS = int(os.environ.get("HOSTRELAY_FUZZ_SECONDS", "20"))
TARGETS = sorted(p.stem for p in RUN.parent.glob("fuzz_*.c"))


def _need_clang() -> None:
    if not any(shutil.which(c) for c in ("clang-14", "clang-15", "clang-16", "clang")):
        reason = "clang is not installed (Debian: clang-14 libclang-rt-14-dev; ./dev installs them)"
        if os.environ.get("CI", "").lower() == "true" or os.environ.get("HOSTRELAY_REQUIRE_VFIO") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def test_every_target_has_a_corpus() -> None:
    assert TARGETS == ["fuzz_request", "fuzz_ring", "fuzz_ring_race", "fuzz_table"]
    for target in TARGETS:
        assert any((RUN.parent / "corpus" / target).iterdir()), target


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target(target: str) -> None:
    _need_clang()
    out = subprocess.run([sys.executable, str(RUN), "--target", target, "--seconds", str(SECONDS)],
                         capture_output=True, text=True, timeout=600 + SECONDS)  # fmt: skip
    full = out.stdout + out.stderr
    report = full[-8000:]
    assert out.returncode == 0, report
    # Replay ran over the corpus and the fuzzer ran: both print libFuzzer's "Done N runs".
    done = [line for line in full.splitlines() if line.startswith("Done ")]
    assert len(done) == 2, report
    assert int(done[1].split()[1]) > 0, report
