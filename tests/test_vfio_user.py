"""The vfio-user edu server, driven by a fake vfio-user client over a socketpair.

The client speaks the protocol of QEMU's docs/interop/vfio-user.rst the way
QEMU's hw/vfio-user client does (VERSION with its capabilities, DMA_MAP of a
guest-RAM memfd with IOVA = GPA, REGION_READ/WRITE of BAR0 and config).  The
relay behind the server is a real :class:`hostrelay.Relay`: domains and
mappings are made with real virtio-iommu requests through ``handle_request``.
The same server against QEMU 11's real client is tests/test_vfio_user_qemu.py.
"""

from __future__ import annotations

import array
import errno
import hashlib
import json
import os
import select
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostrelay import GuestMemory, Relay
from hostrelay.frontends import vfio_user_wire as w
from hostrelay.frontends.edu_model import DMA_BUFFER
from hostrelay.frontends.loop import Loop
from hostrelay.frontends.vfio_user import MAX_MSG_FDS, EduServer, endpoint_id_of
from hostrelay.model.status import TranslationFault
from hostrelay.model.wire import AttachRequest, Fault, FaultFlag, FaultReason, MapFlag, MapRequest, Status

MiB = 1 << 20
RAM = 16 * MiB
EP = endpoint_id_of("00:04.0")
# What QEMU 11's client proposes (hw/vfio-user/proxy.c caps_json).
QEMU_CAPS = {"capabilities": {"migration": {"pgsize": 4096, "max_bitmap_size": 268435456}, "max_msg_fds": 16,
                              "max_data_xfer_size": 1048576, "pgsizes": 4096, "max_dma_maps": 65535,
                              "write_multiple": True}}  # fmt: skip


