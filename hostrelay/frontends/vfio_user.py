"""An ``edu`` DMA engine served over vfio-user, its DMA translated by the relay.

QEMU's own emulated devices DMA straight into guest RAM without asking an
IOMMU that lives outside QEMU, so the relay (a virtio-iommu served over
vhost-user) can only translate the DMA of a device that lives in its own
process.  This module is such a device: a vfio-user server (protocol of
QEMU's ``docs/interop/vfio-user.rst``; QEMU 10.1+ ``-device
vfio-user-pci,socket=PATH`` is the client) emulating QEMU's ``edu`` (see
:mod:`hostrelay.frontends.edu_model`), whose every DMA goes through
:meth:`hostrelay.relay.Relay.translate` for the endpoint ID of its PCI
address in the guest.

QEMU does not know about our IOMMU: it sends ``DMA_MAP`` for guest RAM with
the DMA address equal to the guest-physical address and an fd + offset of
the RAM's memory backend, which must therefore be shared
(``memory-backend-memfd,share=on``).  Those maps are this server's view of
guest RAM.  The edu's DMA address registers hold what the guest driver put
there, IOVAs of its virtio-iommu domain; each transfer is translated to GPAs
(page by page, as a device's IOMMU would), then copied through the maps.  A
translation fault touches no memory: the relay has queued the fault record,
and ``on_fault`` lets the embedder deliver it (the vhost-user device's event
queue).

Everything runs on the relay process's one :class:`~hostrelay.frontends.loop.Loop`.
One client is served at a time; a malformed message (see
:mod:`hostrelay.frontends.vfio_user_wire`) is logged, the client is
disconnected, and the next one is served.  As the protocol asks of a server
whose client goes away, its DMA maps and interrupt eventfds are dropped and
the device state is kept.
"""

from __future__ import annotations

import array
import errno
import logging
import mmap
import os
import select
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hostrelay.firmware.viot import Bdf
from hostrelay.frontends import vfio_user_wire as w
from hostrelay.frontends.edu_model import BAR0_SIZE, CONFIG_SIZE, DEFAULT_DMA_MASK, Edu
from hostrelay.frontends.loop import Loop
from hostrelay.kernel import uapi
from hostrelay.relay import Relay, TranslationFault

if TYPE_CHECKING:
    from hostrelay.frontends.vhost_user import FrontEndFactory, VhostUserDevice

__all__ = [
    "DmaRegions",
    "EduServer",
    "MAX_DATA_XFER",
    "MAX_MSG_FDS",
    "RelayDma",
    "edu_frontend",
    "endpoint_id_of",
]

log = logging.getLogger(__name__)

#: Protocol version served: 0.0, the only one QEMU (10.1 to 11.x) speaks.
VERSION = (0, 0)
#: File descriptors one message may carry to us (QEMU sends at most one a DMA_MAP
#: and splits SET_IRQS eventfds by the peer's max_msg_fds).
MAX_MSG_FDS = 8
#: Largest REGION_READ/REGION_WRITE count accepted: the whole config space or
#: the largest register is far less; QEMU's own default is 1 MiB.
MAX_DATA_XFER = 64 * 1024
#: DMA maps held at once (QEMU maps a handful of RAM sections).
MAX_DMA_MAPS = 1024
PAGE_SIZE = 4096
# Largest acceptable message: a REGION_WRITE of MAX_DATA_XFER bytes.
_MAX_MESSAGE = w.HEADER_SIZE + w.REGION_ACCESS_SIZE + MAX_DATA_XFER
# A stalled reader gets this long to take a reply before it is dropped.
SEND_TIMEOUT = 5.0
# Messages handled per readable event, so that one chatty client cannot
# starve the loop's other sockets.
_BATCH = 64

