"""The testbed with hostrelay as the guest's only IOMMU (``testbed run --qemu newer --served-iommu``).

The host side of such a boot, around the VM:

- ``hostrelay serve`` runs as a subprocess (the real CLI, nothing
  in-process): the virtio-iommu over vhost-user on one socket, and one
  emulated ``edu`` per ``--served-edu`` over vfio-user on others, all on one
  relay, with ``--record`` keeping every request and reply.  Its log and
  its recording are written into the run's ``xfer`` directory, which the
  guest sees (``$HOSTRELAY_TESTBED_XFER/served.log``, ``served-record.jsonl``)
  and which comes back in :attr:`TestbedResult.files` once the VM has ended
  and the server has been stopped with SIGTERM (so the recording's last line,
  the final table, is there).
- a VIOT (:mod:`hostrelay.firmware.viot`) naming the vhost-user function as
  a virtio-pci IOMMU and one PCI range per edu, each covering exactly that
  function (a range spanning several BDFs would also claim the functions
  between them).
- QEMU's side: guest RAM in a shared memfd (both back ends map it), the
  ``vhost-user-test-device-pci`` (virtio ID 23, two queues, 40 config bytes)
  and a ``vfio-user-pci`` per edu, at fixed addresses the VIOT and the edu
  endpoint IDs agree on, and ``-acpitable file=VIOT``.  No ``virtio-iommu-pci``
  and no ``intel-iommu``: QEMU has no IOMMU of its own, so its vfio-user
  client maps all guest RAM at IOVA = GPA and every translation is the
  relay's.

QEMU 11.1 (the newer-QEMU tier) has all three devices; 7.2 has none of the
client sides.  The guest kernel is the ``virtio`` flavour's (Linux 6.12,
``virtio_iommu`` a module loaded before the PCI endpoints are rescanned; see
:mod:`hostrelay.testbed.initramfs`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hostrelay.firmware.viot import Bdf, PciRange, ViotTable, VirtioPciIommu, build
from hostrelay.testbed.kernel import TestbedSetupError

__all__ = [
    "IOMMU_BDF",
    "LOG_NAME",
    "MAX_SERVED_EDU",
    "RECORD_NAME",
    "ServedIommu",
    "edu_bdfs",
    "qemu_args",
    "viot_table",
]

#: Where the vhost-user virtio-iommu sits in the guest.  Slots above every
#: device the testbed places without an address (QEMU gives those the lowest
#: free slots in command-line order: at most 2 9p transports, 8 nvme, 8
#: hotplug ports and a bridge port, slots 1 to 0x13).
IOMMU_BDF = "00:14.0"
#: The first served edu; the others follow one slot each.
FIRST_EDU_SLOT = 0x15
#: Up to slot 0x1c (q35's ICH9 functions are at 0x1f).
MAX_SERVED_EDU = 8
#: The server's log and recording, in the xfer directory (guest-visible, returned in ``files``).
LOG_NAME = "served.log"
RECORD_NAME = "served-record.jsonl"
# chardev id of the vhost-user socket.
_CHARDEV = "hrviommu"
# How long the server gets to listen, and to end after SIGTERM.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


def edu_bdfs(count: int) -> list[str]:
    """The guest PCI addresses of ``count`` served edus (``00:15.0``, ``00:16.0``, ...)."""
    if not 0 <= count <= MAX_SERVED_EDU:
        raise ValueError(f"served edu count must be 0..{MAX_SERVED_EDU}, not {count}")
    return [f"00:{FIRST_EDU_SLOT + i:02x}.0" for i in range(count)]


def viot_table(edus: list[str]) -> ViotTable:
    """The VIOT: our virtio-iommu, and one single-function range per edu (endpoint ID = requester ID)."""
    ranges = tuple(PciRange.between(Bdf.parse(b), Bdf.parse(b)) for b in edus)
    return ViotTable((VirtioPciIommu(Bdf.parse(IOMMU_BDF)),), ranges)


def _slot(bdf: str) -> str:
    b = Bdf.parse(bdf)
    return f"{b.device:#x}.{b.function}"


def qemu_args(vhost_user_socket: Path, edu_sockets: list[tuple[Path, str]], viot: Path) -> list[str]:
    """QEMU options for the served devices (shared memory is the testbed's ``shared_memory``)."""
    args = ["-chardev", f"socket,id={_CHARDEV},path={vhost_user_socket}",
            # virtio-id=23 is virtio-iommu (virtio 1.2 §5.13); QEMU 11.1's
            # vhost-user-test-device-pci refuses a config_size without the
            # back end's CONFIG protocol feature, which hostrelay offers.
            "-device", f"vhost-user-test-device-pci,chardev={_CHARDEV},virtio-id=23,num_vqs=2,config_size=40,"
                       f"addr={_slot(IOMMU_BDF)}"]  # fmt: skip
    for path, bdf in edu_sockets:
        # QEMU >= 10.1: "socket" is a SocketAddress, so the device is given in JSON.
        device = {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(path)}, "addr": _slot(bdf)}
        args += ["-device", json.dumps(device, separators=(",", ":"))]
    return [*args, "-acpitable", f"file={viot}"]