class Client:
    """A vfio-user client: messages out over its end, replies back, the server's loop pumped between."""

    def __init__(self, sock: socket.socket, loop: Loop) -> None:
        self.sock = sock
        self.loop = loop
        self.next_id = 1

    def send_raw(self, data: bytes, fds: list[int] = (), *, keep: bool = False) -> None:  # type: ignore[assignment]
        """Send; the fds are handed over (closed here once sent) unless ``keep``."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        self.sock.sendmsg([data], anc)
        if not keep:
            for fd in fds:
                os.close(fd)

    def send(self, cmd: int, payload: bytes = b"", fds: list[int] = (), *, flags: int = 0) -> int:  # type: ignore[assignment]
        msg_id = self.next_id
        self.next_id += 1
        self.send_raw(w.Header(msg_id, cmd, w.HEADER_SIZE + len(payload), flags).pack() + payload, list(fds))
        return msg_id

    def pump(self, timeout: float = 2.0) -> bool:
        """Run the server until a reply (or EOF) is waiting here; False if none came."""
        for _ in range(int(timeout / 0.01)):
            self.loop.run_once(0)
            if select.select([self.sock], [], [], 0.01)[0]:
                return True
        return False

    def recv(self) -> tuple[w.Header, bytes]:
        assert self.pump(), "no reply"
        head = self.sock.recv(w.HEADER_SIZE, socket.MSG_WAITALL)
        assert len(head) == w.HEADER_SIZE, f"EOF instead of a reply ({head!r})"
        hdr = w.Header.unpack(head, 1 << 20)
        body = self.sock.recv(hdr.size - w.HEADER_SIZE, socket.MSG_WAITALL) if hdr.size > w.HEADER_SIZE else b""
        return hdr, body

    def call(self, cmd: int, payload: bytes = b"", fds: list[int] = ()) -> tuple[w.Header, bytes]:  # type: ignore[assignment]
        msg_id = self.send(cmd, payload, fds)
        hdr, body = self.recv()
        assert hdr.msg_id == msg_id and hdr.command == cmd and hdr.is_reply
        return hdr, body

    def ok(self, cmd: int, payload: bytes = b"", fds: list[int] = ()) -> bytes:  # type: ignore[assignment]
        hdr, body = self.call(cmd, payload, fds)
        assert not hdr.flags & w.HeaderFlag.ERROR, f"command {cmd} failed: errno {hdr.error}"
        return body

    def error(self, cmd: int, payload: bytes = b"", fds: list[int] = ()) -> int:  # type: ignore[assignment]
        hdr, body = self.call(cmd, payload, fds)
        assert hdr.flags & w.HeaderFlag.ERROR and body == b""
        return hdr.error

    def version(self) -> w.Version:
        return w.Version.unpack(self.ok(w.Command.VERSION, w.Version(0, 0, QEMU_CAPS["capabilities"]).pack()))

    def closed(self) -> bool:
        """The server hung up (EOF after any pending replies)."""
        self.pump()
        self.sock.settimeout(2)
        try:
            while True:
                chunk = self.sock.recv(4096)
                if not chunk:
                    return True
        except (TimeoutError, BlockingIOError):
            return False
        except ConnectionResetError:
            return True

    # --- regions ---
    def read(self, region: int, offset: int, count: int) -> bytes:
        body = self.ok(w.Command.REGION_READ, w.RegionAccess(offset, region, count).pack())
        reply = w.RegionAccess(*struct.unpack_from("<QII", body), body[16:])
        assert (reply.offset, reply.region, reply.count) == (offset, region, count)
        return reply.data

    def write(self, region: int, offset: int, data: bytes) -> None:
        body = self.ok(w.Command.REGION_WRITE, w.RegionAccess(offset, region, len(data), data).pack())
        assert body == w.RegionAccess(offset, region, len(data)).pack()

    def dma_map(self, address: int, size: int, fd: int | None, offset: int = 0, flags: int = 3) -> None:
        self.ok(w.Command.DMA_MAP, w.DmaMap(32, flags, offset, address, size).pack(), [fd] if fd is not None else [])


class VfioDevice:
    """What hostrelay.drivers.edu.Edu needs of a hostrelay.kernel.vfio.Device, over the client."""

    name = "vfio-user edu"

    def __init__(self, client: Client) -> None:
        self.client = client

    def read32(self, region: int, offset: int) -> int:
        return int.from_bytes(self.client.read(region, offset, 4), "little")

    def read64(self, region: int, offset: int) -> int:
        return int.from_bytes(self.client.read(region, offset, 8), "little")

    def write64(self, region: int, offset: int, value: int) -> None:
        self.client.write(region, offset, value.to_bytes(8, "little"))

    def enable_bus_master(self) -> None:
        cmd = int.from_bytes(self.client.read(7, 4, 2), "little")
        self.client.write(7, 4, (cmd | 0x6).to_bytes(2, "little"))


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory() as m:
        m.add_region(0, RAM)  # a memfd: what QEMU's memory-backend-memfd,share=on is
        yield m


@pytest.fixture
def relay(memory: GuestMemory) -> Relay:
    r = Relay(memory, bypass=False)
    r.add_endpoint(EP)
    return r


@pytest.fixture
def faults() -> list[TranslationFault]:
    return []


@pytest.fixture
def server(relay: Relay, loop: Loop, faults: list[TranslationFault]) -> Iterator[EduServer]:
    s = EduServer(relay, None, EP, loop, on_fault=faults.append)
    yield s
    s.close()


def connect(server: EduServer, loop: Loop) -> Client:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server.attach(theirs)
    return Client(ours, loop)


@pytest.fixture
def client(server: EduServer, loop: Loop, memory: GuestMemory) -> Client:
    c = connect(server, loop)
    c.version()
    # QEMU maps guest RAM at IOVA = GPA with the backend's fd (hw/vfio-user/container.c).
    c.dma_map(0, RAM, os.dup(memory.regions[0].fd))  # type: ignore[arg-type]
    return c


def send(relay: Relay, req: AttachRequest | MapRequest) -> None:
    out = relay.handle_request(req.pack(), 4)
    assert Status(out[0]) == Status.OK


RW = int(MapFlag.READ | MapFlag.WRITE)


def dma(client: Client, src: int, dst: int, count: int, cmd: int) -> int:
    client.write(0, 0x80, src.to_bytes(8, "little"))
    client.write(0, 0x88, dst.to_bytes(8, "little"))
    client.write(0, 0x90, count.to_bytes(8, "little"))
    client.write(0, 0x98, cmd.to_bytes(8, "little"))
    return int.from_bytes(client.read(0, 0x98, 8), "little")


def digest(memory: GuestMemory) -> str:
    return hashlib.sha256(memory.read(0, RAM)).hexdigest()


# --- helpers and negotiation -------------------------------------------------------------


def test_endpoint_id_is_the_requester_id_with_the_segment_above() -> None:
    assert endpoint_id_of("00:04.0") == 0x20
    assert endpoint_id_of("0000:00:03.0") == 0x18
    assert endpoint_id_of("0001:02:1f.7") == 0x1_02FF
    for bad in ("00:20.0", "00:04", "zz:00.0", "00:04.8", ""):
        with pytest.raises(ValueError):
            endpoint_id_of(bad)


def test_version_reply_is_a_subset_no_longer_than_the_request(server: EduServer, loop: Loop) -> None:
    c = connect(server, loop)
    request = w.Version(0, 3, QEMU_CAPS["capabilities"]).pack()
    hdr, body = c.call(w.Command.VERSION, request)
    assert not hdr.flags & w.HeaderFlag.ERROR
    assert body.endswith(b"\0") and len(body) <= len(request)  # QEMU's reply buffer is its request's
    v = w.Version.unpack(body)
    assert (v.major, v.minor) == (0, 0)
    assert set(v.capabilities) <= set(QEMU_CAPS["capabilities"]) and v.capabilities["max_msg_fds"] == MAX_MSG_FDS
    assert "pgsizes" in v.capabilities and "write_multiple" not in v.capabilities
    # A client proposing no capabilities gets none back.
    c2 = connect_after(server, loop, c)
    assert w.Version.unpack(c2.ok(w.Command.VERSION, struct.pack("<HH", 0, 0))).capabilities == {}


def connect_after(server: EduServer, loop: Loop, old: Client) -> Client:
    old.sock.close()
    for _ in range(20):
        loop.run_once(0.01)
    assert not server.connected
    return connect(server, loop)


def test_device_region_and_irq_info(client: Client) -> None:
    info = w.DeviceInfo.unpack(client.ok(w.Command.DEVICE_GET_INFO, w.DeviceInfo(16).pack()))
    assert info == w.DeviceInfo(16, w.DEVICE_FLAGS_RESET | w.DEVICE_FLAGS_PCI, 9, 5)
    regions = {i: w.RegionInfo.unpack(client.ok(w.Command.DEVICE_GET_REGION_INFO, w.RegionInfo(32, 0, i).pack()))
               for i in range(9)}  # fmt: skip
    assert (regions[0].size, regions[0].flags) == (1 * MiB, 3)
    assert (regions[7].size, regions[7].flags) == (256, 3)
    assert all(regions[i].size == 0 and regions[i].flags == 0 for i in (1, 2, 3, 4, 5, 6, 8))
    assert client.error(w.Command.DEVICE_GET_REGION_INFO, w.RegionInfo(32, 0, 9).pack()) == errno.EINVAL
    assert client.error(w.Command.DEVICE_GET_REGION_INFO, w.RegionInfo(16, 0, 0).pack()) == errno.EINVAL
    irqs = [w.IrqInfo.unpack(client.ok(w.Command.DEVICE_GET_IRQ_INFO, w.IrqInfo(16, 0, i).pack())) for i in range(5)]
    assert irqs[0].count == 1 and irqs[0].flags & w.IRQ_INFO_AUTOMASKED
    assert irqs[1].count == 1 and irqs[1].flags & w.IRQ_INFO_EVENTFD
    assert [i.count for i in irqs[2:]] == [0, 0, 0]
    assert client.error(w.Command.DEVICE_GET_IRQ_INFO, w.IrqInfo(16, 0, 5).pack()) == errno.EINVAL


def test_config_space_is_edus_and_honours_write_masks(client: Client) -> None:
    cfg = client.read(7, 0, 256)
    assert struct.unpack_from("<HH", cfg, 0) == (0x1234, 0x11E8)
    assert cfg[8] == 0x10 and struct.unpack_from("<H", cfg, 0x0A)[0] == 0x00FF  # rev 0x10, class 00ff
    assert cfg[0x06] & 0x10 and cfg[0x34] == 0x40 and cfg[0x3D] == 1  # cap list, MSI at 0x40, INTA#
    assert cfg[0x40] == 0x05 and struct.unpack_from("<H", cfg, 0x42)[0] == 0x0080  # MSI, 64-bit, 1 vector
    client.write(7, 0x10, b"\xff\xff\xff\xff")  # BAR sizing: 1 MiB, 32-bit memory
    assert client.read(7, 0x10, 4) == (0xFFF00000).to_bytes(4, "little")
    client.write(7, 0x00, b"\0\0\0\0")  # IDs are read-only
    assert client.read(7, 0, 4) == bytes.fromhex("3412e811")
    client.write(7, 0x04, b"\x06\x00")
    assert client.read(7, 0x04, 2) == b"\x06\x00"
    assert client.error(w.Command.REGION_READ, w.RegionAccess(250, 7, 8).pack()) == errno.EINVAL
    assert client.error(w.Command.REGION_READ, w.RegionAccess(0, 3, 4).pack()) == errno.EINVAL


def test_bar0_registers(client: Client) -> None:
    assert client.read(0, 0x00, 4) == (0x010000ED).to_bytes(4, "little")
    client.write(0, 0x04, (0x12345678).to_bytes(4, "little"))
    assert client.read(0, 0x04, 4) == (0xEDCBA987).to_bytes(4, "little")  # liveness: inverted
    client.write(0, 0x08, (5).to_bytes(4, "little"))
    assert client.read(0, 0x20, 4)[0] & 1 == 0 and client.read(0, 0x08, 4) == (120).to_bytes(4, "little")
    assert client.read(0, 0x00, 2) == b"\xff\xff"  # below 0x80 only 4-byte accesses are served
    client.write(0, 0x80, (0x1234).to_bytes(4, "little"))  # a 4-byte write sets the whole register
    assert client.read(0, 0x80, 8) == (0x1234).to_bytes(8, "little")
    assert client.error(w.Command.REGION_WRITE, w.RegionAccess(MiB - 2, 0, 4, b"abcd").pack()) == errno.EINVAL


def test_interrupts_intx_automasked_then_msi(client: Client) -> None:
    intx, msi = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        F = w.IrqSetFlag
        client.ok(w.Command.DEVICE_SET_IRQS, w.IrqSet(20, F.DATA_EVENTFD | F.ACTION_TRIGGER, 0, 0, 1).pack(), [os.dup(intx)])
        client.write(0, 0x60, (0x10).to_bytes(4, "little"))  # raise
        assert os.eventfd_read(intx) == 1 and client.read(0, 0x24, 4) == (0x10).to_bytes(4, "little")
        assert client.read(7, 0x06, 1)[0] & 0x08  # status: interrupt pending
        client.write(0, 0x60, (0x20).to_bytes(4, "little"))  # automasked: no second event before UNMASK
        with pytest.raises(BlockingIOError):
            os.eventfd_read(intx)
        client.ok(w.Command.DEVICE_SET_IRQS, w.IrqSet(20, F.DATA_NONE | F.ACTION_UNMASK, 0, 0, 1).pack())
        assert os.eventfd_read(intx) == 1  # still asserted at EOI: fires again
        client.write(0, 0x64, (0x30).to_bytes(4, "little"))  # ack
        assert client.read(0, 0x24, 4) == bytes(4)
        client.ok(w.Command.DEVICE_SET_IRQS, w.IrqSet(20, F.DATA_EVENTFD | F.ACTION_TRIGGER, 1, 0, 1).pack(), [os.dup(msi)])
        client.write(0, 0x60, (1).to_bytes(4, "little"))
        client.write(0, 0x60, (1).to_bytes(4, "little"))
        assert os.eventfd_read(msi) == 2  # MSI: every raise is a message
        with pytest.raises(BlockingIOError):
            os.eventfd_read(intx)
        client.ok(w.Command.DEVICE_SET_IRQS, w.IrqSet(20, F.DATA_NONE | F.ACTION_TRIGGER, 1, 0, 0).pack())  # disable
        assert client.error(w.Command.DEVICE_SET_IRQS, w.IrqSet(20, F.DATA_NONE | F.ACTION_TRIGGER, 2, 0, 1).pack()) == errno.EINVAL
    finally:
        os.close(intx)
        os.close(msi)


# --- DMA through the relay -----------------------------------------------------------------


def test_dma_round_trip_through_relay_mappings_with_the_unchanged_driver(
        client: Client, relay: Relay, memory: GuestMemory, server: EduServer) -> None:  # fmt: skip
    from hostrelay.drivers.edu import Edu

    send(relay, AttachRequest(1, EP))
    send(relay, MapRequest(1, 0x100000, 0x101FFF, 0x200000, RW))  # two pages, contiguous in GPA
    # Two pages adjacent in IOVA but swapped in GPA: a transfer across them is split.
    send(relay, MapRequest(1, 0x300000, 0x300FFF, 0x500000, RW))
    send(relay, MapRequest(1, 0x301000, 0x301FFF, 0x400000, RW))
    pattern = os.urandom(2048)
    memory.write(0x200000, pattern)
    edu = Edu(VfioDevice(client))  # hostrelay.drivers.edu, as it runs against a real edu
    edu.to_device(0x100000, 2048)
    assert bytes(server.edu.buffer[:2048]) == pattern
    edu.from_device(0x101000, 2048)
    assert memory.read(0x201000, 2048) == pattern
    edu.from_device(0x300C00, 2048)
    assert memory.read(0x500C00, 1024) == pattern[:1024] and memory.read(0x400000, 1024) == pattern[1024:]
    assert relay.pop_events() == [] and server.edu.refusals == []


def test_bypass_relay_is_identity(memory: GuestMemory, loop: Loop) -> None:
    relay = Relay(memory, bypass=True)
    relay.add_endpoint(EP)
    server = EduServer(relay, None, EP, loop)
    try:
        c = connect(server, loop)
        c.version()
        c.dma_map(0, RAM, os.dup(memory.regions[0].fd))  # type: ignore[arg-type]
        VfioDevice(c).enable_bus_master()
        memory.write(0x10000, b"bypass!!" * 16)
        assert dma(c, 0x10000, DMA_BUFFER, 128, 0x1) & 1 == 0
        assert dma(c, DMA_BUFFER, 0x20000, 128, 0x3) & 1 == 0
        assert memory.read(0x20000, 128) == b"bypass!!" * 16
    finally:
        server.close()


def test_dma_to_an_unmapped_iova_is_a_fault_record_and_no_access(
        client: Client, relay: Relay, memory: GuestMemory, server: EduServer, faults: list[TranslationFault]) -> None:  # fmt: skip
    send(relay, AttachRequest(1, EP))
    send(relay, MapRequest(1, 0x100000, 0x100FFF, 0x200000, int(MapFlag.READ)))  # read-only
    VfioDevice(client).enable_bus_master()
    server.edu.buffer[:] = b"\xaa" * 4096
    before = digest(memory)
    intx = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        F = w.IrqSetFlag
        client.ok(w.Command.DEVICE_SET_IRQS, w.IrqSet(20, F.DATA_EVENTFD | F.ACTION_TRIGGER, 0, 0, 1).pack(), [os.dup(intx)])
        # device -> RAM at an IOVA with no mapping, raise-IRQ asked: completes, touches nothing.
        assert dma(client, DMA_BUFFER, 0x900000, 256, 0x7) & 1 == 0
        assert os.eventfd_read(intx) == 1  # edu completes as on a bus error (it ignores pci_dma_write's result)
    finally:
        os.close(intx)
    events = [Fault.unpack(e) for e in relay.pop_events()]
    assert events == [Fault(FaultReason.MAPPING, FaultFlag.WRITE | FaultFlag.ADDRESS, EP, 0x900000)]
    assert len(faults) == 1 and faults[0].address == 0x900000 and faults[0].write
    # device -> RAM into the read-only mapping: a permission fault, nothing written.
    assert dma(client, DMA_BUFFER, 0x100000, 256, 0x3) & 1 == 0
    assert [Fault.unpack(e).flags & FaultFlag.WRITE for e in relay.pop_events()] == [FaultFlag.WRITE]
    assert digest(memory) == before
    # A transfer whose second page faults moves no byte of its first page either.
    send(relay, MapRequest(1, 0x600000, 0x600FFF, 0x600000, RW))
    assert dma(client, DMA_BUFFER, 0x600800, 4096, 0x3) & 1 == 0
    assert [Fault.unpack(e).address for e in relay.pop_events()] == [0x601000]
    assert digest(memory) == before and len(faults) == 3


def test_no_dma_without_bus_master_or_outside_edus_buffer_or_dma_mask(
        client: Client, relay: Relay, memory: GuestMemory, server: EduServer) -> None:  # fmt: skip
    send(relay, AttachRequest(1, EP))
    send(relay, MapRequest(1, 0, RAM - 1, 0, RW))
    server.edu.buffer[:] = b"\x55" * 4096
    before = digest(memory)
    assert dma(client, DMA_BUFFER, 0x1000, 64, 0x3) & 1 == 0  # bus master off
    assert "bus mastering is disabled" in server.edu.refusals[-1]
    VfioDevice(client).enable_bus_master()
    assert dma(client, DMA_BUFFER + 2048, 0x1000, 2049, 0x3) & 1 == 0  # one byte past the buffer
    assert "leaves the buffer" in server.edu.refusals[-1]
    assert dma(client, DMA_BUFFER, 1 << 28, 64, 0x3) & 1 == 0  # beyond the 28-bit dma_mask
    assert "dma_mask" in server.edu.refusals[-1]
    assert digest(memory) == before and relay.pop_events() == []
    assert dma(client, DMA_BUFFER, 0x1000, 4096, 0x3) & 1 == 0  # the whole buffer is in range
    assert memory.read(0x1000, 4096) == b"\x55" * 4096 and len(server.edu.refusals) == 3


def test_dma_outside_the_clients_maps_is_refused(client: Client, relay: Relay, server: EduServer,
                                                memory: GuestMemory) -> None:  # fmt: skip
    client.ok(w.Command.DMA_UNMAP, w.DmaUnmap(24, 0, 0, RAM).pack())
    client.dma_map(0, RAM // 2, os.dup(memory.regions[0].fd))  # type: ignore[arg-type]
    send(relay, AttachRequest(1, EP))
    send(relay, MapRequest(1, 0x1000, 0x1FFF, RAM - 0x1000, RW))  # guest RAM QEMU did not map for us
    VfioDevice(client).enable_bus_master()
    assert dma(client, 0x1000, DMA_BUFFER, 64, 0x1) & 1 == 0
    assert "refused" in server.edu.refusals[-1] and relay.pop_events() == []


# --- DMA maps, semantic errors ----------------------------------------------------------------


def test_dma_map_errors_keep_the_connection(client: Client, server: EduServer, tmp_path: Path) -> None:
    fd = os.memfd_create("small")
    os.ftruncate(fd, 4096)
    try:
        assert client.error(w.Command.DMA_MAP, w.DmaMap(32, 3, 0, RAM, 8192).pack(), [os.dup(fd)]) == errno.EINVAL
        assert client.error(w.Command.DMA_MAP, w.DmaMap(32, 3, 0, 0x1000, 4096).pack(), [os.dup(fd)]) == errno.EEXIST
        client.dma_map(RAM, 4096, os.dup(fd))
        client.dma_map(RAM + 4096, 4096, None)  # no fd: recorded, not accessible
        client.dma_map(RAM + 8192, 4096, None)
        assert len(server.regions) == 4
        assert client.error(w.Command.DMA_UNMAP, w.DmaUnmap(24, 0, RAM, 2048).pack()) == errno.EINVAL  # cuts a map
        client.ok(w.Command.DMA_UNMAP, w.DmaUnmap(24, 0, 2 * RAM, 4096).pack())  # holds none: nothing to do
        assert len(server.regions) == 4
        assert client.ok(w.Command.DMA_UNMAP, w.DmaUnmap(24, 0, RAM, 4096).pack()) == w.DmaUnmap(24, 0, RAM, 4096).pack()
        assert len(server.regions) == 3
        client.ok(w.Command.DMA_UNMAP, w.DmaUnmap(24, 0, RAM, 1 << 40).pack())  # a whole range, as QEMU's vIOMMU path sends
        assert len(server.regions) == 1
        client.ok(w.Command.DMA_UNMAP, w.DmaUnmap(24, w.UNMAP_ALL, 0, 0).pack())
        assert len(server.regions) == 0
        pipe_r, pipe_w = os.pipe()
        os.close(pipe_w)
        assert client.error(w.Command.DMA_MAP, w.DmaMap(32, 3, 0, 0, 4096).pack(), [pipe_r]) == errno.EINVAL  # closes pipe_r
        assert client.error(99) == errno.ENOTSUP
        assert client.error(w.Command.DEVICE_GET_REGION_IO_FDS, bytes(16)) == errno.ENOTSUP
        assert client.read(0, 0, 4) == (0x010000ED).to_bytes(4, "little")  # still served
    finally:
        os.close(fd)


def test_no_reply_flag_gets_no_reply(client: Client, server: EduServer) -> None:
    client.send(w.Command.REGION_WRITE, w.RegionAccess(4, 0, 4, bytes(4)).pack(), flags=w.HeaderFlag.NO_REPLY)
    assert client.read(0, 4, 4) == b"\xff\xff\xff\xff"  # the next reply is this read's: the write had none


def test_disconnect_drops_maps_and_keeps_device_state(client: Client, server: EduServer, loop: Loop) -> None:
    client.write(0, 0x04, bytes(4))
    assert len(server.regions) == 1
    c2 = connect_after(server, loop, client)
    assert len(server.regions) == 0 and server.last_error is None
    c2.version()
    assert c2.read(0, 0x04, 4) == b"\xff\xff\xff\xff"


def test_listening_socket_serves_one_client_at_a_time(relay: Relay, loop: Loop, tmp_path: Path) -> None:
    path = tmp_path / "edu.sock"
    path.touch()
    path.unlink()
    server = EduServer(relay, path, EP, loop)
    try:
        first = socket.socket(socket.AF_UNIX)
        first.connect(str(path))
        a = Client(first, loop)
        a.version()
        second = socket.socket(socket.AF_UNIX)
        second.connect(str(path))
        b = Client(second, loop)
        assert b.closed()  # turned away while the first is served
        assert a.read(0, 0, 4) == (0x010000ED).to_bytes(4, "little")
        first.close()
        for _ in range(20):
            loop.run_once(0.01)
        third = socket.socket(socket.AF_UNIX)
        third.connect(str(path))
        Client(third, loop).version()
    finally:
        server.close()
    assert not path.exists()


# --- malformed messages: a clean disconnect, then the next client -------------------------------

H = w.HEADER_SIZE
F = w.IrqSetFlag


def _msg(cmd: int, payload: bytes, *, size: int | None = None, flags: int = 0) -> bytes:
    return w.Header(7, cmd, H + len(payload) if size is None else size, flags).pack() + payload


def _version(caps: bytes) -> bytes:
    return _msg(w.Command.VERSION, struct.pack("<HH", 0, 0) + caps)


MALFORMED: dict[str, tuple[bool, list[bytes], int]] = {
    # name: (negotiate first, messages, fds to send with the last one)
    "size below header": (False, [w.Header(1, 1, 8, 0).pack()], 0),
    "size above limit": (False, [w.Header(1, 1, 1 << 30, 0).pack()], 0),
    "undefined flag bit": (False, [_msg(w.Command.VERSION, struct.pack("<HH", 0, 0), flags=0x40)], 0),
    "undefined type": (False, [_msg(w.Command.VERSION, struct.pack("<HH", 0, 0), flags=0x2)], 0),
    "reply from the client": (True, [_msg(w.Command.REGION_READ, b"", flags=0x1)], 0),
    "command before VERSION": (False, [_msg(w.Command.DEVICE_GET_INFO, bytes(16))], 0),
    "second VERSION": (True, [_version(b"")], 0),
    "short VERSION": (False, [_msg(w.Command.VERSION, b"\0\0")], 0),
    "caps not NUL-terminated": (False, [_version(b'{"capabilities":{}}')], 0),
    "caps NUL inside": (False, [_version(b'{"capa\0":1}\0')], 0),
    "caps not JSON": (False, [_version(b"{nope\0")], 0),
    "caps not an object": (False, [_version(b"[1]\0")], 0),
    "capabilities not an object": (False, [_version(b'{"capabilities":3}\0')], 0),
    "max_msg_fds a string": (False, [_version(json.dumps({"capabilities": {"max_msg_fds": "8"}}).encode() + b"\0")], 0),
    "pgsizes a boolean": (False, [_version(json.dumps({"capabilities": {"pgsizes": True}}).encode() + b"\0")], 0),
    "migration.pgsize negative": (False, [_version(b'{"capabilities":{"migration":{"pgsize":-1}}}\0')], 0),
    "DMA_MAP short": (True, [_msg(w.Command.DMA_MAP, bytes(24))], 0),
    "DMA_MAP undefined flags": (True, [_msg(w.Command.DMA_MAP, w.DmaMap(32, 4, 0, 0, 4096).pack())], 0),
    "DMA_MAP empty": (True, [_msg(w.Command.DMA_MAP, w.DmaMap(32, 3, 0, 0, 0).pack())], 0),
    "DMA_MAP wraps": (True, [_msg(w.Command.DMA_MAP, w.DmaMap(32, 3, 0, (1 << 64) - 4096, 8192).pack())], 0),
    "DMA_MAP small argsz": (True, [_msg(w.Command.DMA_MAP, w.DmaMap(8, 3, 0, 0, 4096).pack())], 0),
    "DMA_MAP two fds": (True, [_msg(w.Command.DMA_MAP, w.DmaMap(32, 3, 0, 0, 4096).pack())], 2),
    "DMA_UNMAP long": (True, [_msg(w.Command.DMA_UNMAP, bytes(32))], 0),
    "DMA_UNMAP all with address": (True, [_msg(w.Command.DMA_UNMAP, w.DmaUnmap(24, w.UNMAP_ALL, 4096, 0).pack())], 0),
    "DMA_UNMAP undefined flags": (True, [_msg(w.Command.DMA_UNMAP, w.DmaUnmap(24, 8, 0, 4096).pack())], 0),
    "GET_INFO short": (True, [_msg(w.Command.DEVICE_GET_INFO, bytes(8))], 0),
    "GET_REGION_INFO long": (True, [_msg(w.Command.DEVICE_GET_REGION_INFO, bytes(40))], 0),
    "GET_IRQ_INFO short": (True, [_msg(w.Command.DEVICE_GET_IRQ_INFO, bytes(4))], 0),
    "fds with GET_INFO": (True, [_msg(w.Command.DEVICE_GET_INFO, w.DeviceInfo(16).pack())], 1),
    "REGION_READ with data": (True, [_msg(w.Command.REGION_READ, w.RegionAccess(0, 0, 4).pack() + b"x")], 0),
    "REGION_READ too large": (True, [_msg(w.Command.REGION_READ, w.RegionAccess(0, 7, 1 << 20).pack())], 0),
    "REGION_WRITE count mismatch": (True, [_msg(w.Command.REGION_WRITE, w.RegionAccess(0, 0, 8, b"1234").pack())], 0),
    "SET_IRQS two data flags": (True, [_msg(w.Command.DEVICE_SET_IRQS, w.IrqSet(20, F.DATA_NONE | F.DATA_BOOL | F.ACTION_TRIGGER, 0, 0, 1).pack())], 0),
    "SET_IRQS undefined flag": (True, [_msg(w.Command.DEVICE_SET_IRQS, w.IrqSet(20, F.DATA_NONE | F.ACTION_TRIGGER | 0x40, 0, 0, 1).pack())], 0),
    "SET_IRQS no action": (True, [_msg(w.Command.DEVICE_SET_IRQS, w.IrqSet(20, F.DATA_NONE, 0, 0, 1).pack())], 0),
    "SET_IRQS bool short": (True, [_msg(w.Command.DEVICE_SET_IRQS, w.IrqSet(20, F.DATA_BOOL | F.ACTION_MASK, 0, 0, 2, b"\1").pack())], 0),
    "SET_IRQS eventfd count": (True, [_msg(w.Command.DEVICE_SET_IRQS, w.IrqSet(20, F.DATA_EVENTFD | F.ACTION_TRIGGER, 1, 0, 1).pack())], 2),
    "SET_IRQS fds without eventfd": (True, [_msg(w.Command.DEVICE_SET_IRQS, w.IrqSet(20, F.DATA_NONE | F.ACTION_TRIGGER, 0, 0, 1).pack())], 1),
    "DEVICE_RESET with payload": (True, [_msg(w.Command.DEVICE_RESET, b"x")], 0),
    "too many fds": (True, [_msg(w.Command.DMA_MAP, w.DmaMap(32, 3, 0, 0, 4096).pack())], MAX_MSG_FDS + 1),
    "EOF inside a message": (True, [w.Header(1, w.Command.REGION_READ, 32, 0).pack() + b"abc", b""], 0),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_message_disconnects_cleanly_and_the_next_client_is_served(
        name: str, server: EduServer, loop: Loop, memory: GuestMemory) -> None:  # fmt: skip
    negotiate, messages, nfds = MALFORMED[name]
    c = connect(server, loop)
    if negotiate:
        c.version()
        c.dma_map(0, RAM, os.dup(memory.regions[0].fd))  # type: ignore[arg-type]
        assert len(server.regions) == 1
    sent = [os.eventfd(0) for _ in range(nfds)]
    try:
        for i, raw in enumerate(messages):
            if raw == b"":
                c.sock.shutdown(socket.SHUT_WR)
            else:
                c.send_raw(raw, sent if i == len(messages) - 1 else [], keep=True)
        assert c.closed(), "the server did not hang up"
    finally:
        for fd in sent:
            os.close(fd)
    assert not server.connected
    assert isinstance(server.last_error, w.MalformedMessage), server.last_error
    assert len(server.regions) == 0  # the client's maps went with it
    c.sock.close()
    nxt = connect(server, loop)
    nxt.version()
    assert nxt.read(0, 0, 4) == (0x010000ED).to_bytes(4, "little")


def test_unsupported_major_version_is_refused_then_disconnected(server: EduServer, loop: Loop) -> None:
    c = connect(server, loop)
    assert c.error(w.Command.VERSION, w.Version(1, 0).pack()) == errno.ENOTSUP
    assert c.closed() and not server.connected
    connect(server, loop).version()


def test_no_fd_leaks_over_many_bad_clients(server: EduServer, loop: Loop, memory: GuestMemory) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def one() -> None:
        c = connect(server, loop)
        c.version()
        c.dma_map(0, RAM, os.dup(memory.regions[0].fd))  # type: ignore[arg-type]
        efd = os.eventfd(0)
        c.send_raw(_msg(w.Command.DEVICE_SET_IRQS, w.IrqSet(20, F.DATA_EVENTFD | F.ACTION_TRIGGER, 0, 0, 1).pack()), [efd])
        c.pump()
        c.sock.recv(64)
        two = [os.eventfd(0), os.eventfd(0)]
        c.send_raw(_msg(w.Command.DMA_MAP, w.DmaMap(32, 3, 0, RAM, 4096).pack()), two)
        assert c.closed()
        c.sock.close()

    one()
    base = open_fds()
    for _ in range(10):
        one()
    assert open_fds() == base  # every received fd (maps, eventfds, the refused pair) was closed
