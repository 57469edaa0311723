"""Build script for ``hostrelay._native`` (cffi, API mode, out of line).

Every ``cext/*.cdef`` file is the cffi declaration of the matching public
header ``cext/*.h`` (``hr_relay.h`` is the API of several ``hr_*.c`` files);
every ``cext/*.c`` file is compiled into one extension so a burst of work costs
one Python->C transition.  Kernel constants and struct layouts are declared with
``...`` so the C compiler takes them from the system's ``<linux/vfio.h>``
(Debian ``linux-libc-dev``): nothing here is typed by hand.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()

# Declaration order: the building blocks first (hr_relay uses the types of
# hr_table and hr_vq), then any other file alphabetically, so the build is
# reproducible.
_FIRST = ["hr_vfio", "hr_table", "hr_vq"]
_cdefs = sorted(HERE.glob("*.cdef"), key=lambda p: (_FIRST.index(p.stem) if p.stem in _FIRST else len(_FIRST), p.stem))
for cdef in _cdefs:
    ffibuilder.cdef(cdef.read_text(), override=False)

_sources = sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("*.c"))

# iommufd wrappers (cext/iommufd/) only where the uapi has them: the system's
# headers or bookworm-backports' linux-libc-dev unpacked by cext/uapi.py.
# Elsewhere the extension is built without them and hostrelay.kernel.iommufd
# says so at run time; the type1 backend needs nothing newer than Linux 6.1.
sys.path.insert(0, str(HERE))
from uapi import find as _find_uapi  # noqa: E402

_uapi = _find_uapi()
_include_dirs = [str(HERE)]
# The stable ABI of Python 3.11 (pyproject's floor) rather than cffi's
# default 3.2 one: the native handle_request door (pydoor/hr_pydoor.c) needs
# METH_FASTCALL, part of it since 3.10.  cffi keeps a Py_LIMITED_API it finds.
_macros: list[tuple[str, str | None]] = [("Py_LIMITED_API", "0x030b0000")]
_headers = sorted(HERE.glob("*.cdef"))
if _uapi is not None:
    _headers.append(HERE / "iommufd" / "hr_iommufd.cdef")
    ffibuilder.cdef((HERE / "iommufd" / "hr_iommufd.cdef").read_text(), override=False)
    _sources.append(str((HERE / "iommufd" / "hr_iommufd.c").relative_to(HERE.parent)))
    _include_dirs.append(str(HERE / "iommufd"))
    # The data plane's MAP/UNMAP (hr_fanout.c) then drives IOAS containers too.
    _macros.append(("HR_HAVE_IOMMUFD", "1"))
    if _uapi != Path("/usr/include"):
        # Before the system's headers, so <linux/vfio.h> is the newer one too
        # (a superset with the same type1 layouts); the arch directory has the
        # matching <asm/...>.
        _include_dirs += [str(_uapi), str(_uapi / "x86_64-linux-gnu")]
    print(f"build_native: iommufd uapi from {_uapi}", file=sys.stderr)
else:
    print("build_native: no iommufd uapi (run python3 cext/uapi.py); type1 backend only", file=sys.stderr)

# -fvisibility=hidden + LTO: calls between the C files are direct and can be
# inlined (hr_relay_process flattens the whole request path into one
# function), not PLT jumps; only PyInit__native is exported.  Measured under
# TCG, where each indirect jump is a lookup in the emulator, this took the
# ring from 1.28x to 1.14x the raw ioctl loop together with the walker's
# bursts (tests/bench_vfio.py).
_compile = ["-O3", "-std=gnu11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration",
            "-fvisibility=hidden", "-flto=auto", "-pthread"]  # fmt: skip
_link = ["-O3", "-flto=auto", "-fvisibility=hidden", "-pthread"]
if os.environ.get("HOSTRELAY_SANITIZE") == "1":
    # The extension under ASan + UBSan (every UB report fatal), for a test
    # run of the Python-driven paths (tests/test_sanitized.py).  The Python
    # that loads it must preload the sanitizer runtimes (that test does).
    _san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
    _compile = ["-O1", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration",
                "-pthread", *_san]  # fmt: skip
    _link = ["-pthread", *_san]
    # That test compiles with ffibuilder.compile(tmpdir=...), from another folder.
    _sources = [str(HERE.parent / s) for s in _sources]

# handle_request's native door: Python C API code, so it lives in the module
# source (after cffi's <Python.h>) and not among the plain C files above,
# which the fuzz targets build without Python.
ffibuilder.cdef((HERE / "pydoor" / "hr_pydoor.cdef").read_text(), override=False)

# Only the public headers, the ones with a .cdef, go into the module source:
# that is all cffi wraps.  An internal header (hr_relay_int.h) stays the C
# files' own, its static inline helpers out of the generated code.
ffibuilder.set_source(
    "hostrelay._native",
    "\n".join([*(f'#include "{p.stem}.h"' for p in _headers), '#include "pydoor/hr_pydoor.c"']),
    sources=_sources,
    include_dirs=_include_dirs,
    define_macros=_macros,
    extra_compile_args=_compile,
    extra_link_args=_link,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