@dataclass
class ServedIommu:
    """``hostrelay serve`` for one testbed boot: start it, hand QEMU its args, stop it.

    ``run_dir`` holds the sockets and the VIOT (short paths: a Unix socket
    path has 108 bytes); ``xfer`` gets the log and the recording.
    """

    run_dir: Path
    xfer: Path
    edu_count: int = 1
    # --record (the recording comes back in the run's files).
    record: bool = True
    proc: subprocess.Popen[bytes] | None = None

    @property
    def vhost_user_socket(self) -> Path:
        return self.run_dir / "viommu.sock"

    @property
    def edu_sockets(self) -> list[tuple[Path, str]]:
        return [(self.run_dir / f"edu{i}.sock", bdf) for i, bdf in enumerate(edu_bdfs(self.edu_count))]

    @property
    def viot(self) -> Path:
        return self.run_dir / "viot.bin"

    @property
    def log_path(self) -> Path:
        return self.xfer / LOG_NAME

    @property
    def record_path(self) -> Path:
        return self.xfer / RECORD_NAME

    def command(self) -> list[str]:
        """The ``hostrelay serve`` command line (this interpreter, so the same install)."""
        cmd = [sys.executable, "-m", "hostrelay.cli", "serve", "--vhost-user", str(self.vhost_user_socket)]
        for path, bdf in self.edu_sockets:
            cmd += ["--edu", f"{path}@{bdf}"]
        if self.record:
            cmd += ["--record", str(self.record_path)]
        return [*cmd, "-v"]

    def log_tail(self, limit: int = 4000) -> str:
        """The end of the server's log (for error messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def start(self) -> list[str]:
        """Write the VIOT, start the server, wait until every socket listens; return QEMU's extra args.

        Raises :class:`TestbedSetupError` with the server's log if it exits
        or does not listen within :data:`START_TIMEOUT` seconds.
        """
        self.viot.write_bytes(build(viot_table(edu_bdfs(self.edu_count))))
        sockets = [self.vhost_user_socket, *(p for p, _ in self.edu_sockets)]
        with open(self.log_path, "wb") as log:
            # Its own process group: a ^C at the terminal reaches the testbed,
            # which stops the server itself (SIGTERM) after QEMU.
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not all(p.is_socket() for p in sockets):
            if self.proc.poll() is not None:
                raise TestbedSetupError(f"hostrelay serve exited {self.proc.returncode} before listening:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TestbedSetupError(f"hostrelay serve did not listen on {len(sockets)} sockets in "
                                        f"{START_TIMEOUT:.0f} s:\n{self.log_tail()}")  # fmt: skip
            time.sleep(0.05)
        return qemu_args(self.vhost_user_socket, self.edu_sockets, self.viot)

    def exited_early(self) -> str | None:
        """Why the VM cannot go on: the server died while it ran (None if it is still up)."""
        if self.proc is None or self.proc.poll() is None:
            return None
        return f"hostrelay serve exited {self.proc.returncode} while the VM ran:\n{self.log_tail()}"

    def stop(self) -> int | None:
        """SIGTERM, then wait (SIGKILL after :data:`STOP_TIMEOUT` s); the exit status, None if never started."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode
