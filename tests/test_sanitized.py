"""The unit tests again, with the C extension built under ASan + UBSan.

The extension is rebuilt with ``HOSTRELAY_SANITIZE=1`` (cext/build_native.py)
into a temporary folder beside a copy of the package made of links to the
real modules, and the testbed-independent tests run against it in a child
pytest with the sanitizer runtimes preloaded (Python itself is not
instrumented).  Any out-of-bounds access, use after free or undefined
behaviour in C reached from Python aborts the child, which fails this test.
Leak checking is off: the interpreter keeps memory until exit by design.

Slow (a few minutes): the child runs every other unit test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _runtime(name: str) -> str | None:
    cc = shutil.which("gcc")
    if not cc:
        return None
    path = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def _build(tmp: Path) -> Path:
    """A package tree whose _native is the sanitized build; returns its parent."""
    site = tmp / "site"
    pkg = site / "hostrelay"
    pkg.mkdir(parents=True)
    for entry in (ROOT / "hostrelay").iterdir():
        if entry.name.startswith("_native") or entry.name == "__pycache__":
            continue
        (pkg / entry.name).symlink_to(entry)
    env = dict(os.environ, HOSTRELAY_SANITIZE="1")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import build_native; "
        "build_native.ffibuilder.compile(tmpdir=sys.argv[2], verbose=False)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "cext"), str(tmp / "obj")],
                         capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    built = list((tmp / "obj" / "hostrelay").glob("_native*.so"))
    assert len(built) == 1, built
    shutil.copy(built[0], pkg / built[0].name)
    return site


def test_unit_suite_under_asan_and_ubsan(tmp_path: Path) -> None:
    asan, ubsan = _runtime("libasan.so"), _runtime("libubsan.so")
    if not (asan and ubsan):
        pytest.skip("gcc's ASan/UBSan runtimes are not installed (Debian: libgcc-12-dev)")
    site = _build(tmp_path)
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(site),
        LD_PRELOAD=f"{asan}:{ubsan}",
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
        PYTHONMALLOC="malloc",  # cffi buffers from malloc, so ASan sees their bounds
    )
    env.pop("CI", None)  # the child must not try to boot the testbed: VFIO tests are deselected anyway
    # -P: the working directory is not put first on sys.path, so the
    # package found is the sanitized tree, not the checkout's.
    # host_boot: QEMU started from the child would inherit LD_PRELOAD (and refuse it).
    cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not vfio and not host_boot",
           "--ignore", str(ROOT / "tests" / "test_sanitized.py"),
           "--ignore", str(ROOT / "tests" / "test_fuzz_targets.py"),  # the fuzz targets have their own sanitizers
           "--rootdir", str(ROOT), str(ROOT / "tests")]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    tail = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0, tail
    assert "ERROR: AddressSanitizer" not in tail and "runtime error" not in tail, tail
    # The child really loaded the sanitized build (and ran tests).
    assert " passed" in tail, tail


def test_sanitized_child_uses_the_sanitized_build(tmp_path: Path) -> None:
    """The child imports the sanitized _native, not the checkout's: an
    out-of-bounds read through the extension is caught there."""
    asan, ubsan = _runtime("libasan.so"), _runtime("libubsan.so")
    if not (asan and ubsan):
        pytest.skip("gcc's ASan/UBSan runtimes are not installed (Debian: libgcc-12-dev)")
    site = _build(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(site), LD_PRELOAD=f"{asan}:{ubsan}",
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1", PYTHONMALLOC="malloc")  # fmt: skip
    code = (
        "import hostrelay._native as n, sys; print(n.__file__);"
        "buf = n.ffi.new('struct hr_gmem_region[]', 1); buf[0].size = 4096;"
        "n.lib.hr_gmem_set(n.ffi.new('struct hr_gmem *'), buf, 2)"  # reads 2 regions of a 1-region array
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert str(site) in out.stdout
    assert out.returncode != 0 and "AddressSanitizer" in out.stderr, out.stderr[-2000:]
