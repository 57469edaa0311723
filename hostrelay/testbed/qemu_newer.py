"""A newer QEMU for the testbed, beside the host's: Debian trixie-backports' ``qemu-system-x86``.

The host's QEMU (7.2 on Debian 12) has no ``vhost-user-test-device-pci`` nor
``vfio-user-pci``, which the socket front ends are tested against.  This module
provisions, once per machine, a private Debian trixie root holding QEMU from
trixie-backports (11.1 when written) under ``~/.cache/hostrelay/qemu-newer/``:

1. ``debootstrap`` itself is fetched with ``apt-get download`` (a private apt
   state, see :class:`~hostrelay.testbed.kernel.PrivateApt`) and unpacked with
   ``dpkg-deb -x``; it runs from there with ``DEBOOTSTRAP_DIR`` (not installed);
2. ``debootstrap --variant=minbase trixie`` builds the root from the host's
   Debian mirror;
3. inside it (``chroot`` with proc, sys and dev mounted in a private mount
   namespace, so nothing stays mounted on the host) a trixie-backports sources
   entry and ``apt-get install -t trixie-backports --no-install-recommends
   qemu-system-x86``; apt's caches and lists are removed afterwards.

It is built in a temporary directory and renamed into place with a stamp
(``hostrelay.json``: QEMU's version, the package's, the recipe) once QEMU has
answered ``-version``, so a half-made root is never used.  Later boots reuse
it without the network.  The host's apt sources and QEMU stay untouched.

:func:`qemu_command` gives the argv prefix that runs it without a chroot (the
guest's 9p root is the host's ``/``): see its docstring.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hostrelay.testbed.kernel import PrivateApt, TestbedSetupError, apt_sources, cache_dir

__all__ = ["SUITE", "PACKAGE", "NewerQemu", "cached_newer_qemu", "provision_newer_qemu", "qemu_command"]

# trixie (Debian 13) has QEMU 10.0; its backports carry 11.1 (1:11.1.3+ds-1~bpo13+1
# on 2026-12-01), the first to have both vhost-user-test-device-pci and vfio-user-pci.
RELEASE = "trixie"
SUITE = "trixie-backports"
PACKAGE = "qemu-system-x86"
# Where Debian's QEMU looks for its loadable modules (meson's qemu_moddir,
# fixed at build time, the same path in 7.2 and 11.1).
MODULE_DIR = "/usr/lib/x86_64-linux-gnu/qemu"
# The root's own dynamic loader: a real file in trixie's libc6 (2.41), unlike
# /lib64/ld-linux-x86-64.so.2, a symlink that outside the root could lead to
# the host's loader, too old for trixie's libc.
LOADER = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
LIBRARY_PATH = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")
STAMP = "hostrelay.json"

# Runs inside ``unshare -m``: bind the root's QEMU modules over the host's
# path, then become QEMU.  Debian's QEMU loads modules (hw-display-*,
# accel-tcg-*, ...) from MODULE_DIR; QEMU 11.1 loading the host's 7.2 modules
# fails "Only modules from the same build can be loaded" and then asserts.
# The mount lives only in this process's private mount namespace.
_BIND_AND_EXEC = (
    'if [ -d "$2" ]; then mount --bind "$1" "$2" || '
    '{ echo "hostrelay: cannot bind-mount $1 over $2 (needs root)" >&2; exit 1; }; fi; '
    'shift 2; exec "$@"'
)
# Runs inside ``unshare -m``: proc, sys and dev for apt and dpkg's maintainer
# scripts, gone with the namespace when the command exits.
_MOUNT_AND_CHROOT = (
    'r="$1"; shift; mount -t proc proc "$r/proc" && mount -t sysfs sysfs "$r/sys" && '
    'mount --bind /dev "$r/dev" && exec chroot "$r" "$@"'
)
_CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}


@dataclass(frozen=True)
class NewerQemu:
    """A provisioned root with the newer QEMU in it."""

    root: Path
    version: str  # what ``qemu-system-x86_64 -version`` says, e.g. "11.1.3"
    package_version: str  # the Debian package's, e.g. "1:11.1.3+ds-1~bpo13+1"

    @property
    def major(self) -> int:
        """QEMU's major version number."""
        return int(self.version.split(".")[0])

    def command(self) -> list[str]:
        """The argv prefix that runs this QEMU (see :func:`qemu_command`)."""
        return qemu_command(self.root)


def _recipe() -> str:
    """What a root is made from: a change to any of it means provisioning again."""
    return hashlib.sha256(f"{RELEASE}\n{SUITE}\n{PACKAGE}\nminbase\n".encode()).hexdigest()[:16]