# <linux/vfio.h> PCI region and IRQ indexes.
BAR0_REGION = uapi.VFIO_PCI_BAR0_REGION_INDEX
CONFIG_REGION = uapi.VFIO_PCI_CONFIG_REGION_INDEX
NUM_REGIONS = uapi.VFIO_PCI_NUM_REGIONS  # BAR0-5, ROM, config, VGA
INTX_IRQ, MSI_IRQ = uapi.VFIO_PCI_INTX_IRQ_INDEX, uapi.VFIO_PCI_MSI_IRQ_INDEX
MSIX_IRQ, ERR_IRQ, REQ_IRQ = uapi.VFIO_PCI_MSIX_IRQ_INDEX, uapi.VFIO_PCI_ERR_IRQ_INDEX, uapi.VFIO_PCI_REQ_IRQ_INDEX
NUM_IRQS = uapi.VFIO_PCI_NUM_IRQS


def endpoint_id_of(bdf: str) -> int:
    """The virtio-iommu endpoint ID of PCI function ``[SSSS:]BB:DD.F``.

    The PCI requester ID with the segment above it, ``seg << 16 | bus << 8 |
    dev << 3 | fn``: what a VIOT PCI range node gives when its endpoint
    start is the first BDF of the range, as QEMU's own ``hw/acpi/viot.c``
    builds it (and the ID QEMU's virtio-iommu uses for its endpoints).
    """
    address = Bdf.parse(bdf)  # ViotError, a ValueError, if it is none
    return address.segment << 16 | address.bdf


# --- the client's memory ------------------------------------------------------------------


@dataclass
class DmaRegion:
    """One ``DMA_MAP``: client memory ``[address, address + size)``, mapped here if it came with an fd."""

    address: int
    size: int
    flags: int
    fd: int | None
    view: memoryview | None
    _mmap: mmap.mmap | None

    def close(self) -> None:
        """Unmap and close the fd."""
        if self.view is not None:
            self.view.release()
            self.view = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                # A slice still in use somewhere: the mapping goes with its last view.
                log.warning("vfio-user: DMA map %#x+%#x still referenced at unmap", self.address, self.size)
            self._mmap = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class DmaRegions:
    """The client's DMA maps, by address."""

    def __init__(self, max_maps: int = MAX_DMA_MAPS) -> None:
        self.max_maps = max_maps
        self._regions: list[DmaRegion] = []

    def __len__(self) -> int:
        return len(self._regions)

    def add(self, m: w.DmaMap, fd: int | None) -> None:
        """Record a map; takes ownership of ``fd`` (closed on refusal too).

        Refused (:class:`~hostrelay.frontends.vfio_user_wire.RequestError`):
        an overlap (EEXIST, as the protocol asks), too many maps (ENOSPC), an
        fd that is not a regular file or memfd or is shorter than the span
        (EINVAL: touching a page past its end would kill this process with
        SIGBUS), or an mmap failure (its errno).
        """
        try:
            end = m.address + m.size
            for r in self._regions:
                if m.address < r.address + r.size and r.address < end:
                    raise w.RequestError(errno.EEXIST, f"DMA map {m.address:#x}+{m.size:#x} overlaps "
                                                       f"{r.address:#x}+{r.size:#x}")  # fmt: skip
            if len(self._regions) >= self.max_maps:
                raise w.RequestError(errno.ENOSPC, f"more than {self.max_maps} DMA maps")
            view: memoryview | None = None
            mm: mmap.mmap | None = None
            if fd is not None:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise w.RequestError(errno.EINVAL, "DMA map fd is not a regular file or memfd")
                if st.st_size < m.offset + m.size:
                    raise w.RequestError(errno.EINVAL, f"DMA map {m.offset:#x}+{m.size:#x} runs past the end "
                                                       f"of its file ({st.st_size:#x} bytes)")  # fmt: skip
                base = m.offset - m.offset % mmap.ALLOCATIONGRANULARITY
                prot = mmap.PROT_READ | (mmap.PROT_WRITE if m.flags & w.DMA_WRITE_FLAG else 0)
                try:
                    mm = mmap.mmap(fd, m.size + (m.offset - base), mmap.MAP_SHARED, prot, offset=base)
                except OSError as exc:
                    raise w.RequestError(exc.errno or errno.EINVAL, f"mmap of the DMA map failed: {exc}") from None
                view = memoryview(mm)[m.offset - base:]
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        self._regions.append(DmaRegion(m.address, m.size, m.flags, fd, view, mm))
        self._regions.sort(key=lambda r: r.address)

    def remove(self, address: int, size: int) -> int:
        """Drop the maps inside ``[address, address + size)``; return how many.

        The protocol text asks for the span of one earlier map, but QEMU's
        client also sends, from its vIOMMU notifier (hw/vfio/listener.c
        vfio_iommu_map_notify, QEMU 10.1-11.1), whole invalidated ranges,
        which its kernel-VFIO twin (type1v2) takes as "every map inside":
        so do we.  A range that cuts a map in two is refused (EINVAL, as
        type1v2 does); one that holds no map removes nothing.
        """
        end = address + size
        inside = [r for r in self._regions if address <= r.address and r.address + r.size <= end]
        for r in self._regions:
            if r not in inside and r.address < end and address < r.address + r.size:
                raise w.RequestError(errno.EINVAL, f"DMA unmap {address:#x}+{size:#x} cuts the map "
                                                   f"{r.address:#x}+{r.size:#x}")  # fmt: skip
        self._regions = [r for r in self._regions if r not in inside]
        for r in inside:
            r.close()
        return len(inside)

    def clear(self) -> None:
        """Drop every map."""
        regions, self._regions = self._regions, []
        for r in regions:
            r.close()

    def views(self, address: int, size: int, *, write: bool) -> list[memoryview] | None:
        """Slices of mapped memory covering ``[address, address + size)``, or None.

        None when part of the span is in no map, in a map without an fd (its
        bytes would need DMA_READ/DMA_WRITE messages, which this server does
        not send), or in a map without the READ/WRITE permission asked for.
        """
        need = w.DMA_WRITE_FLAG if write else w.DMA_READ_FLAG
        out: list[memoryview] = []
        at, left = address, size
        for r in self._regions:
            if left == 0:
                break
            if r.address + r.size <= at:
                continue
            if r.address > at or r.view is None or not r.flags & need:
                return None
            n = min(left, r.address + r.size - at)
            out.append(r.view[at - r.address:at - r.address + n])
            at += n
            left -= n
        return out if left == 0 else None


