"""The testbed's initramfs: a static busybox, the modules and an init script.

The init loads the modules (with ``module.param=value`` taken from the kernel
command line, as modprobe would), mounts the host's root over 9p read-only
under a tmpfs overlay, and runs the command in a chroot there, so the host's
own Python and virtualenv run unchanged.  Results come back through a second,
writable 9p share (``xfer``): ``output`` (stdout+stderr), ``started`` (guest
uptime when the command began) and ``rc`` (its exit status).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import subprocess
import tempfile
from pathlib import Path

from hostrelay.testbed.kernel import KernelImage, TestbedSetupError, cache_dir, resolve_load_order

__all__ = ["build_initramfs", "find_busybox", "XFER_MOUNT"]

# Where the xfer share is mounted inside the chroot (the command sees it here).
XFER_MOUNT = "/run/hostrelay-testbed"

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /lower /rw /newroot /usr/bin /sbin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "hostrelay-testbed: $*" > /dev/console; }

# module.param=value on the kernel command line applies to modules loaded
# later, but only modprobe reads /proc/cmdline; insmod needs them spelled out.
params_for() {
    for tok in $(cat /proc/cmdline); do
        case "$tok" in
        *.*=*)
            m=$(echo "${tok%%.*}" | tr - _)
            [ "$m" = "$1" ] && printf '%s ' "${tok#*.}"
            ;;
        esac
    done
}
while read -r name file; do
    insmod "/modules/$file" $(params_for "$name") || say "insmod $name failed"
done < /modules.list

# virtio-iommu as a module: PCI devices enumerated before it probed have no
# IOMMU group (Linux 6.12); remove and rescan them so they get one.  Bridges
# and virtio devices (the 9p transports, the virtio-iommu itself) stay.
if [ -d /sys/bus/virtio/drivers/virtio_iommu ]; then
    rescan=0
    for d in /sys/bus/pci/devices/*; do
        [ -e "$d/iommu_group" ] && continue
        case "$(cat "$d/class")" in 0x06*) continue ;; esac
        [ "$(cat "$d/vendor")" = "0x1af4" ] && continue
        echo 1 > "$d/remove"
        rescan=1
    done
    [ "$rescan" = 1 ] && echo 1 > /sys/bus/pci/rescan
fi

mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower || say "9p root mount failed"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || say "overlay mount failed"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm /newroot/XFER_MOUNT
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 xfer /newroot/XFER_MOUNT || say "xfer mount failed"
X=/newroot/XFER_MOUNT
cut -d' ' -f1 /proc/uptime > $X/started
chroot /newroot /bin/sh XFER_MOUNT/cmd.sh > $X/output 2>&1 < /dev/null
echo $? > $X/rc
sync
poweroff -f
""".replace("XFER_MOUNT", XFER_MOUNT.lstrip("/"))


def _is_static_elf(path: Path) -> bool:
    """True if ``path`` is an ELF executable without a PT_INTERP (statically linked)."""
    data = path.read_bytes()[:4096]
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit ELF only
        return False
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(data):
            break
        if int.from_bytes(data[off : off + 4], "little") == 3:  # PT_INTERP
            return False
    return True


def find_busybox() -> Path:
    """A statically linked busybox: the host's (``busybox-static``), else fetched.

    A dynamically linked busybox cannot run in the initramfs (no libc there).
    """
    for candidate in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if candidate.is_file() and _is_static_elf(candidate):
            return candidate
    cached = cache_dir() / "busybox" / "bin" / "busybox"
    if cached.is_file():
        return cached
    apt = shutil.which("apt-get")
    if apt is None:
        raise TestbedSetupError("no static busybox: install the 'busybox-static' package")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([apt, "-q", "download", "busybox-static"], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("busybox-static_*.deb"))
        if proc.returncode != 0 or not debs:
            raise TestbedSetupError(f"no static busybox: install the 'busybox-static' package ({proc.stderr.strip()})")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")], check=True)
        cached.parent.mkdir(parents=True, exist_ok=True)
        for src in (Path(tmp) / "x" / "bin" / "busybox", Path(tmp) / "x" / "usr" / "bin" / "busybox"):
            if src.exists():
                shutil.copy2(src, cached)
                return cached
    raise TestbedSetupError("busybox-static package has no busybox binary")


class _Cpio:
    """Writer for the ``newc`` cpio format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(
            f"{v:08x}"
            for v in (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        )
        self.ino += 1
        self.buf.write(header.encode() + encoded)
        self.buf.write(b"\0" * (-(110 + len(encoded)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def build_initramfs(kernel: KernelImage, iommu: str, wanted: tuple[str, ...]) -> Path:
    """Build (or reuse from the cache) the gzip'd initramfs for ``kernel``."""
    modules = resolve_load_order(kernel, wanted)
    busybox = find_busybox().read_bytes()
    digest = hashlib.sha256()
    for part in (INIT_SCRIPT.encode(), busybox, kernel.release.encode(), kernel.origin.encode(), iommu.encode()):
        digest.update(hashlib.sha256(part).digest())
    for name, data in modules:
        digest.update(name.encode() + hashlib.sha256(data).digest())
    cached = cache_dir() / "initramfs" / f"{digest.hexdigest()[:24]}.cpio.gz"
    if cached.is_file():
        return cached
    cpio = _Cpio()
    for d in ("bin", "modules", "proc", "sys", "dev", "lower", "rw", "newroot"):
        cpio.dir(d)
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    listing = []
    for name, data in modules:
        cpio.file(f"modules/{name}.ko", data)
        listing.append(f"{name} {name}.ko")
    cpio.file("modules.list", ("\n".join(listing) + "\n").encode())
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(cpio.finish(), compresslevel=1))
    tmp.replace(cached)
    return cached