def _home(cache: Path | None) -> Path:
    return (cache or cache_dir()) / "qemu-newer"


def qemu_command(root: Path) -> list[str]:
    """The argv prefix running ``root``'s ``qemu-system-x86_64``; append QEMU's own arguments.

    No chroot, so QEMU still sees the host's files (the testbed shares ``/``
    over 9p): the root's own loader runs the root's binary with the root's
    libraries (``ld.so --library-path``), ``-L`` points at the root's firmware
    (``usr/share/qemu``, and ``usr/share/seabios``, as Debian's
    ``bios-256k.bin`` there is an absolute symlink into it), and everything
    runs in ``unshare -m --propagation private`` with the root's module
    directory bind-mounted over the host's.  That mount needs root, which the
    testbed runner has.
    """
    libs = ":".join(str(root / p) for p in LIBRARY_PATH)
    return [
        "unshare", "-m", "--propagation", "private",
        "sh", "-c", _BIND_AND_EXEC, "sh", str(root / MODULE_DIR.lstrip("/")), MODULE_DIR,
        str(root / LOADER), "--library-path", libs, str(root / "usr/bin/qemu-system-x86_64"),
        "-L", str(root / "usr/share/qemu"), "-L", str(root / "usr/share/seabios"),
    ]  # fmt: skip


def cached_newer_qemu(cache: Path | None = None) -> NewerQemu | None:
    """The root provisioned earlier with today's recipe, if any."""
    root = _home(cache) / "root"
    try:
        meta = json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("recipe") != _recipe() or not (root / LOADER).exists():
        return None
    return NewerQemu(root, str(meta["qemu_version"]), str(meta["package_version"]))


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace."""
    prefix = str(path.resolve())
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def _remove_tree(path: Path) -> None:
    """rmtree, but never through a mount (a bind-mounted /dev would lose the host's nodes)."""
    mounted = _mounts_under(path)
    if mounted:
        raise TestbedSetupError(f"refusing to remove {path}: still mounted there: {', '.join(mounted)}")
    shutil.rmtree(path, ignore_errors=True)


def _run_step(step: str, cmd: list[str], log: Callable[[str], None] | None, *,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> str:  # fmt: skip
    """Run one provisioning step, logging its latest line every 15 s; its output, or an error naming the step."""
    started = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", env=env, cwd=cwd)  # fmt: skip
    except OSError as exc:
        raise TestbedSetupError(f"newer QEMU: {step} failed: cannot run {cmd[0]}: {exc}") from exc
    assert proc.stdout is not None
    lines: list[str] = []
    last = started
    for line in proc.stdout:
        lines.append(line)
        now = time.monotonic()
        if log and now - last >= 15 and line.strip():
            log(f"testbed: newer QEMU: {step}: {line.strip()[:100]} ({int(now - started)} s)")
            last = now
    if proc.wait() != 0:
        tail = "".join(lines[-40:]).strip()
        raise TestbedSetupError(f"newer QEMU: {step} failed (exit {proc.returncode}):\n{tail}")
    return "".join(lines)


def _debian_mirror() -> str:
    """The host's Debian mirror (from its apt sources): debootstrap fetches trixie from it."""
    for line in apt_sources(""):
        return line.split()[1]
    raise TestbedSetupError("newer QEMU: cannot find a Debian mirror in /etc/apt to fetch trixie from")


def _fetch_debootstrap(work: Path, log: Callable[[str], None] | None) -> tuple[Path, Path]:
    """debootstrap from the host's own suite, unpacked (not installed): (script, DEBOOTSTRAP_DIR)."""
    sources = apt_sources("")
    if not sources:
        raise TestbedSetupError("newer QEMU: cannot find a Debian mirror in /etc/apt to fetch debootstrap from")
    if log:
        log("testbed: newer QEMU: fetching debootstrap (apt-get download)")
    apt = PrivateApt(work / "apt", sources)
    try:
        apt.run("apt-get", "update")
        apt.run("apt-get", "download", "debootstrap")
    except TestbedSetupError as exc:
        raise TestbedSetupError(f"newer QEMU: fetching debootstrap failed: {exc}") from exc
    debs = sorted((work / "apt").glob("debootstrap_*.deb"))
    if not debs:
        raise TestbedSetupError("newer QEMU: apt-get download debootstrap produced no .deb")
    unpacked = work / "debootstrap"
    _run_step("unpacking debootstrap", ["dpkg-deb", "-x", str(debs[0]), str(unpacked)], None)
    return unpacked / "usr/sbin/debootstrap", unpacked / "usr/share/debootstrap"


def _need_tools() -> None:
    # debootstrap downloads with wget (bookworm's 1.0.128); unshare and mount are util-linux.
    missing = [pkg for tool, pkg in (("unshare", "util-linux"), ("wget", "wget"), ("dpkg-deb", "dpkg"),
                                     ("chroot", "coreutils")) if shutil.which(tool) is None]  # fmt: skip
    if missing:
        raise TestbedSetupError(f"the newer QEMU needs {', '.join(missing)}: apt-get install {' '.join(missing)}")
    if os.geteuid() != 0:
        raise TestbedSetupError("the newer QEMU is provisioned (debootstrap, chroot) and run (a bind mount) as root")


def query_version(command: list[str]) -> str:
    """QEMU's version from ``-version`` ("QEMU emulator version 11.1.3 (Debian ...)")."""
    out = _run_step("running the newer QEMU (-version)", [*command, "-version"], None)
    match = re.search(r"QEMU emulator version (\d+\.\d+(?:\.\d+)?)", out)
    if match is None:
        raise TestbedSetupError(f"newer QEMU: -version said nothing recognisable:\n{out[-2000:]}")
    return match.group(1)


@contextlib.contextmanager
def _lock(home: Path) -> Iterator[None]:
    """One provisioning at a time per cache (two test runs starting together)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def provision_newer_qemu(cache: Path | None = None, *, log: Callable[[str], None] | None = None) -> NewerQemu:
    """The newer QEMU: cached, or provisioned now (first run only, about a minute; progress on ``log``)."""
    found = cached_newer_qemu(cache)
    if found is not None:
        return found
    home = _home(cache)
    with _lock(home):
        found = cached_newer_qemu(cache)  # another process may have finished it meanwhile
        if found is not None:
            return found
        _need_tools()
        mirror = _debian_mirror()
        started = time.monotonic()
        if log:
            log(f"testbed: provisioning the newer QEMU ({PACKAGE} from {SUITE}) in {home} (first run only, ~1 min)")
        work = Path(tempfile.mkdtemp(prefix="build-", dir=home))
        try:
            script, scripts_dir = _fetch_debootstrap(work, log)
            root = work / "root"
            if log:
                log(f"testbed: newer QEMU: debootstrap --variant=minbase {RELEASE} from {mirror}")
            env = dict(_CHROOT_ENV, DEBOOTSTRAP_DIR=str(scripts_dir))
            # In a private mount namespace: what debootstrap mounts in the root
            # (proc, sys) cannot outlive it, even if it is killed.
            _run_step("debootstrap", ["unshare", "-m", "--propagation", "private", str(script), "--variant=minbase",
                                      RELEASE, str(root), mirror], log, env=env)  # fmt: skip
            (root / "etc/apt/sources.list.d" / f"{SUITE}.list").write_text(f"deb {mirror} {SUITE} main\n")
            chroot = ["unshare", "-m", "--propagation", "private", "sh", "-c", _MOUNT_AND_CHROOT, "sh", str(root)]
            if log:
                log(f"testbed: newer QEMU: apt-get install -t {SUITE} {PACKAGE} in the root")
            _run_step(f"apt-get update in the root ({SUITE})", [*chroot, "apt-get", "-q", "update"], log, env=_CHROOT_ENV)
            _run_step(f"apt-get install -t {SUITE} {PACKAGE}", [*chroot, "apt-get", "-q", "install", "-y", "-t", SUITE,
                      "--no-install-recommends", PACKAGE], log, env=_CHROOT_ENV)  # fmt: skip
            package_version = _run_step("dpkg-query", [*chroot, "dpkg-query", "-W", "-f", "${Version}", PACKAGE],
                                        None, env=_CHROOT_ENV).strip()  # fmt: skip
            _run_step("apt-get clean", [*chroot, "apt-get", "clean"], None, env=_CHROOT_ENV)
            for sub in ("var/lib/apt/lists", "var/cache/apt"):
                for child in (root / sub).iterdir():
                    _remove_tree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            version = query_version(qemu_command(root))
            seconds = time.monotonic() - started
            (root / STAMP).write_text(json.dumps({"qemu_version": version, "package": PACKAGE, "suite": SUITE,
                                                  "package_version": package_version, "recipe": _recipe(),
                                                  "provision_seconds": round(seconds, 1)}))  # fmt: skip
            target = home / "root"
            if target.exists():  # a root from an older recipe: out of the way first
                old = home / f"old-{os.getpid()}"
                os.rename(target, old)
                _remove_tree(old)
            os.rename(root, target)  # atomic: a root is either complete (with its stamp) or absent
        finally:
            _remove_tree(work)
        if log:
            log(f"testbed: newer QEMU {version} ready in {seconds:.0f} s")
    found = cached_newer_qemu(cache)
    assert found is not None
    return found