class RelayDma:
    """The edu's bus: IOVAs translated through the relay, then the client's maps.

    A transfer is translated one IOVA page at a time (a device's IOMMU
    translates pages: a guest buffer that is contiguous in IOVA need not be
    in GPA), and every page is translated before any byte moves, so a fault
    anywhere in it means no access at all.
    """

    def __init__(self, relay: Relay, endpoint_id: int, regions: DmaRegions,
                 on_fault: Callable[[TranslationFault], None] | None = None) -> None:  # fmt: skip
        self.relay = relay
        self.endpoint_id = endpoint_id
        self.regions = regions
        self.on_fault = on_fault
        self.faults = 0

    def _views(self, iova: int, size: int, *, write: bool) -> list[memoryview] | None:
        spans: list[tuple[int, int]] = []
        at, end = iova, iova + size
        try:
            while at < end:
                n = min(end, (at // PAGE_SIZE + 1) * PAGE_SIZE) - at
                spans.append((self.relay.translate(self.endpoint_id, at, n, write=write), n))
                at += n
        except TranslationFault as fault:
            self.faults += 1
            log.info("edu endpoint %#x: %s", self.endpoint_id, fault)
            if self.on_fault is not None:
                self.on_fault(fault)
            return None
        views: list[memoryview] = []
        for gpa, n in spans:
            piece = self.regions.views(gpa, n, write=write)
            if piece is None:
                log.warning("edu endpoint %#x: GPA %#x+%#x is not client memory the device may %s",
                            self.endpoint_id, gpa, n, "write" if write else "read")  # fmt: skip
                return None
            views += piece
        return views

    def read(self, address: int, size: int) -> bytes | None:
        """RAM → device: needs READ permission in the domain."""
        views = self._views(address, size, write=False)
        if views is None:
            return None
        data = b"".join(bytes(v) for v in views)
        for v in views:
            v.release()
        return data

    def write(self, address: int, data: bytes) -> bool:
        """Device → RAM: needs WRITE permission in the domain."""
        views = self._views(address, len(data), write=True)
        if views is None:
            return False
        at = 0
        for v in views:
            v[:] = data[at:at + len(v)]
            at += len(v)
            v.release()
        return True


# --- the server --------------------------------------------------------------------------


class _Disconnect(Exception):
    """The client must go: EOF, a socket error or an unanswerable request."""


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class EduServer:
    """A vfio-user server of one ``edu`` function whose DMA the relay translates.

    ``socket_path`` is where it listens (a stale socket there is replaced;
    ``None`` to serve only sockets given to :meth:`attach`); ``endpoint_id``
    is the function's endpoint in ``relay`` (see :func:`endpoint_id_of`),
    which the embedder has declared with ``relay.add_endpoint``;
    ``on_fault(fault)`` is called after each translation fault, once the
    relay has queued its record (:meth:`Relay.pop_events`).  The device
    state lives as long as the server; DMA maps and interrupt eventfds as
    long as a client connection.
    """

    def __init__(
        self,
        relay: Relay,
        socket_path: str | Path | None,
        endpoint_id: int,
        loop: Loop,
        *,
        on_fault: Callable[[TranslationFault], None] | None = None,
        dma_mask: int = DEFAULT_DMA_MASK,
    ) -> None:
        self.relay = relay
        self.endpoint_id = endpoint_id
        self.loop = loop
        self.regions = DmaRegions()
        self.dma = RelayDma(relay, endpoint_id, self.regions, on_fault)
        self.edu = Edu(self.dma, self._interrupt, dma_mask=dma_mask)
        #: Why the last client was dropped (None after a clean EOF).
        self.last_error: Exception | None = None
        self.clients = 0  # connections served so far
        self._conn: socket.socket | None = None
        self._negotiated = False
        self._buf = bytearray()
        self._hdr: w.Header | None = None
        self._fds: list[int] = []
        self._intx_fd: int | None = None
        self._intx_masked = False
        self._msi_fd: int | None = None
        self.socket_path = None if socket_path is None else Path(socket_path)
        self._listener: socket.socket | None = None
        if self.socket_path is not None:
            self._listen(self.socket_path)

    # --- connections ----------------------------------------------------------------

    def _listen(self, path: Path) -> None:
        if path.is_socket():
            path.unlink()  # a previous run's socket: nobody can be listening on it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            sock.listen(4)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self._conn is not None:
            # The protocol has one client per socket connection, and the
            # device one set of DMA maps: a second client is turned away.
            log.warning("vfio-user %s: a client is already connected; refusing another", self.socket_path)
            conn.close()
            return
        self.attach(conn)

    def attach(self, conn: socket.socket) -> None:
        """Serve the connected stream socket ``conn`` (accepted here, or one end of a socketpair)."""
        if self._conn is not None:
            raise RuntimeError("a vfio-user client is already being served")
        conn.setblocking(False)
        self._conn = conn
        self._negotiated = False
        self._buf.clear()
        self._hdr = None
        self.clients += 1
        self.loop.add_reader(conn.fileno(), self._readable)

    @property
    def connected(self) -> bool:
        """A client is being served."""
        return self._conn is not None

    def disconnect(self, error: Exception | None = None) -> None:
        """Drop the client: its maps and eventfds go, the device state stays."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self.last_error = error
        if error is not None:
            log.warning("vfio-user %s: dropping the client: %s", self.socket_path or "client", error)
        self.loop.remove_reader(conn.fileno())
        conn.close()
        _close_fds(self._fds)
        self._fds = []
        self._buf.clear()
        self._hdr = None
        self.regions.clear()
        self._set_intx(None)
        self._set_msi(None)

    def close(self) -> None:
        """Disconnect, stop listening and remove the socket file."""
        self.disconnect()
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            if self.socket_path is not None and self.socket_path.is_socket():
                self.socket_path.unlink()

    # --- receiving ----------------------------------------------------------------

    def _readable(self) -> None:
        try:
            for _ in range(_BATCH):
                if not self._receive():
                    return
        except (w.MalformedMessage, _Disconnect) as exc:
            self.disconnect(exc)

    def _receive(self) -> bool:
        """Read toward the current message (never past it); False once the socket is drained."""
        conn = self._conn
        if conn is None:
            return False
        want = (w.HEADER_SIZE if self._hdr is None else self._hdr.size) - len(self._buf)
        try:
            data, ancdata, msg_flags, _ = conn.recvmsg(want, socket.CMSG_SPACE((MAX_MSG_FDS + 1) * 4))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            raise _Disconnect(f"socket error: {exc}") from None
        # Every fd the kernel installed is ours to close, whatever follows.
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
                self._fds += got.tolist()
        if msg_flags & socket.MSG_CTRUNC:
            raise w.MalformedMessage(f"more than {MAX_MSG_FDS} file descriptors in one message")
        if not data:
            if self._buf or self._hdr is not None:
                raise w.MalformedMessage("the client closed the socket inside a message")
            self.disconnect()
            return False
        self._buf += data
        if self._hdr is None:
            if len(self._buf) < w.HEADER_SIZE:
                return True
            self._hdr = w.Header.unpack(bytes(self._buf), _MAX_MESSAGE)
        if len(self._buf) < self._hdr.size:
            return True
        hdr, body, fds = self._hdr, bytes(self._buf[w.HEADER_SIZE:]), self._fds
        self._hdr, self._fds = None, []
        self._buf.clear()
        if len(fds) > MAX_MSG_FDS:
            _close_fds(fds)
            raise w.MalformedMessage(f"{len(fds)} file descriptors in one message (at most {MAX_MSG_FDS})")
        self._handle(hdr, body, fds)
        return self._conn is not None

    # --- dispatch -----------------------------------------------------------------

    def _handle(self, hdr: w.Header, body: bytes, fds: list[int]) -> None:
        try:
            if hdr.is_reply:
                raise w.MalformedMessage(f"a reply (id {hdr.msg_id}) to a command this server never sent")
            if not self._negotiated and hdr.command != w.Command.VERSION:
                raise w.MalformedMessage(f"command {hdr.command} before VERSION")
            if self._negotiated and hdr.command == w.Command.VERSION:
                raise w.MalformedMessage("a second VERSION")
            takes_fds = hdr.command in (w.Command.DMA_MAP, w.Command.DEVICE_SET_IRQS)
            if fds and not takes_fds:
                raise w.MalformedMessage(f"command {hdr.command} carries {len(fds)} file descriptors")
            payload = self._dispatch(hdr, body, fds)
            fds = []  # handed over
        except w.RequestError as exc:
            _close_fds(fds)
            log.info("vfio-user: command %d refused: %s", hdr.command, exc)
            if not hdr.no_reply:
                self._send(w.pack_message(hdr.msg_id, hdr.command, error=exc.errno))
            if hdr.command == w.Command.VERSION:
                raise _Disconnect(f"version negotiation failed: {exc}") from None
            return
        except BaseException:
            _close_fds(fds)
            raise
        if not hdr.no_reply:
            self._send(w.pack_message(hdr.msg_id, hdr.command, payload))

    def _dispatch(self, hdr: w.Header, body: bytes, fds: list[int]) -> bytes:
        """The reply payload; takes ownership of ``fds`` (the caller closes them on an exception)."""
        cmd = hdr.command
        if cmd == w.Command.VERSION:
            return self._version(w.Version.unpack(body))
        if cmd == w.Command.DMA_MAP:
            m = w.DmaMap.unpack(body)
            if len(fds) > 1:
                raise w.MalformedMessage(f"DMA_MAP with {len(fds)} file descriptors")
            fd = fds.pop() if fds else None
            self.regions.add(m, fd)
            return b""
        if cmd == w.Command.DMA_UNMAP:
            u = w.DmaUnmap.unpack(body)
            if u.flags & w.UNMAP_GET_DIRTY_BITMAP:
                raise w.RequestError(errno.ENOTSUP, "dirty page tracking is not supported")
            if u.flags & w.UNMAP_ALL:
                self.regions.clear()
            else:
                self.regions.remove(u.address, u.size)
            return u.pack()  # "The server responds with the original DMA entry in the request."
        if cmd == w.Command.DEVICE_GET_INFO:
            info = w.DeviceInfo.unpack(body)
            if info.argsz < w.DEVICE_INFO:
                raise w.RequestError(errno.EINVAL, f"argsz {info.argsz} is smaller than vfio_device_info")
            return w.DeviceInfo(w.DEVICE_INFO, w.DEVICE_FLAGS_RESET | w.DEVICE_FLAGS_PCI, NUM_REGIONS,
                                NUM_IRQS).pack()  # fmt: skip
        if cmd == w.Command.DEVICE_GET_REGION_INFO:
            return self._region_info(w.RegionInfo.unpack(body))
        if cmd == w.Command.DEVICE_GET_IRQ_INFO:
            return self._irq_info(w.IrqInfo.unpack(body))
        if cmd == w.Command.DEVICE_SET_IRQS:
            self._set_irqs(w.IrqSet.unpack(body), fds)
            return b""
        if cmd == w.Command.REGION_READ:
            access = w.RegionAccess.unpack_read(body, MAX_DATA_XFER)
            data = self._region_rw(access.region, access.offset, access.count, None)
            return w.RegionAccess(access.offset, access.region, len(data), data).pack()
        if cmd == w.Command.REGION_WRITE:
            access = w.RegionAccess.unpack_write(body, MAX_DATA_XFER)
            self._region_rw(access.region, access.offset, access.count, access.data)
            return w.RegionAccess(access.offset, access.region, access.count).pack()
        if cmd == w.Command.DEVICE_RESET:
            if body:
                raise w.MalformedMessage(f"DEVICE_RESET carries {len(body)} payload bytes")
            self.edu.reset()
            self._intx_masked = False
            return b""
        raise w.RequestError(errno.ENOTSUP, f"command {cmd} is not implemented")

    def _version(self, v: w.Version) -> bytes:
        if v.major != VERSION[0]:
            raise w.RequestError(errno.ENOTSUP, f"protocol major version {v.major} (this server speaks {VERSION[0]})")
        ours: dict[str, int] = {
            "max_msg_fds": MAX_MSG_FDS,
            "max_data_xfer_size": MAX_DATA_XFER,
            "pgsizes": PAGE_SIZE,
            "max_dma_maps": MAX_DMA_MAPS,
        }
        # "The capability list must be a subset of those proposed"; and QEMU
        # receives the reply into its request's buffer, so it must not be
        # longer than what QEMU sent (hw/vfio-user/proxy.c, msg->rsize).
        caps = {k: val for k, val in ours.items() if k in v.capabilities}
        self._negotiated = True
        return w.Version(VERSION[0], min(v.minor, VERSION[1]), caps).pack()

    def _region_info(self, req: w.RegionInfo) -> bytes:
        if req.argsz < w.REGION_INFO_SIZE:
            raise w.RequestError(errno.EINVAL, f"argsz {req.argsz} is smaller than vfio_region_info")
        if req.index >= NUM_REGIONS:
            raise w.RequestError(errno.EINVAL, f"region {req.index} does not exist")
        rw = w.REGION_READ_FLAG | w.REGION_WRITE_FLAG
        size, flags = {BAR0_REGION: (BAR0_SIZE, rw), CONFIG_REGION: (CONFIG_SIZE, rw)}.get(req.index, (0, 0))
        # Not mmappable (no FLAG_MMAP): every access comes as REGION_READ/WRITE.
        return w.RegionInfo(w.REGION_INFO_SIZE, flags, req.index, 0, size, 0).pack()

    def _irq_info(self, req: w.IrqInfo) -> bytes:
        if req.argsz < w.IRQ_INFO_SIZE:
            raise w.RequestError(errno.EINVAL, f"argsz {req.argsz} is smaller than vfio_irq_info")
        if req.index >= NUM_IRQS:
            raise w.RequestError(errno.EINVAL, f"IRQ index {req.index} does not exist")
        flags, count = {
            # INTx as Linux vfio-pci reports it: level-triggered, so masked
            # on delivery until the client's UNMASK (its EOI).
            INTX_IRQ: (w.IRQ_INFO_EVENTFD | w.IRQ_INFO_MASKABLE | w.IRQ_INFO_AUTOMASKED, 1),
            MSI_IRQ: (w.IRQ_INFO_EVENTFD | w.IRQ_INFO_NORESIZE, 1),  # edu: one vector, no per-vector mask
        }.get(req.index, (w.IRQ_INFO_EVENTFD, 0))
        return w.IrqInfo(w.IRQ_INFO_SIZE, flags, req.index, count).pack()

    def _region_rw(self, region: int, offset: int, count: int, data: bytes | None) -> bytes:
        limit = {BAR0_REGION: BAR0_SIZE, CONFIG_REGION: CONFIG_SIZE}.get(region)
        if limit is None:
            raise w.RequestError(errno.EINVAL, f"region {region} has no accessible space")
        if offset + count > limit:
            raise w.RequestError(errno.EINVAL, f"access {offset:#x}+{count:#x} is outside region {region} ({limit:#x} bytes)")
        if region == CONFIG_REGION:
            if data is None:
                return self.edu.config_read(offset, count)
            self.edu.config_write(offset, data)
            return b""
        if data is None:
            return self.edu.mmio_read(offset, count)
        self.edu.mmio_write(offset, data)
        return b""

    # --- interrupts ---------------------------------------------------------------

    def _set_irqs(self, s: w.IrqSet, fds: list[int]) -> None:
        F = w.IrqSetFlag
        count_of = {INTX_IRQ: 1, MSI_IRQ: 1}
        if s.index >= NUM_IRQS:
            raise w.RequestError(errno.EINVAL, f"IRQ index {s.index} does not exist")
        if s.flags & F.DATA_EVENTFD and len(fds) not in (0, s.count):
            raise w.MalformedMessage(f"SET_IRQS for {s.count} eventfds carries {len(fds)}")
        if not s.flags & F.DATA_EVENTFD and fds:
            raise w.MalformedMessage("SET_IRQS without DATA_EVENTFD carries file descriptors")
        disable_all = s.count == 0 and s.flags & F.DATA_NONE and s.flags & F.ACTION_TRIGGER
        if disable_all:
            if s.index == INTX_IRQ:
                self._set_intx(None)
            elif s.index == MSI_IRQ:
                self._set_msi(None)
            return
        if s.start + s.count > count_of.get(s.index, 0) or s.count == 0:
            raise w.RequestError(errno.EINVAL, f"IRQ index {s.index} has no vectors {s.start}..{s.start + s.count - 1}")
        # One vector for either index: start is 0 and count 1 from here on.
        if s.flags & F.DATA_EVENTFD:
            if not s.flags & F.ACTION_TRIGGER:
                raise w.RequestError(errno.ENOTSUP, "mask/unmask eventfds are not supported")
            fd = fds.pop() if fds else None
            if s.index == INTX_IRQ:
                self._set_intx(fd)
            else:
                self._set_msi(fd)
            return
        if s.flags & F.DATA_BOOL and not s.data[0]:
            return
        if s.flags & F.ACTION_TRIGGER:
            # The client fires the interrupt itself (a test, or VFIO's
            # VFIO_IRQ_SET_ACTION_TRIGGER): signal whatever is attached.
            target = self._intx_fd if s.index == INTX_IRQ else self._msi_fd
            if target is not None:
                _signal(target)
            return
        if s.index != INTX_IRQ:
            raise w.RequestError(errno.EINVAL, "MSI is not maskable here")
        if s.flags & F.ACTION_MASK:
            self._intx_masked = True
        else:
            self._intx_masked = False
            if self._msi_fd is None and self.edu.interrupt_level:
                self._interrupt()  # still asserted at EOI: a level interrupt fires again

    def _set_intx(self, fd: int | None) -> None:
        if self._intx_fd is not None:
            os.close(self._intx_fd)
        self._intx_fd = fd
        self._intx_masked = False

    def _set_msi(self, fd: int | None) -> None:
        if self._msi_fd is not None:
            os.close(self._msi_fd)
        self._msi_fd = fd

    def _interrupt(self) -> None:
        """The edu raised an interrupt: an MSI if the client set one up, else INTx."""
        if self._msi_fd is not None:
            _signal(self._msi_fd)
        elif self._intx_fd is not None and not self._intx_masked and self.edu.interrupt_level:
            self._intx_masked = True
            _signal(self._intx_fd)

    # --- sending ------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        conn = self._conn
        if conn is None:
            return
        view = memoryview(data)
        deadline = time.monotonic() + SEND_TIMEOUT
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLOUT)
        while view:
            try:
                view = view[conn.send(view):]
                continue
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                raise _Disconnect(f"socket error: {exc}") from None
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise _Disconnect(f"the client took no reply for {SEND_TIMEOUT} s")


def _signal(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except OSError as exc:  # not an eventfd, or its counter is full: the interrupt is lost
        log.warning("vfio-user: interrupt eventfd write failed: %s", exc)


# --- beside the vhost-user device ---------------------------------------------------------


def edu_frontend(socket_path: str | Path, bdf: str, *, dma_mask: int = DEFAULT_DMA_MASK) -> FrontEndFactory:
    """What ``hostrelay serve --edu SOCKET@BDF`` runs: an :class:`EduServer` beside the vhost-user device.

    Returns a :data:`~hostrelay.frontends.vhost_user.FrontEndFactory` for
    :func:`~hostrelay.frontends.vhost_user.serve`: given the serve loop and
    the device, it declares the emulated endpoint ``endpoint_id_of(bdf)`` in
    the device's relay and listens on ``socket_path`` on that same loop (so
    a guest MAP served from the request queue is in the table before the
    edu's next DMA is translated).  Each translation fault calls
    ``device.deliver_events()``, which puts the relay's fault record on the
    guest's event queue and interrupts.

    ``bdf`` must be where the VMM places the ``vfio-user-pci`` function in
    the guest, and the firmware's VIOT must give it that requester ID
    (``hostrelay viot --endpoints BDF``): the guest driver names endpoints
    by what the VIOT says.  A malformed ``bdf`` raises :class:`ValueError`
    here, before anything listens; an endpoint ID the relay already has
    raises when the factory runs.
    """
    endpoint = endpoint_id_of(bdf)
    path = Path(socket_path)

    def make(loop: Loop, device: VhostUserDevice) -> EduServer:
        device.relay.add_endpoint(endpoint)

        def fault(_fault: TranslationFault) -> None:
            # The record is already in the relay (Relay.translate queued it);
            # this only moves it to the eventq if the driver has set one up.
            device.deliver_events()

        server = EduServer(device.relay, path, endpoint, loop, on_fault=fault, dma_mask=dma_mask)
        log.info("vfio-user: edu endpoint %#x (%s) on %s", endpoint, bdf, path)
        return server

    return make
