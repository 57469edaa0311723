"""The virtio-iommu device as a vhost-user back end (QEMU docs/interop/vhost-user.rst).

A VMM (QEMU 11.1's ``vhost-user-test-device-pci,virtio-id=23,num_vqs=2,
config_size=40``, or any front end) keeps the virtio transport and hands the
device to this process: features, config space, guest RAM as memfds, the two
rings and their eventfds.  Three parts:

- :class:`VhostUserDevice`, the state machine over one :class:`~hostrelay.relay.Relay`:
  a decoded message in, ``Relay`` calls, the reply bytes out.  Kick eventfds
  are watched on the shared :class:`~hostrelay.frontends.loop.Loop`; a kick
  runs ``process_queue`` and, if buffers were used, writes the ring's call
  eventfd (no VIRTIO_RING_F_EVENT_IDX is offered, so every completion
  interrupts, unless the driver set VRING_AVAIL_F_NO_INTERRUPT).  The
  request queue's kicks are by default taken by a C thread instead
  (:meth:`~hostrelay.relay.Relay.serve_queue_in_thread`, cext/hr_kick.c): a
  plain MAP/UNMAP then costs no Python, and the loop hears of the queue only
  when the thread hands it something else (its "needs Python" eventfd).
  :meth:`VhostUserDevice.deliver_events` is the door for other
  front ends whose DMA faults must reach the event queue.
- :class:`VhostUserConnection`, one front end's socket: framing, SCM_RIGHTS,
  replies; any :class:`~hostrelay.frontends.vhost_user_wire.VhostUserError`
  (or a bug) is logged and ends the connection with a device reset.
- :class:`VhostUserServer`, the listening socket: one front end at a time,
  the next after a disconnect.  :func:`serve` runs it with extra front ends.

One relay lives as long as the server; each connection is one device
lifetime.  The relay is built before any guest RAM exists because the
front end asks for features and config (``GET_CONFIG`` as the guest driver
probes) before ``SET_MEM_TABLE`` (which QEMU sends when the driver sets
DRIVER_OK): :meth:`~hostrelay.relay.Relay.replace_memory` gives it the
memfds when they arrive, and is refused while rings or mappings use the old
RAM -- a changed table then ends the connection (a silent reset would drop
the guest's domains under it).

Stopping: vhost-user stops every ring with ``GET_VRING_BASE`` on a driver
reset and on a VM stop alike (QEMU 11.1's ``virtio_device_should_start`` is
false when the VM is not running, so ``vhost_dev_stop`` runs for both), and
says nothing that tells them apart.  The first ``GET_VRING_BASE`` of a
running device is therefore a device reset (:meth:`~hostrelay.relay.Relay.reset`):
no domain of a rebooting guest survives into its next boot; the price is
that a paused VM's domains do not survive the pause (keeping them needs
device state transfer, ``VHOST_USER_PROTOCOL_F_DEVICE_STATE``).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Protocol

from hostrelay.frontends.loop import Loop
from hostrelay.frontends.vhost_user_wire import (
    HEADER,
    MAX_FDS,
    VRING_NOFD,
    ConfigMsg,
    MemRegion,
    MemTable,
    Message,
    ProtocolFeature,
    Request,
    VhostUserError,
    VringAddr,
    VringState,
    close_fds,
    config_msg,
    decode,
    encode,
    parse_header,
    u64,
    vring_state,
)
from hostrelay.relay import Relay

__all__ = [
    "FrontEnd",
    "FrontEndFactory",
    "OFFERED_PROTOCOL_FEATURES",
    "PROTOCOL_FEATURES_BIT",
    "VhostUserConnection",
    "VhostUserDevice",
    "VhostUserError",
    "VhostUserServer",
    "serve",
]

log = logging.getLogger(__name__)

#: VHOST_USER_F_PROTOCOL_FEATURES: the reserved feature bit 30 vhost-user reuses.
PROTOCOL_FEATURES_BIT = 1 << 30
#: What this back end offers: MQ (GET_QUEUE_NUM), REPLY_ACK, CONFIG (QEMU's
#: vhost-user-base refuses a config_size without it), RESET_DEVICE.
OFFERED_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG | ProtocolFeature.RESET_DEVICE
)
#: virtio-iommu has a request queue and an event queue (5.13.2).
NUM_QUEUES = 2
CONFIG_SIZE = 40  # struct virtio_iommu_config (5.13.4)
#: A started message's remaining bytes must arrive within this many seconds.
MESSAGE_TIMEOUT = 5.0
_EVENTFD_ONE = (1).to_bytes(8, "little")  # what an eventfd write adds (the value has no meaning)
# virtio 1.2 §2.7.6 / §2.7.8 ring flags (<linux/virtio_ring.h> values).
_AVAIL_F_NO_INTERRUPT = 1  # the driver: do not interrupt me on used buffers
_USED_F_NO_NOTIFY = 1  # the device: no need to notify (kick) me, I am looking
#: Default busy-poll window after serving the request queue, seconds (see
#: VhostUserDevice.busy_poll): off.  Measured on the 2-core testbed host with
#: another VM running, a 50 us window made guest MAP+UNMAP cycles 3.4x slower
#: (the poll takes the core QEMU's vCPU thread needs); worth trying only
#: where the server has a core of its own.
BUSY_POLL = 0.0
#: Default for serving the request queue from a C thread woken by its kick
#: eventfd (Relay.serve_queue_in_thread): on.  A plain MAP/UNMAP kick then
#: costs no Python and no wake-up of the loop's thread.
KICK_THREAD = True
#: Default spin of that thread after a served kick, seconds: off (see
#: BUSY_POLL for why spinning hurts on a host without a free core).
KICK_SPIN = 0.0
#: Default real-time priority of that thread (SCHED_FIFO; 0: a normal thread).
KICK_PRIORITY = 0
#: A busy poll gives the loop back after this long even while requests keep
#: coming, so the other front ends on it (vfio-user endpoints, the socket) get served.
BUSY_POLL_MAX = 2e-3

# Requests that exist only behind a protocol feature this back end does not
# offer (or a device feature it does not offer), with the reason given.
_UNSUPPORTED = {
    Request.SET_LOG_BASE: "dirty logging (LOG_SHMFD) is not offered",
    Request.SET_LOG_FD: "dirty logging is not offered",
    Request.SEND_RARP: "a net device message (RARP is not offered)",
    Request.NET_SET_MTU: "a net device message (MTU is not offered)",
    Request.SET_BACKEND_REQ_FD: "the back-end channel (BACKEND_REQ) is not offered",
    Request.IOTLB_MSG: "VIRTIO_F_IOMMU_PLATFORM is not offered",
    Request.SET_VRING_ENDIAN: "CROSS_ENDIAN is not offered (virtio 1.x is little-endian)",
    Request.CLOSE_CRYPTO_SESSION: "a crypto device message",
    Request.POSTCOPY_ADVISE: "postcopy (PAGEFAULT) is not offered",
    Request.POSTCOPY_LISTEN: "postcopy (PAGEFAULT) is not offered",
    Request.POSTCOPY_END: "postcopy (PAGEFAULT) is not offered",
    Request.GET_INFLIGHT_FD: "INFLIGHT_SHMFD is not offered",
    Request.SET_INFLIGHT_FD: "INFLIGHT_SHMFD is not offered",
    Request.GPU_SET_SOCKET: "a GPU device message",
    Request.VRING_KICK: "INBAND_NOTIFICATIONS is not offered",
    Request.GET_MAX_MEM_SLOTS: "CONFIGURE_MEM_SLOTS is not offered",
    Request.ADD_MEM_REG: "CONFIGURE_MEM_SLOTS is not offered",
    Request.REM_MEM_REG: "CONFIGURE_MEM_SLOTS is not offered",
    Request.SET_STATUS: "STATUS is not offered",
    Request.GET_STATUS: "STATUS is not offered",
    Request.GET_SHARED_OBJECT: "SHARED_OBJECT is not offered",
    Request.SET_DEVICE_STATE_FD: "DEVICE_STATE is not offered",
    Request.CHECK_DEVICE_STATE: "DEVICE_STATE is not offered",
    Request.GET_SHMEM_CONFIG: "SHMEM is not offered",
}
# What may come before SET_OWNER (QEMU 11.1 sends these first, in this order).
_BEFORE_OWNER = frozenset({
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.SET_PROTOCOL_FEATURES,
    Request.GET_QUEUE_NUM, Request.SET_OWNER,
})  # fmt: skip


@dataclass
class _Ring:
    """One vring as the front end described it."""

    num: int | None = None
    base: int = 0  # SET_VRING_BASE: the next avail index to take
    addr: tuple[int, int, int] | None = None  # GPAs of desc, avail, used
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    enabled: bool = False
    started: bool = False  # Relay.set_queue done, kick watched
    used_seen: int = 0  # used index at the last call signal
    need: int | None = None  # served from a C thread: its "needs Python" eventfd (watched instead of kick)
    # While started: the ring's flags and indexes in guest RAM, read and
    # written in place (the mapping outlives the ring: Relay.replace_memory
    # is refused while a queue uses it).
    avail_flags: ctypes.c_uint16 | None = None
    avail_idx: ctypes.c_uint16 | None = None
    used_flags: ctypes.c_uint16 | None = None
    used_idx: ctypes.c_uint16 | None = None

    def fds(self) -> list[int]:
        return [fd for fd in (self.kick, self.call, self.err) if fd is not None]


@dataclass
class _Mapped:
    """A memory table as mapped: the regions and the fds backing them."""

    regions: tuple[MemRegion, ...] = ()
    fds: list[int] = field(default_factory=list)


class VhostUserDevice:
    """A virtio-iommu device over vhost-user: one front end's messages → :class:`Relay` calls.

    ``relay`` is the device (built with its options and endpoints by the
    caller; it lives longer than a connection); ``loop`` is where the kick
    eventfds are watched.  :meth:`handle` serves one decoded message and
    returns the reply bytes (``None``: none is due), raising
    :class:`VhostUserError` for a message that is malformed for its state or
    out of order; the caller then calls :meth:`disconnect`, which resets the
    device and forgets the front end's memory and fds, ready for the next.
    """

    def __init__(self, relay: Relay, loop: Loop, *, busy_poll: float = BUSY_POLL, kick_thread: bool = KICK_THREAD,
                 kick_spin: float = KICK_SPIN, kick_priority: int = KICK_PRIORITY) -> None:  # fmt: skip
        self.relay = relay
        self.loop = loop
        # Serve the request queue from a C thread (Relay.serve_queue_in_thread)
        # while it is started and enabled, with this spin; the Python busy
        # poll below is then not used.
        self.kick_thread = kick_thread
        self.kick_spin = kick_spin
        self.kick_priority = kick_priority  # SCHED_FIFO priority of that thread (0: normal)
        # After serving a kick of the request queue, look at its avail index
        # for up to this many seconds before sleeping again (0: never, the
        # default: see BUSY_POLL).  A
        # virtio-iommu driver sends its requests one at a time and spins
        # until each is used (Linux 6.12 viommu_sync_req), so the next one
        # follows a reply within microseconds: catching it here saves the
        # eventfd wakeup of this process, and with VRING_USED_F_NO_NOTIFY
        # set meanwhile the guest skips its notify (an MMIO exit) as well.
        self.busy_poll = busy_poll
        # Called when serving a kick failed unexpectedly (the connection
        # ends itself then); without one the error is only logged.
        self.on_error: Callable[[BaseException], None] | None = None
        self._new_session()

    def _new_session(self) -> None:
        self.owner = False
        self.protocol_features = 0  # negotiated (SET_PROTOCOL_FEATURES)
        self.protocol_negotiated = False  # rings start disabled (vhost-user.rst "Ring states")
        self.features: int | None = None  # SET_FEATURES, without bit 30
        self.rings = [_Ring() for _ in range(NUM_QUEUES)]
        self.mapped = _Mapped()
        self.running = False  # a ring was started since the last reset
        self.broken_reported = False

    # --- what the device offers --------------------------------------------------------

    @property
    def offered_features(self) -> int:
        """GET_FEATURES: the relay's virtio features (VERSION_1 among them) and the protocol bit."""
        return self.relay.device_features | PROTOCOL_FEATURES_BIT

    # --- one message ---------------------------------------------------------------------

    def handle(self, msg: Message) -> bytes | None:
        """Serve ``msg`` (its fds become the device's or are closed); the reply to send, if any."""
        try:
            reply = self._dispatch(msg)
        except BaseException:
            close_fds(msg.fds)
            msg.fds = []
            raise
        if reply is None and msg.need_reply and self.protocol_features & ProtocolFeature.REPLY_ACK:
            reply = u64(0)  # REPLY_ACK: zero is success
        return None if reply is None else encode(msg.request, reply, reply=True)

    def _dispatch(self, msg: Message) -> bytes | None:
        req = msg.request
        if req in _UNSUPPORTED:
            raise VhostUserError(req, f"not supported: {_UNSUPPORTED[req]}")
        if not self.owner and req not in _BEFORE_OWNER:
            raise VhostUserError(req, "before SET_OWNER")
        p = msg.payload
        if req == Request.GET_FEATURES:
            return u64(self.offered_features)
        if req == Request.GET_PROTOCOL_FEATURES:
            return u64(int(OFFERED_PROTOCOL_FEATURES))
        if req == Request.SET_PROTOCOL_FEATURES:
            assert isinstance(p, int)
            if p & ~OFFERED_PROTOCOL_FEATURES:
                raise VhostUserError(req, f"protocol features {p & ~OFFERED_PROTOCOL_FEATURES:#x} were not offered")
            self.protocol_features = p
            self.protocol_negotiated = True
            return None
        if req == Request.GET_QUEUE_NUM:
            self._need_protocol(req, ProtocolFeature.MQ)
            return u64(NUM_QUEUES)
        if req == Request.SET_OWNER:
            if self.owner:
                raise VhostUserError(req, "the session already has an owner")
            self.owner = True
            return None
        if req == Request.RESET_OWNER:
            # Deprecated; "back-ends either ignore this message, or use it to
            # disable all rings": the rings stop, with a device reset.
            self._reset_device("RESET_OWNER")
            return None
        if req == Request.RESET_DEVICE:
            self._need_protocol(req, ProtocolFeature.RESET_DEVICE)
            self._reset_device("RESET_DEVICE")
            return None
        if req == Request.SET_FEATURES:
            assert isinstance(p, int)
            self._set_features(req, p)
            return None
        if req == Request.GET_CONFIG:
            assert isinstance(p, ConfigMsg)
            return self._get_config(req, p)
        if req == Request.SET_CONFIG:
            assert isinstance(p, ConfigMsg)
            return self._set_config(req, p, msg.need_reply)
        if req == Request.SET_MEM_TABLE:
            assert isinstance(p, MemTable)
            fds, msg.fds = msg.fds, []
            self._set_mem_table(req, p, fds)
            return None
        if req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            assert isinstance(p, int)
            fd = None if p & VRING_NOFD else msg.fds[0]
            msg.fds = []
            self._set_vring_fd(req, p & 0xFF, fd)
            return None
        if req == Request.SET_VRING_ADDR:
            assert isinstance(p, VringAddr)
            self._set_vring_addr(req, p)
            return None
        assert isinstance(p, VringState)
        if req == Request.SET_VRING_NUM:
            ring = self._stopped_ring(req, p.index)
            if p.num == 0 or p.num > 32768 or p.num & (p.num - 1):
                raise VhostUserError(req, f"ring {p.index}: size {p.num} is not a power of two <= 32768 (virtio 1.2 §2.7)")
            ring.num = p.num
            return None
        if req == Request.SET_VRING_BASE:
            ring = self._stopped_ring(req, p.index)
            if p.num > 0xFFFF:
                # Split rings only (VIRTIO_F_RING_PACKED is not offered): a u16 index.
                raise VhostUserError(req, f"ring {p.index}: base {p.num} is not a split ring's u16 index")
            ring.base = p.num
            return None
        if req == Request.GET_VRING_BASE:
            return vring_state(p.index, self._get_vring_base(req, p.index))
        if req == Request.SET_VRING_ENABLE:
            self._set_vring_enable(req, p)
            return None
        raise VhostUserError(req, "not served")  # every Request is handled above

    def _need_protocol(self, req: Request, feature: ProtocolFeature) -> None:
        if not self.protocol_features & feature:
            raise VhostUserError(req, f"protocol feature {feature.name} was not negotiated")

    def _ring(self, req: Request, index: int) -> _Ring:
        if not 0 <= index < NUM_QUEUES:
            raise VhostUserError(req, f"ring {index}: virtio-iommu has {NUM_QUEUES} (requestq, eventq)")
        return self.rings[index]

    def _stopped_ring(self, req: Request, index: int) -> _Ring:
        ring = self._ring(req, index)
        if ring.started:
            raise VhostUserError(req, f"ring {index} is started (stop it with GET_VRING_BASE first)")
        return ring

    # --- features and config -----------------------------------------------------------

    def _set_features(self, req: Request, value: int) -> None:
        if value & ~self.offered_features:
            raise VhostUserError(req, f"features {value & ~self.offered_features:#x} were not offered")
        if any(r.started for r in self.rings):
            raise VhostUserError(req, "features cannot change while rings are started")
        self.features = value & ~PROTOCOL_FEATURES_BIT
        if value & PROTOCOL_FEATURES_BIT:
            self.protocol_negotiated = True
        # The relay records what the driver accepted (it gates the bypass
        # config write on BYPASS_CONFIG) and freezes its config.
        self.relay.ack_features(self.features)

    def _get_config(self, req: Request, cfg: ConfigMsg) -> bytes:
        self._need_protocol(req, ProtocolFeature.CONFIG)
        if cfg.offset + cfg.size > CONFIG_SIZE:
            # "vhost-user back-end uses zero length of payload to indicate an
            # error": not a protocol breach, so the connection stays.
            log.warning("GET_CONFIG of %d bytes at %d: the config space has %d", cfg.size, cfg.offset, CONFIG_SIZE)
            return b""
        data = self.relay.config_bytes()[cfg.offset : cfg.offset + cfg.size]
        return config_msg(cfg.offset, data, flags=cfg.flags)

    def _set_config(self, req: Request, cfg: ConfigMsg, need_reply: bool) -> bytes | None:
        self._need_protocol(req, ProtocolFeature.CONFIG)
        if cfg.offset + cfg.size > CONFIG_SIZE:
            log.warning("SET_CONFIG of %d bytes at %d refused: the config space has %d",
                        cfg.size, cfg.offset, CONFIG_SIZE)  # fmt: skip
            return u64(1) if need_reply else None
        # QEMU 11.1's vhost-user-base sends the whole 40 bytes at offset 0
        # on every guest write (vub_set_config); only bypass (offset 36) is
        # writable and the relay ignores the read-only bytes (5.13.4, D-05).
        self.relay.write_config(cfg.offset, cfg.data)
        return None

    # --- memory ----------------------------------------------------------------------------

    def _set_mem_table(self, req: Request, table: MemTable, fds: list[int]) -> None:
        try:
            regions = self._check_regions(req, table.regions)
            if regions == self.mapped.regions:
                # The same layout again (same memfds, as QEMU re-sends it on
                # every start, a driver rebind's too): keep the mapping the
                # rings and mappings already use.
                close_fds(fds)
                log.info("vhost-user: SET_MEM_TABLE: the same %d regions, mapping kept", len(regions))
                return
            try:
                self.relay.replace_memory((r.guest_addr, r.size, fd, r.mmap_offset) for r, fd in zip(regions, fds))
            except RuntimeError as exc:
                raise VhostUserError(req, f"a new memory layout while the device uses the old one: {exc}") from None
            except (ValueError, OSError) as exc:
                raise VhostUserError(req, f"cannot map the regions: {exc}") from None
        except BaseException:
            close_fds(fds)
            raise
        close_fds(self.mapped.fds)
        self.mapped = _Mapped(regions, fds)
        log.info("vhost-user: SET_MEM_TABLE: %d regions mapped (%d MiB)", len(regions), sum(r.size for r in regions) >> 20)

    @staticmethod
    def _check_regions(req: Request, regions: Sequence[MemRegion]) -> tuple[MemRegion, ...]:
        for r in regions:
            if r.size == 0 or r.guest_addr + r.size > 1 << 64 or r.user_addr + r.size > 1 << 64:
                raise VhostUserError(req, f"region {r}: empty or wrapping")
            if r.mmap_offset % mmap_granularity():
                raise VhostUserError(req, f"region {r}: mmap offset not page aligned")
        by_gpa = sorted(regions, key=lambda r: r.guest_addr)
        by_uva = sorted(regions, key=lambda r: r.user_addr)
        for a, b in [*zip(by_gpa, by_gpa[1:])]:
            if a.guest_addr + a.size > b.guest_addr:
                raise VhostUserError(req, f"regions {a} and {b} overlap in guest-physical space")
        for a, b in [*zip(by_uva, by_uva[1:])]:
            if a.user_addr + a.size > b.user_addr:
                raise VhostUserError(req, f"regions {a} and {b} overlap in user space")
        return tuple(regions)

    def uva_to_gpa(self, uva: int, size: int) -> int | None:
        """The guest-physical address of a front-end user address span (inside one region), or ``None``."""
        for r in self.mapped.regions:
            if r.user_addr <= uva and uva + size <= r.user_addr + r.size:
                return r.guest_addr + (uva - r.user_addr)
        return None

    # --- rings -----------------------------------------------------------------------------

    def _set_vring_addr(self, req: Request, a: VringAddr) -> None:
        ring = self._stopped_ring(req, a.index)
        if a.flags:
            raise VhostUserError(req, f"ring {a.index}: flags {a.flags:#x} (VHOST_VRING_F_LOG: logging is not offered)")
        if ring.num is None:
            raise VhostUserError(req, f"ring {a.index}: before SET_VRING_NUM")
        if not self.mapped.regions:
            raise VhostUserError(req, f"ring {a.index}: before SET_MEM_TABLE")
        n = ring.num
        # The front end's user addresses (vhost-user.rst: without
        # VIRTIO_F_IOMMU_PLATFORM a ring address is a user address); the
        # relay takes guest-physical ones.
        spans = {"descriptor table": (a.desc, 16 * n), "avail ring": (a.avail, 6 + 2 * n),
                 "used ring": (a.used, 6 + 8 * n)}  # fmt: skip
        gpas: dict[str, int] = {}
        for what, (uva, size) in spans.items():
            gpa = self.uva_to_gpa(uva, size)
            if gpa is None:
                raise VhostUserError(req, f"ring {a.index}: {what} at user address {uva:#x} is outside the memory table")
            gpas[what] = gpa
        ring.addr = (gpas["descriptor table"], gpas["avail ring"], gpas["used ring"])

    def _set_vring_fd(self, req: Request, index: int, fd: int | None) -> None:
        try:
            ring = self._ring(req, index)
            if req == Request.SET_VRING_KICK:
                if fd is None:
                    raise VhostUserError(req, f"ring {index}: no kick fd (polling) is not supported")
                self._start_ring(req, index, ring, fd)
                return
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        # CALL and ERR may change at any time (QEMU 11.1 sets them at connect
        # and again when the rings start); no fd: the front end polls.
        attr = "call" if req == Request.SET_VRING_CALL else "err"
        threaded = attr == "call" and ring.need is not None
        if threaded:
            self._disarm(ring)  # the thread writes the old call fd: stop it before that fd closes
        old = getattr(ring, attr)
        setattr(ring, attr, fd)
        if old is not None:
            os.close(old)
        if threaded:
            self._arm(index)

    def _start_ring(self, req: Request, index: int, ring: _Ring, kick: int) -> None:
        """The kick fd arrived: the ring is fully described, place it in the relay and watch the kick."""
        if ring.started:
            raise VhostUserError(req, f"ring {index} is started already")
        if ring.num is None or ring.addr is None:
            raise VhostUserError(req, f"ring {index}: before SET_VRING_NUM and SET_VRING_ADDR")
        desc, avail, used = ring.addr
        try:
            self.relay.set_queue(index, size=ring.num, desc=desc, avail=avail, used=used, avail_index=ring.base)
        except ValueError as exc:
            raise VhostUserError(req, str(exc)) from None
        ring.kick = kick
        ring.started = True
        ring.used_seen = self.relay.queue_position(index).used
        hva = self.relay.memory.host_address
        ring.avail_flags = ctypes.c_uint16.from_address(hva(avail))  # struct vring_avail: flags, idx, ring[]
        ring.avail_idx = ctypes.c_uint16.from_address(hva(avail + 2))
        ring.used_flags = ctypes.c_uint16.from_address(hva(used))  # struct vring_used: flags, idx, ring[]
        ring.used_idx = ctypes.c_uint16.from_address(hva(used + 2))
        # vhost-user.rst "Ring states": with VHOST_USER_F_PROTOCOL_FEATURES a
        # ring starts disabled until SET_VRING_ENABLE 1, otherwise enabled.
        ring.enabled = ring.enabled or not self.protocol_negotiated
        self.running = True
        self.loop.add_reader(kick, lambda: self._on_kick(index))
        # One line per ring start (``serve -v``): after a guest driver's
        # reset or rebind, the log shows the rings set up again.
        log.info("vhost-user: ring %d started: SET_VRING_NUM %d, SET_VRING_BASE %d, SET_VRING_ADDR desc %#x "
                 "avail %#x used %#x (guest-physical), SET_VRING_KICK", index, ring.num, ring.base, desc, avail, used)
        self._arm(index)

    def _set_vring_enable(self, req: Request, p: VringState) -> None:
        ring = self._ring(req, p.index)
        if not self.protocol_negotiated:
            raise VhostUserError(req, "only when VHOST_USER_F_PROTOCOL_FEATURES was negotiated")
        if p.num not in (0, 1):
            raise VhostUserError(req, f"ring {p.index}: enable {p.num}, not 0 or 1")
        was = ring.enabled
        ring.enabled = bool(p.num)
        if not ring.enabled:
            self._disarm(ring)  # a disabled ring is not served: its kicks come back to _on_kick
        if ring.enabled and not was and ring.started:
            self._arm(p.index)
            # Buffers the driver made available while the ring was disabled.
            self._serve(p.index)

    def _get_vring_base(self, req: Request, index: int) -> int:
        ring = self._ring(req, index)
        if self.running:
            # The first ring to stop stops the device: every ring's position
            # is kept for its own GET_VRING_BASE, then the device resets (see
            # the module docstring for why a stop is a reset).
            self._stop_all(f"GET_VRING_BASE of ring {index}")
        return ring.base

    def _stop_all(self, why: str) -> None:
        for ring in self.rings:
            self._disarm(ring)  # before the positions are read: the thread moves them
        for i, ring in enumerate(self.rings):
            if ring.started:
                try:
                    ring.base = self.relay.queue_position(i).next_avail
                except ValueError:
                    pass
                self._unwatch(ring)
            ring.enabled = False
        if self.running:
            log.info("vhost-user: %s: rings stopped, device reset", why)
        self.running = False
        self.broken_reported = False
        self.relay.reset()

    def _reset_device(self, why: str) -> None:
        # Logged even when no ring ran (then _stop_all says nothing): the log
        # tells a RESET_DEVICE from a stop by GET_VRING_BASE.
        log.info("vhost-user: %s: ring setup cleared", why)
        self._stop_all(why)
        for ring in self.rings:
            ring.num, ring.addr, ring.base = None, None, 0

    def _arm(self, index: int) -> None:
        """Serve ring ``index`` from a C thread if it can be (the request queue, started, enabled)."""
        ring = self.rings[index]
        if (index != 0 or not self.kick_thread or self.busy_poll > 0 or ring.need is not None or not ring.started
                or not ring.enabled or ring.kick is None):  # fmt: skip
            return
        need = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            ok = self.relay.serve_queue_in_thread(index, ring.kick, -1 if ring.call is None else ring.call, need,
                                                  spin=self.kick_spin, rt_priority=self.kick_priority)  # fmt: skip
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("vhost-user: ring %d: no service thread (%s); kicks are served by the loop", index, exc)
            ok = False
        except BaseException:
            os.close(need)
            raise
        if not ok:
            os.close(need)
            return
        ring.need = need
        # The thread owns the kick eventfd now (two readers would split the
        # kicks between them).
        self.loop.remove_reader(ring.kick)
        self.loop.add_reader(need, lambda: self._on_handover(index))
        log.info("vhost-user: ring %d served from a C thread (spin %.0f us, SCHED_FIFO %d)", index, self.kick_spin * 1e6,
                 self.kick_priority)  # fmt: skip

    def _disarm(self, ring: _Ring) -> None:
        """Stop ring's C thread, if any; the loop watches its kick again."""
        need = ring.need
        if need is None:
            return
        ring.need = None
        self.loop.remove_reader(need)
        try:
            stats = self.relay.queue_thread_stats(0)
            self.relay.stop_queue_thread(0)
            if stats is not None:
                log.info("vhost-user: ring 0's C thread stopped: %s", ", ".join(f"{k} {v}" for k, v in stats.items()))
        finally:
            os.close(need)
            if ring.kick is not None and ring.started:
                index = self.rings.index(ring)
                self.loop.add_reader(ring.kick, lambda: self._on_kick(index))

    def _on_handover(self, index: int) -> None:
        """The ring's C thread stopped at something it does not serve: serve the ring here, then resume it."""
        ring = self.rings[index]
        if ring.need is None:
            return
        try:
            try:
                os.read(ring.need, 8)
            except BlockingIOError:
                return  # no hand-over pending: the thread is not waiting for a resume
            self._serve(index, handover=True)
            if not self.relay.resume_queue_thread(index):
                log.error("vhost-user: ring %d: the service thread ended; kicks are served by the loop", index)
                self._disarm(ring)
                self._serve(index)  # kicks the thread took and did not serve
        except Exception as exc:  # a bug must not stop the loop every front end shares
            log.exception("vhost-user: internal error serving ring %d", index)
            if self.on_error is not None:
                self.on_error(exc)

    def _unwatch(self, ring: _Ring) -> None:
        self._disarm(ring)
        if ring.kick is not None:
            self.loop.remove_reader(ring.kick)
            os.close(ring.kick)
            ring.kick = None
        ring.started = False
        ring.avail_flags = ring.avail_idx = ring.used_flags = ring.used_idx = None

    # --- the data path ---------------------------------------------------------------------

    def _on_kick(self, index: int) -> None:
        ring = self.rings[index]
        if ring.kick is None:
            return
        try:
            try:
                os.read(ring.kick, 8)  # an eventfd: the counter goes back to 0
            except BlockingIOError:
                return  # another reader took it
            if ring.enabled:
                self._serve(index)
                if index == 0 and self.busy_poll > 0:
                    self._poll(ring)
        except Exception as exc:  # a bug must not stop the loop every front end shares
            log.exception("vhost-user: internal error serving ring %d", index)
            if self.on_error is not None:
                self.on_error(exc)

    def _serve(self, index: int, *, handover: bool = False) -> int:
        """Process queue ``index`` and interrupt for every ring whose used index moved.

        ``handover``: the ring's C thread asked for it (Relay.queue_thread_handover).
        """
        if not self.rings[index].started:
            return 0
        done = self.relay.queue_thread_handover(index) if handover else self.relay.process_queue(index)
        self.signal_used()
        ring = self.rings[index]
        assert ring.used_idx is not None and ring.avail_idx is not None
        # Every request is completed in order before process_queue returns,
        # so a used index behind the avail index means the queue stopped --
        # or the driver added more since (its kick is on the way): only then
        # is needs_reset worth asking (it walks the relay's queues; at a kick
        # rate of 10^4/s the question costs more than the request).
        if ring.used_idx.value != ring.avail_idx.value and self.relay.needs_reset and not self.broken_reported:
            self.broken_reported = True
            # The relay stopped the queue (an impossible avail entry or
            # index).  Without a back-end channel the front end cannot be
            # asked for DEVICE_NEEDS_RESET; the error eventfd is the ring's
            # "an error occurred" signal (vhost-user.rst SET_VRING_ERR).
            log.error("vhost-user: ring %d stopped on a driver error; the guest must reset the device", index)
            for ring in self.rings:
                if ring.err is not None:
                    _signal(ring.err)
        return done

    def _poll(self, ring: _Ring) -> None:
        """Serve the request queue while requests keep coming within ``busy_poll`` s of each other."""
        avail, used_flags = ring.avail_idx, ring.used_flags
        assert avail is not None and used_flags is not None
        clock = time.perf_counter
        now = clock()
        deadline, stop = now + self.busy_poll, now + BUSY_POLL_MAX
        taken = self.relay.queue_position(0).next_avail
        # §2.7.10: with VRING_USED_F_NO_NOTIFY the driver need not notify
        # (Linux 6.12 virtqueue_kick_prepare_split reads it after a full
        # barrier), and a notify from before it was seen is read as an
        # empty kick later.
        used_flags.value |= _USED_F_NO_NOTIFY
        try:
            while ring.started and ring.enabled:
                if avail.value != taken:
                    if not self._serve(0):
                        break  # the queue broke or stopped: nothing more to take
                    taken = self.relay.queue_position(0).next_avail
                    now = clock()
                    deadline = now + self.busy_poll
                    if now >= stop:
                        break
                elif clock() >= deadline:
                    break
        finally:
            if ring.started:
                used_flags.value &= ~_USED_F_NO_NOTIFY
        if ring.started and ring.enabled:
            # A request made available after the last look, whose driver saw
            # NO_NOTIFY and did not kick: the flag is clear now, and
            # process_queue takes the relay's mutex (pthread_mutex_lock, a
            # locked instruction: a full barrier on x86) before it reads the
            # avail index, so the clear is visible first (the same store ->
            # barrier -> load the driver does the other way round).
            self._serve(0)

    def signal_used(self) -> None:
        """Write the call eventfd of each started ring whose used index moved since the last call.

        Not when the driver asked for no interrupts (VRING_AVAIL_F_NO_INTERRUPT,
        virtio 1.2 §2.7.7.2: no VIRTIO_F_EVENT_IDX is offered, so the flag is
        the driver's only say).  Linux 6.12's virtio-iommu sets it on the
        request queue, which has no callback (it spins on the used ring);
        interrupting it anyway costs the guest an MSI-X it has no use for
        (QEMU 11.1 injects one per call eventfd write under TCG: without
        irqfd, virtio_queue_guest_notifier_read -> virtio_irq).
        """
        for ring in self.rings:
            if not ring.started or ring.used_idx is None or ring.avail_flags is None:
                continue
            used = ring.used_idx.value
            if used != ring.used_seen:
                ring.used_seen = used
                if ring.call is not None and not ring.avail_flags.value & _AVAIL_F_NO_INTERRUPT:
                    _signal(ring.call)

    def deliver_events(self) -> int:
        """Fill the event queue with the relay's pending fault records and interrupt; how many.

        For front ends that translate DMA through the same relay (a
        vfio-user endpoint's faults are recorded by ``Relay.translate``):
        call after such a fault so the guest's driver hears of it.  Nothing
        while the event queue is not started and enabled (the records wait
        in the relay, up to its ``event_limit``).
        """
        ring = self.rings[1]
        if not (ring.started and ring.enabled):
            return 0
        return self._serve(1)

    # --- the end of a front end ------------------------------------------------------------

    def disconnect(self) -> None:
        """The front end is gone: device reset, rings and fds dropped, its memory unmapped."""
        try:
            self._stop_all("disconnect")
        finally:
            for ring in self.rings:
                close_fds(ring.fds())
            try:
                self.relay.replace_memory(())
            except RuntimeError as exc:  # a domain survived the reset (a backend refused to detach)
                log.error("vhost-user: guest memory stays mapped after disconnect: %s", exc)
            else:
                close_fds(self.mapped.fds)
            self._new_session()


