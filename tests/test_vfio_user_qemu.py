"""The vfio-user edu server against QEMU 11.1's real ``vfio-user-pci`` client.

Host side: this test runs an :class:`EduServer` (a relay in bypass with the
edu's endpoint) on a thread of its own, the relay process's one
:class:`Loop`, while the testbed boots QEMU 11.1 with guest RAM in a shared
memfd and ``-device vfio-user-pci`` on the server's socket.  Guest side
(tests/vfio_user_guest.py): the function is bound to vfio-pci and driven with
the unchanged ``hostrelay.drivers.edu`` through the guest's VFIO.

No virtio-iommu of ours here: the guest's IOMMU is QEMU's emulated intel-iommu,
so QEMU's client sends DMA_MAP/DMA_UNMAP per guest IOVA mapping
(hw/vfio/listener.c's vIOMMU notifier) instead of guest RAM at GPA, and the
relay's bypass makes the server's DMA address that IOVA.  What it proves: the
protocol as QEMU speaks it (version, device/region/IRQ info, config and BAR0
through REGION_READ/WRITE, DMA maps with the memfd), edu's register interface
as the driver uses it, DMA landing in guest RAM through the maps, and no
landing once QEMU has unmapped.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from hostrelay import GuestMemory, Relay
from hostrelay.frontends.loop import Loop
from hostrelay.frontends.vfio_user import EduServer, endpoint_id_of

pytestmark = [
    pytest.mark.skipif(bool(os.environ.get("HOSTRELAY_TESTBED")), reason="boots the testbed from the host"),
    pytest.mark.host_boot,
]

BDF = "00:05.0"  # where -device vfio-user-pci,addr=0x5 puts it in the guest


def _need_newer_qemu() -> None:
    from hostrelay.testbed.qemu_newer import cached_newer_qemu

    must = os.environ.get("CI") == "true" or os.environ.get("HOSTRELAY_REQUIRE_VFIO") == "1"
    why = None
    if os.geteuid() != 0:
        why = "the newer-QEMU testbed needs root (a private mount namespace)"
    elif cached_newer_qemu() is None and not must:
        why = "the newer QEMU is not provisioned (hostrelay testbed run --qemu newer -- true does it once)"
    if why:
        if must:
            pytest.fail(why)
        pytest.skip(why)


def test_qemu_vfio_user_pci_drives_the_edu_and_its_dma_lands_in_guest_ram() -> None:
    from hostrelay.testbed import TestbedConfig, run

    _need_newer_qemu()
    tmp = Path(tempfile.mkdtemp(prefix="hr-vfu-"))  # short: sun_path is 108 bytes
    sock = tmp / "edu.sock"
    relay = Relay(GuestMemory(), bypass=True)
    endpoint = endpoint_id_of(BDF)
    relay.add_endpoint(endpoint)
    loop = Loop()
    server = EduServer(relay, sock, endpoint, loop)
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, kwargs={"until": stop.is_set}, name="vfio-user loop", daemon=True)
    thread.start()
    try:
        # QEMU 10.1+: "socket" is a SocketAddress, given in JSON (docs/system/devices/vfio-user.rst).
        device = json.dumps({"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(sock)}, "addr": "0x5"})
        config = TestbedConfig(qemu="newer", shared_memory=True, edu=0, memory_mb=1024,
                               extra_qemu_args=("-device", device))  # fmt: skip
        result = run([sys.executable, str(Path(__file__).with_name("vfio_user_guest.py"))], config,
                     timeout=600, cwd=Path(__file__).parent.parent, log=print)  # fmt: skip
    finally:
        stop.set()
        thread.join(timeout=10)
    try:
        assert result.returncode == 0, f"guest failed:\n{result.output}\n--- console ---\n{result.console[-3000:]}"
        line = next(ln for ln in result.output.splitlines() if ln.startswith("RESULT "))
        seen = json.loads(line[len("RESULT "):])
        assert seen["found"] == ["0000:" + BDF]  # the vfio-user function, at the address its endpoint ID is of
        assert seen["id"] == 0x010000ED
        assert seen["round_trip"], "RAM -> edu -> RAM through vfio-user did not bring the pattern back"
        assert seen["after_unmap_untouched"], "a device write landed after the guest unmapped"
        assert server.clients == 1 and server.edu.transfers == 2
        assert any("refused" in r for r in server.edu.refusals)  # the post-unmap write: QEMU had unmapped it
        assert relay.pop_events() == []  # bypass: the relay translated everything
    finally:
        server.close()
        loop.close()
        shutil.rmtree(tmp, ignore_errors=True)
