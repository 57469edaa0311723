"""The vhost-user back end against the real QEMU: a guest's virtio_iommu driver binds it.

The host-side test process serves a relay on a Unix socket (a thread with
its own Loop) and boots the testbed with QEMU 11.1 (the newer-QEMU tier),
guest RAM in a shared memfd and ``vhost-user-test-device-pci`` pointing at
the socket.  Inside the guest, Linux's virtio_iommu driver binds the
function (1af4:1057) and prints the config it read from this relay: input
range and page mask, chosen to differ from anything QEMU's own
virtio-iommu-pci (the testbed's ``virtio`` flavour, whose initramfs loads
the driver) reports.  With no VIOT naming our device it manages no
endpoint; the rings still start and stop (GET_VRING_BASE at poweroff).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from hostrelay.backends.memory import GuestMemory
from hostrelay.frontends.loop import Loop
from hostrelay.frontends.vhost_user import VhostUserServer, serve
from hostrelay.relay import Relay

pytestmark = [
    pytest.mark.skipif(bool(os.environ.get("HOSTRELAY_TESTBED")), reason="boots the testbed; not nested inside it"),
    pytest.mark.host_boot,
]

INPUT_BITS = 40
PAGE_MASK = 0x40201000  # 4K, 2M and 1G: no host IOMMU constrains an emulated-only relay

# Runs inside the guest: what the driver printed and which driver each virtio device has.
GUEST = r"""
dmesg | grep -i 'virtio_iommu' || true
for d in /sys/bus/virtio/devices/*; do
  echo "virtio-dev $(basename $d) id=$(cat $d/device) driver=$(basename "$(readlink $d/driver)")"
done
"""


def test_qemu_guest_driver_binds_the_vhost_user_device(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    try:
        from hostrelay.testbed import TestbedConfig, TestbedSetupError, run
        from hostrelay.testbed.qemu_newer import cached_newer_qemu
    except ImportError:
        pytest.skip("this build has no newer-QEMU testbed tier")
    if os.geteuid() != 0 or cached_newer_qemu() is None:
        pytest.skip("the newer QEMU is not provisioned here (hostrelay testbed run --qemu newer, as root)")
    caplog.set_level(logging.INFO, logger="hostrelay.frontends.vhost_user")
    sock = tmp_path / "viommu.sock"
    relay = Relay(GuestMemory(), input_range=(0, (1 << INPUT_BITS) - 1), page_size_mask=PAGE_MASK)
    loop = Loop()
    listening = threading.Event()
    servers: list[VhostUserServer] = []

    def ready(server: VhostUserServer) -> None:
        servers.append(server)
        listening.set()

    thread = threading.Thread(target=serve, args=(sock, relay),
                              kwargs={"handle_signals": False, "ready": ready, "loop": loop}, daemon=True)  # fmt: skip
    thread.start()
    assert listening.wait(10), "the server did not start listening"
    cfg = TestbedConfig(
        iommu="virtio", qemu="newer", shared_memory=True,
        extra_qemu_args=("-chardev", f"socket,id=c0,path={sock}",
                         "-device", "vhost-user-test-device-pci,chardev=c0,virtio-id=23,num_vqs=2,config_size=40"),
    )  # fmt: skip
    try:
        result = run(["sh", "-c", GUEST], cfg, timeout=600)
    except TestbedSetupError as exc:
        pytest.skip(f"testbed: {exc}")
    finally:
        loop.stop()
        thread.join(10)
    out = result.output
    print(out)
    assert result.returncode == 0, out
    assert result.qemu.startswith("newer 11."), result.qemu
    # Ours is the one whose config says 40 bits and this page mask.
    assert f"input address: {INPUT_BITS} bits" in out, out
    assert f"page mask: {PAGE_MASK:#x}" in out, out
    bound = [line for line in out.splitlines() if line.startswith("virtio-dev") and "id=0x0017" in line]
    assert len(bound) == 2 and all("driver=virtio_iommu" in line for line in bound), bound
    assert servers and servers[0].served >= 1
    # The guest started the rings and QEMU stopped them at poweroff.
    assert "rings stopped, device reset" in caplog.text, caplog.text
    assert "disconnecting" not in caplog.text, caplog.text
    relay.close()
    relay.memory.close()