def mmap_granularity() -> int:
    """The alignment mmap needs of a file offset."""
    import mmap

    return mmap.ALLOCATIONGRANULARITY


def _signal(fd: int) -> None:
    try:
        os.write(fd, _EVENTFD_ONE)
    except BlockingIOError:
        pass  # the counter is at its maximum: the other side has an interrupt pending anyway
    except OSError as exc:
        log.warning("vhost-user: eventfd %d: %s", fd, exc)


class VhostUserConnection:
    """One front end on a connected socket: messages in, replies out, served on ``loop``.

    Any protocol error is logged and ends the connection (the device is
    reset, :meth:`VhostUserDevice.disconnect`); so does an unexpected
    exception, logged with its traceback: a front end can never take the
    serving process down.  ``on_close`` runs once the connection has ended.
    """

    def __init__(self, sock: socket.socket, device: VhostUserDevice, loop: Loop,
                 on_close: Callable[[VhostUserConnection], None] | None = None) -> None:  # fmt: skip
        self.sock = sock
        self.device = device
        self.loop = loop
        self.on_close = on_close
        self.closed = False
        self.error: BaseException | None = None  # what ended it, if not a clean EOF
        sock.settimeout(MESSAGE_TIMEOUT)
        device.on_error = self.close
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            msg = self._read_message()
            if msg is None:
                log.info("vhost-user: front end disconnected")
                self.close()
                return
            reply = self.device.handle(msg)
            if reply is not None:
                self.sock.sendall(reply)
        except VhostUserError as exc:
            log.error("vhost-user: %s; disconnecting", exc)
            self.close(exc)
        except (OSError, TimeoutError) as exc:
            log.error("vhost-user: socket: %s; disconnecting", exc)
            self.close(exc)
        except Exception as exc:  # a bug must not take the server down with it
            log.exception("vhost-user: internal error; disconnecting")
            self.close(exc)

    def _read_message(self) -> Message | None:
        data, fds, flags, _ = socket.recv_fds(self.sock, HEADER.size, MAX_FDS)
        if flags & socket.MSG_CTRUNC:
            close_fds(fds)
            raise VhostUserError(None, f"more than {MAX_FDS} file descriptors came with one message")
        if not data:
            close_fds(fds)
            return None
        try:
            while len(data) < HEADER.size:
                more = self.sock.recv(HEADER.size - len(data))
                if not more:
                    raise VhostUserError(None, f"connection closed inside a header ({len(data)} bytes)")
                data += more
            header = parse_header(data)
            payload = b""
            while len(payload) < header.size:
                more = self.sock.recv(header.size - len(payload))
                if not more:
                    raise VhostUserError(header.request, f"connection closed inside the payload ({len(payload)} of {header.size} bytes)")
                payload += more
        except TimeoutError:
            close_fds(fds)
            raise VhostUserError(None, f"a message stopped arriving for {MESSAGE_TIMEOUT} s") from None
        except BaseException:
            close_fds(fds)
            raise
        return decode(header, payload, list(fds))

    def close(self, error: BaseException | None = None) -> None:
        """End the connection: device reset, socket closed (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.error = error
        self.loop.remove_reader(self.sock.fileno())
        self.device.on_error = None
        try:
            self.device.disconnect()
        finally:
            self.sock.close()
            if self.on_close is not None:
                self.on_close(self)


class VhostUserServer:
    """Listen on a Unix socket and serve one front end at a time with ``device``.

    A second front end connecting while one is served is turned away (its
    socket closed at once, logged); after a disconnect the next one is
    served by the same device and relay.  QEMU is the client here
    (``-chardev socket,path=...`` without ``server=on``).
    """

    def __init__(self, path: str | os.PathLike[str], device: VhostUserDevice, loop: Loop) -> None:
        self.path = Path(path)
        self.device = device
        self.loop = loop
        self.connection: VhostUserConnection | None = None
        self.served = 0  # connections accepted so far
        if self.path.exists() and stat.S_ISSOCK(self.path.stat().st_mode):
            self.path.unlink()  # a stale socket of an earlier run
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.listener.bind(str(self.path))
            self.listener.listen(2)
        except BaseException:
            self.listener.close()
            raise
        loop.add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EINTR):
                log.error("vhost-user: accept on %s: %s", self.path, exc)
            return
        if self.connection is not None:
            log.warning("vhost-user: %s serves one front end at a time; a second one was turned away", self.path)
            sock.close()
            return
        self.served += 1
        log.info("vhost-user: front end connected on %s", self.path)
        self.connection = VhostUserConnection(sock, self.device, self.loop, self._closed)

    def _closed(self, conn: VhostUserConnection) -> None:
        if self.connection is conn:
            self.connection = None

    def close(self) -> None:
        """Stop listening, end the connection if any, remove the socket file."""
        if self.connection is not None:
            self.connection.close()
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class FrontEnd(Protocol):
    """Another front end served on the same loop and relay (a vfio-user endpoint server)."""

    def close(self) -> None:
        """Stop serving and release its sockets."""


#: Makes a front end on the serve loop: given the loop and the vhost-user
#: device (``device.relay`` to translate through, ``device.deliver_events()``
#: after recording a fault).
FrontEndFactory = Callable[[Loop, VhostUserDevice], FrontEnd]


def serve(path: str | os.PathLike[str], relay: Relay, *, frontends: Iterable[FrontEndFactory] = (),
          handle_signals: bool = True, ready: Callable[[VhostUserServer], None] | None = None,
          loop: Loop | None = None, busy_poll: float = BUSY_POLL, kick_thread: bool = KICK_THREAD,
          kick_spin: float = KICK_SPIN, kick_priority: int = KICK_PRIORITY) -> None:  # fmt: skip
    """Serve ``relay`` as a vhost-user virtio-iommu on ``path`` until SIGTERM/SIGINT (or ``loop.stop()``).

    ``frontends`` are made on the same loop after the server listens; with
    ``handle_signals`` SIGTERM and SIGINT stop the loop (the vhost-user
    back-end conventions: end quickly and cleanly on SIGTERM) and the
    previous handlers come back afterwards.  ``ready`` is called with the
    listening server.  ``busy_poll``, ``kick_thread``, ``kick_spin``, ``kick_priority``: see
    :class:`VhostUserDevice`.
    """
    loop = loop if loop is not None else Loop()
    device = VhostUserDevice(relay, loop, busy_poll=busy_poll, kick_thread=kick_thread, kick_spin=kick_spin,
                             kick_priority=kick_priority)  # fmt: skip
    server = VhostUserServer(path, device, loop)
    extra: list[FrontEnd] = []
    old: dict[signal.Signals, Callable[[int, FrameType | None], object] | int | None] = {}

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("vhost-user: signal %d, stopping", signum)
        loop.stop()

    try:
        if handle_signals:
            for s in (signal.SIGTERM, signal.SIGINT):
                old[s] = signal.signal(s, stop)
        for make in frontends:
            extra.append(make(loop, device))
        if ready is not None:
            ready(server)
        loop.run()
    finally:
        for fe in extra:
            try:
                fe.close()
            except Exception:
                log.exception("closing a front end")
        server.close()
        for s, h in old.items():
            signal.signal(s, h)
