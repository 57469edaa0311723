"""Build and run hostrelay's libFuzzer targets (``./dev fuzz``).

    python cext/fuzz/run.py [--seconds S] [--target NAME]... [--replay] [--coverage] [--jobs N]

Each target in this folder (``fuzz_*.c``) is built with Debian's clang
(``-fsanitize=fuzzer,address,undefined``, every UB check fatal) against the
project's own data plane (every ``cext/hr_*.c`` but ``hr_vfio.c``) and the
fake kernel in ``harness.c``.  A run first replays the checked-in corpus
(``corpus/<target>/``), then fuzzes for ``--seconds`` from it, keeping new
inputs in ``build/fuzz/work/<target>/`` (not checked in; ``--merge`` folds
the ones that add coverage into the corpus).  A crash, leak, UB report,
timeout or broken invariant fails the run and leaves the input in
``build/fuzz/artifacts/``.  ``--coverage`` builds with clang's source-based
coverage, replays the corpus and prints llvm-cov's line coverage of the
data-plane files.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CEXT = HERE.parent
ROOT = CEXT.parent
BUILD = ROOT / "build" / "fuzz"
CORPUS = HERE / "corpus"
# The data plane, file by file (hr_relay_int.h says what each is for); a file
# missing here is an undefined symbol when a target links.  Not hr_vfio.c:
# harness.c is the kernel.
COVERED = ["hr_relay.c", "hr_checks.c", "hr_fanout.c", "hr_frame.c", "hr_burst.c", "hr_bench.c",
           "hr_vq.c", "hr_table.c"]  # fmt: skip
PROJECT_C = [CEXT / name for name in COVERED]
HARNESS_C = [HERE / "harness.c"]
# Debian 12's clang (clang-14, libclang-rt-14-dev); a newer one works too.
CLANGS = ["clang-14", "clang-15", "clang-16", "clang"]


def targets() -> list[str]:
    return sorted(p.stem for p in HERE.glob("fuzz_*.c"))


def _tool(names: list[str]) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    sys.exit(f"fuzz: none of {', '.join(names)} is installed (./dev fuzz installs clang-14 and libclang-rt-14-dev)")


def _suffix(clang: str) -> str:
    m = re.search(r"-(\d+)$", clang)
    return f"-{m.group(1)}" if m else ""


def _iommufd_flags() -> list[str]:
    """Build the data plane's IOAS containers too (and the fake kernel's IOAS), where the uapi has iommufd."""
    sys.path.insert(0, str(CEXT))
    from uapi import find  # the extension's own lookup (cext/uapi.py)

    uapi = find()
    if uapi is None:
        print("fuzz: no iommufd uapi (python3 cext/uapi.py): IOAS containers not fuzzed", file=sys.stderr)
        return []
    dirs = [] if uapi == Path("/usr/include") else [f"-I{uapi}", f"-I{uapi / 'x86_64-linux-gnu'}"]
    return ["-DHR_HAVE_IOMMUFD=1", f"-I{CEXT / 'iommufd'}", *dirs]


def build(target: str, *, coverage: bool = False) -> Path:
    """Compile one target; returns the binary (rebuilt only when a source is newer)."""
    clang = _tool(CLANGS)
    out = BUILD / ("cov" if coverage else "bin") / target
    sources = [HERE / f"{target}.c", *HARNESS_C, *PROJECT_C]
    deps = sources + list(HERE.glob("*.h")) + list(CEXT.glob("*.h")) + [Path(__file__)]
    if out.exists() and all(p.stat().st_mtime <= out.stat().st_mtime for p in deps):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = ["-g", "-O1", "-std=gnu11", "-pthread", f"-I{CEXT}", f"-I{HERE}", "-Wall", "-Wextra",
             "-Wno-unused-parameter", *_iommufd_flags()]  # fmt: skip
    if coverage:
        flags += ["-fsanitize=fuzzer", "-fprofile-instr-generate", "-fcoverage-mapping"]
    else:
        # UB is fatal (-fno-sanitize-recover): a report is a failed run, not a log line.
        flags += ["-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    cmd = [clang, *flags, *map(str, sources), "-o", str(out)]
    print(f"fuzz: building {out.relative_to(ROOT)}", flush=True)
    subprocess.run(cmd, check=True)
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=1:allocator_may_return_null=1")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    return env


def replay(target: str) -> None:
    """Run every corpus input once (what CI replays); raises on any finding."""
    corpus = CORPUS / target
    binary = build(target)
    subprocess.run([str(binary), "-runs=0", "-timeout=20", "-rss_limit_mb=2048", str(corpus)], check=True, env=_env())


def fuzz(target: str, seconds: int, jobs: int = 1) -> None:
    """Fuzz one target for ``seconds`` from its corpus; raises on any finding."""
    binary = build(target)
    work = BUILD / "work" / target
    work.mkdir(parents=True, exist_ok=True)
    artifacts = BUILD / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [str(binary), f"-max_total_time={seconds}", "-timeout=20", "-rss_limit_mb=2048", "-print_final_stats=1",
           f"-artifact_prefix={artifacts}/{target}-", str(work), str(CORPUS / target)]  # fmt: skip
    if jobs > 1:
        cmd[1:1] = [f"-fork={jobs}", "-ignore_crashes=0"]
    print(f"fuzz: {target} for {seconds} s", flush=True)
    subprocess.run(cmd, check=True, env=_env())


def merge(target: str) -> None:
    """Fold the work folder's inputs that add coverage into the checked-in corpus."""
    binary = build(target)
    work = BUILD / "work" / target
    subprocess.run([str(binary), "-merge=1", str(CORPUS / target), str(work)], check=True, env=_env())


def coverage(names: list[str]) -> dict[str, float]:
    """Line coverage (percent) of the data-plane files from replaying the corpus."""
    profdata_tool = _tool(["llvm-profdata" + _suffix(_tool(CLANGS)), "llvm-profdata"])
    cov_tool = _tool(["llvm-cov" + _suffix(_tool(CLANGS)), "llvm-cov"])
    with tempfile.TemporaryDirectory() as tmp:
        raws, bins = [], []
        for target in names:
            binary = build(target, coverage=True)
            raw = Path(tmp) / f"{target}.profraw"
            env = _env() | {"LLVM_PROFILE_FILE": str(raw)}
            subprocess.run([str(binary), "-runs=0", str(CORPUS / target)], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            raws.append(str(raw))
            bins.append(str(binary))
        merged = Path(tmp) / "all.profdata"
        subprocess.run([profdata_tool, "merge", "-sparse", *raws, "-o", str(merged)], check=True)
        objects = [bins[0], *(f"-object={b}" for b in bins[1:])]
        report = subprocess.run([cov_tool, "report", *objects, f"-instr-profile={merged}",
                                 *(str(CEXT / f) for f in COVERED)], check=True, capture_output=True, text=True)  # fmt: skip
        print(report.stdout)
        result = {}
        for line in report.stdout.splitlines():
            parts = line.split()
            if parts and Path(parts[0]).name in COVERED:
                # Columns: regions, missed, cover, functions, missed, executed, lines, missed, cover, ...
                result[Path(parts[0]).name] = float(parts[9].rstrip("%"))
        return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=60, help="fuzzing time per target (0: replay only)")
    ap.add_argument("--target", action="append", choices=targets(), help="only these targets")
    ap.add_argument("--replay", action="store_true", help="only replay the corpus")
    ap.add_argument("--merge", action="store_true", help="afterwards, fold new coverage into the corpus")
    ap.add_argument("--coverage", action="store_true", help="print line coverage from the corpus and exit")
    ap.add_argument("--jobs", type=int, default=1, help="fuzzing processes per target (libFuzzer -fork)")
    args = ap.parse_args()
    names = args.target or targets()
    if args.coverage:
        coverage(names)
        return 0
    try:
        for target in names:
            replay(target)
            if not args.replay and args.seconds > 0:
                fuzz(target, args.seconds, args.jobs)
                if args.merge:
                    merge(target)
    except subprocess.CalledProcessError as exc:
        print(f"fuzz: FAILED: {' '.join(map(str, exc.cmd[:1]))} exited {exc.returncode}", file=sys.stderr)
        return 1
    print(f"fuzz: {len(names)} targets passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
