"""The queue front end: the request and event virtqueues, walked in C.

:class:`Queues` places the driver's split virtqueues (virtio 1.2 §2.7) in
guest memory and serves them.  One C call (``hr_relay_process``) walks the
request queue and completes every MAP and UNMAP without returning to Python;
it comes back only for what needs the control plane (ATTACH, DETACH, PROBE, a
kernel failure to report, a queue that broke).  Fault records go to the
event queue's buffers (§5.13.6.9).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hostrelay._native import ffi, lib
from hostrelay.dataplane.handle import DataPlane
from hostrelay.model.config import ConfigSpace
from hostrelay.model.control import MAX_READABLE, ControlPlane, internal_error
from hostrelay.model.events import FaultLog

log = logging.getLogger("hostrelay.relay")

_relay_process = lib.hr_relay_process
_relay_process_locked = lib.hr_relay_process_locked
# hr_relay_process's result word (cext/hr_relay.h).
_PROCESS_SHIFT: int = lib.HR_PROCESS_SHIFT
_PROCESS_ERRORS: int = lib.HR_PROCESS_ERRORS
_PROCESS_CODE: int = lib.HR_PROCESS_CODE
_PROCESS_CALLER: int = lib.HR_PROCESS_CALLER
_PROCESS_IDLE: int = lib.HR_PROCESS_IDLE
_PROCESS_BROKEN: int = lib.HR_PROCESS_BROKEN
_PROCESS_ANY = _PROCESS_CODE | _PROCESS_ERRORS  # anything but "all done"


@dataclass(frozen=True, slots=True)
class QueuePosition:
    """Where a queue's device side is (virtio 1.2 §2.7): what a VMM saves and restores.

    ``next_avail`` is the avail-ring index the device takes next (vhost's
    "vring base", what ``VHOST_USER_GET_VRING_BASE`` answers); ``used`` the
    used-ring index it publishes next.  Both wrap at 2^16.  ``broken``: the
    queue stopped on a driver error (:attr:`hostrelay.relay.Relay.needs_reset`).
    """

    next_avail: int
    used: int
    broken: bool


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the device saw and answered it (:meth:`hostrelay.relay.Relay.start_recording`).

    ``request`` is the device-readable part (head + body; for a request the C
    walker served, its first 64 bytes zero-padded to its length, capped at
    one byte more than any request: nothing past that can change the
    answer), ``writable_len`` the size of the device-writable part, and
    ``reply`` exactly the bytes the device wrote (``b""``: used length 0).
    ``Relay.handle_request(request, writable_len)`` on a relay in the same
    state gives ``reply`` again.
    """

    request: bytes
    writable_len: int
    reply: bytes


# Records the C walker keeps before it hands them over (HR_PROCESS_FULL).
_RECORDS = 256


class Queue:
    """A split virtqueue the C walker serves (``struct hr_queue``, cext/hr_relay.h)."""

    __slots__ = ("c", "vq", "chain", "buf", "geometry", "rec")

    def __init__(self) -> None:
        self.c = ffi.new("struct hr_queue *")
        self.vq = ffi.addressof(self.c, "vq")
        self.chain = ffi.addressof(self.c, "chain")
        self.buf = ffi.new("uint8_t[]", MAX_READABLE + 1)  # serve_pending reads no more
        self.geometry: tuple[int, int, int, int] = (0, 0, 0, 0)  # size, desc, avail, used (GPAs) as set up: what a saved state keeps
        self.rec: Any = None

    def record(self, on: bool) -> None:
        """Make the C walker log what it serves (see ``struct hr_queue.rec``), or stop."""
        self.rec = ffi.new("struct hr_record[]", _RECORDS) if on else None
        self.c.rec = self.rec if on else ffi.NULL
        self.c.rec_cap = _RECORDS if on else 0
        self.c.nrec = 0

    def take_records(self, into: list[RecordedRequest]) -> None:
        """Move the walker's records to ``into``, in completion order."""
        c = self.c
        for i in range(c.nrec):
            e = c.rec[i]
            n = min(int(e.read_len), MAX_READABLE + 1)
            req = bytes(ffi.buffer(e.req, min(n, 64))).ljust(n, b"\0")
            used = int(e.used_len)
            reply = bytes(used - 4) + bytes(ffi.buffer(e.tail, 4)) if used >= 4 else bytes(used)
            into.append(RecordedRequest(req, int(e.write_len), reply))
        c.nrec = 0


class KickThread:
    """The request queue served from a C thread (``hr_kick``, cext/hr_kick.c).

    The thread waits on the ring's kick eventfd and serves every plain
    MAP/UNMAP in C with the relay's lock; anything else it leaves in the ring
    and writes ``need_fd`` for Python to serve (:meth:`Queues.thread_handover`),
    then waits for :meth:`resume`.  The fds stay the caller's.
    """

    __slots__ = ("k", "queue", "need_fd", "errs", "_cells")

    def __init__(self, dp: DataPlane, queue: Queue, kick_fd: int, call_fd: int, need_fd: int, spin: float,
                 rt_priority: int = 0) -> None:  # fmt: skip
        # Lock held (hr_kick_start reads the queue's ring pointers).
        self.queue = queue  # its struct hr_queue lives as long as the thread uses it
        self.need_fd = need_fd
        self.errs = ffi.new("struct hr_result[]", lib.HR_QUEUE_ERRS)
        # The two generation cells C compares before each walk (exported
        # buffers: the arrays cannot move while these live).
        self._cells = (ffi.from_buffer("int64_t[]", dp.memory.generation_cell),
                       ffi.from_buffer("int64_t[]", dp.fast_cell))  # fmt: skip
        k = lib.hr_kick_start(dp.c, queue.c, kick_fd, call_fd, need_fd, self._cells[0], self._cells[1],
                              max(int(spin * 1e9), 0), rt_priority)  # fmt: skip
        if k == ffi.NULL:
            raise OSError(os.strerror(ffi.errno) if ffi.errno else "hr_kick_start failed")
        # A relay dropped without close() or a reset must not leave a thread
        # walking freed memory: the destructor stops it first, and keeps the
        # relay handle and the queue alive until it has.
        self.k = ffi.gc(k, lambda p, _keep=(dp, queue): lib.hr_kick_free(p))

    @property
    def rt_error(self) -> int:
        """Why the real-time priority asked for was refused (an errno), else 0."""
        return int(lib.hr_kick_rt_error(self.k))

    def resume(self) -> None:
        """Let the thread serve kicks again after a hand-over."""
        lib.hr_kick_resume(self.k)

    @property
    def failed(self) -> bool:
        """The thread ended on its own (a poll failed): Python must take the kicks back."""
        return bool(lib.hr_kick_failed(self.k))

    def take_errs(self) -> list[Any]:
        """The kernel failures the thread met and did not report yet (lock held)."""
        n = lib.hr_kick_take_errs(self.k, self.errs)
        return [self.errs[i] for i in range(n)]

    def stop(self) -> None:
        """Stop and join the thread (never with the relay's lock held: the thread may wait for it)."""
        lib.hr_kick_stop(self.k)

    def free(self) -> None:
        """Release the thread's C state (after :meth:`stop`)."""
        ffi.release(self.k)  # the destructor above, now

    def stats(self) -> dict[str, int]:
        """The thread's counters (``struct hr_kick_stats``)."""
        st = ffi.new("struct hr_kick_stats *")
        lib.hr_kick_get_stats(self.k, st)
        return {f: int(getattr(st, f)) for f in ("kicks", "served", "handovers", "calls", "spin_hits")}


class Queues:
    """requestq (0) and eventq (1) of one device."""

    def __init__(self, dp: DataPlane, config: ConfigSpace, control: ControlPlane, events: FaultLog,
                 report_failure: Callable[[Any], None]) -> None:  # fmt: skip
        self.dp = dp
        self.c = dp.c  # the hot path's operands, one attribute load each
        self.memory = dp.memory
        self.config = config
        self.control = control
        self.events = events
        # The deque itself: the hot path's "no fault record waiting" is then
        # a C-level truth test, not a Python call.
        self.records = events.records
        self.report_failure = report_failure
        self.queues: dict[int, Queue] = {}
        self.requestq: Queue | None = None  # queues[0], for process_queue's fast path
        self.recording: list[RecordedRequest] | None = None  # see start_recording
        self.kick: KickThread | None = None  # the requestq's service thread, if it has one

    def set_queue(self, index: int, *, size: int, desc: int, avail: int, used: int,
                  avail_index: int | None = None) -> None:  # fmt: skip
        """See :meth:`hostrelay.relay.Relay.set_queue`."""
        with self.dp.lock:
            self.setup_locked(index, size=size, desc=desc, avail=avail, used=used, avail_index=avail_index)

    def setup_locked(self, index: int, *, size: int, desc: int, avail: int, used: int,
                     avail_index: int | None = None) -> Any:  # fmt: skip
        """:meth:`set_queue` with the relay's lock held; returns the queue's ``struct hr_vq``."""
        if index not in (0, 1):
            raise ValueError("virtio-iommu has two queues: 0 (requestq) and 1 (eventq)")
        if avail_index is not None and not 0 <= avail_index <= 0xFFFF:
            raise ValueError(f"queue {index}: avail index {avail_index} is not a u16")
        dp = self.dp
        dp.sync_memory()
        q = Queue()
        rc = lib.hr_vq_setup(q.vq, lib.hr_relay_memory(dp.c), size, desc, avail, used)
        if rc < 0:
            raise ValueError(f"queue {index}: invalid geometry or rings outside guest RAM (errno {-rc})")
        q.geometry = (size, desc, avail, used)
        if self.recording is not None:
            q.record(True)
        if avail_index is not None:
            # hr_vq_setup resumed at the used index in guest memory; a
            # VMM restoring a queue says where the device had got to (the
            # used index stays the ring's: the device completes in order,
            # so at rest the two are equal, and the driver's memory has
            # the one it was shown).  A position the avail index is more
            # than a ring ahead of breaks the queue at its first walk.
            q.vq.last_avail = avail_index
        self.queues[index] = q
        if index == 0:
            self.requestq = q
        # A driver sets up its queues after reading the config (virtio
        # 1.2 §3.1.1 steps 5-7), so process_queue need not say it again.
        self.config.frozen = True
        return q.vq

    def start_recording(self, into: list[RecordedRequest]) -> None:
        """Record every request the queues serve into ``into`` (lock held)."""
        self.recording = into
        for q in self.queues.values():
            q.record(True)

    def stop_recording(self) -> None:
        """Stop recording (lock held); what was recorded stays in the list."""
        self.collect_records()  # the walker's last records
        for q in self.queues.values():
            q.record(False)
        self.recording = None

    def collect_records(self) -> None:
        """Move what the C walker recorded to the recording (lock held).

        Python's walk takes them itself before it returns; the service
        thread's walk leaves them in the queue until then.
        """
        if self.recording is not None:
            for q in self.queues.values():
                q.take_records(self.recording)

    # --- the request queue's service thread ----------------------------------------------

    def serve_in_thread(self, index: int, kick_fd: int, call_fd: int, need_fd: int, spin: float,
                        rt_priority: int = 0) -> bool:  # fmt: skip
        """See :meth:`hostrelay.relay.Relay.serve_queue_in_thread`."""
        if index != 0:
            raise ValueError("only the request queue (0) is served from a thread")
        if self.kick is not None:
            raise RuntimeError("queue 0 is served from a thread already")
        dp = self.dp
        with dp.lock:
            q = self.requestq
            if q is None:
                raise ValueError("queue 0 is not set up")
            dp.sync_memory()
            if dp.fast_generation != dp.memory.generation:
                # Every MAP needs a RLIMIT_MEMLOCK refresh from Python
                # first (DataPlane.fast): the thread would hand every
                # kick over.
                return False
            self.kick = KickThread(dp, q, kick_fd, call_fd, need_fd, spin, rt_priority)
        if self.kick.rt_error:
            log.warning("queue 0's service thread: SCHED_FIFO %d refused (%s); it runs at normal priority",
                        rt_priority, os.strerror(self.kick.rt_error))  # fmt: skip
        return True

    def stop_thread(self) -> None:
        """Stop and join the service thread if there is one; report what it left (lock NOT held)."""
        k = self.kick
        if k is None:
            return
        self.kick = None
        k.stop()
        try:
            with self.dp.lock:
                for res in k.take_errs():
                    self.report_failure(res)
        finally:
            k.free()

    def thread_handover(self, index: int) -> int:
        """See :meth:`hostrelay.relay.Relay.queue_thread_handover`."""
        k = self.kick
        if k is not None:
            with self.dp.lock:
                for res in k.take_errs():  # met before anything the walk below serves
                    self.report_failure(res)
        return self.process_queue(index)

    def resume_thread(self) -> bool:
        """Resume the service thread after a hand-over; False if it ended on its own."""
        k = self.kick
        if k is None:
            return False
        if k.failed:
            return False
        k.resume()
        return True

    def position(self, index: int) -> QueuePosition:
        """See :meth:`hostrelay.relay.Relay.queue_position`."""
        with self.dp.lock:
            q = self.queues.get(index)
            if q is None:
                raise ValueError(f"queue {index} is not set up")
            vq = q.vq
            return QueuePosition(int(vq.last_avail), int(vq.used_idx), bool(vq.broken))

    def clear(self) -> None:
        """Forget the queues (device reset; lock held)."""
        self.queues.clear()
        self.requestq = None

    def process_queue(self, index: int = 0) -> int:
        """See :meth:`hostrelay.relay.Relay.process_queue`."""
        q = self.requestq
        if (index == 0 and q is not None and self.dp.fast_generation == self.memory.generation and not self.records
                and self.recording is None):
            # The usual call, kept short: measured under TCG, the Python
            # around the C walker is a fixed cost paid once per kick.  The C
            # call takes the lock itself and keeps it when there is more to do.
            rc: int = _relay_process_locked(self.c, q.c)
            if not rc & _PROCESS_ANY:
                return rc >> _PROCESS_SHIFT  # every request done in C
            try:
                return self._process_rest(q, rc)
            finally:
                self.dp.lock.release()
        dp = self.dp
        with dp.lock:
            q = self.queues.get(index)
            if q is None:
                raise ValueError(f"queue {index} is not set up")
            if index == 1:
                return self.fill_events(q)
            if dp.fast_generation != dp.memory.generation:
                dp.sync_memory()
                if not dp.fast:
                    dp.sync_memlock()
            # Per call, not per request: the C walker completes every
            # MAP/UNMAP itself and returns only for what needs Python.
            return self._process_rest(q, _relay_process(dp.c, q.c))

    def _process_rest(self, q: Queue, rc: int) -> int:
        """process_queue after the first C call: failures to report, requests
        for the control plane, fault records for the eventq.  Lock held."""
        c, qc, done = self.dp.c, q.c, 0
        while True:
            if self.recording is not None:
                q.take_records(self.recording)  # before a chain Python serves: completion order
            done += rc >> _PROCESS_SHIFT
            if rc & _PROCESS_ERRORS:
                for i in range(qc.nerrs):
                    self.report_failure(qc.errs[i])
            code = rc & _PROCESS_CODE
            if code == _PROCESS_IDLE:
                break
            if code == _PROCESS_BROKEN:
                self._queue_broke(0)
                break
            if code == _PROCESS_CALLER:
                self._serve_pending(q)
                done += 1
            rc = _relay_process(c, qc)
        events = self.queues.get(1)
        if events is not None and self.records:
            self.fill_events(events)
        return done

    def _serve_pending(self, q: Queue) -> None:
        chain = q.chain
        # At most MAX_READABLE + 1 bytes, whatever the chain claims: one byte
        # more than any request tells "too long" as well as the whole would.
        n = lib.hr_chain_read(chain, q.buf, len(q.buf))
        wlen = int(chain.write_len)
        try:
            reply = self.control.handle(bytes(ffi.buffer(q.buf, n)), wlen)
        except Exception:  # as in handle_request: a bug must not take the device down
            log.exception("internal error handling a request from the ring")
            reply = internal_error(wlen)
        lib.hr_relay_complete(q.vq, chain, reply, len(reply))
        if self.recording is not None:
            self.recording.append(RecordedRequest(bytes(ffi.buffer(q.buf, n)), wlen, reply))

    @staticmethod
    def _queue_broke(index: int) -> None:
        log.error(
            "queue %d: the driver made a descriptor index >= the queue size available, or moved "
            "the avail index more than the queue size ahead; the queue is stopped until the "
            "device is reset (set DEVICE_NEEDS_RESET)",
            index,
        )

    @property
    def needs_reset(self) -> bool:
        """See :attr:`hostrelay.relay.Relay.needs_reset`."""
        return any(q.vq.broken for q in self.queues.values())

    def fill_events(self, q: Queue) -> int:
        """Give pending fault records to the eventq's buffers; how many were completed."""
        # 5.13.6.9: each event buffer gets one 24-byte fault record; buffers
        # stay with the device until there is something to report.
        done = 0
        while self.records and lib.hr_vq_pending(q.vq):
            if lib.hr_vq_pop(q.vq, q.chain, ffi.NULL) != 1:
                if q.vq.broken:
                    self._queue_broke(1)
                    break
                lib.hr_vq_push(q.vq, q.chain.head, 0)  # malformed: give it back empty
                continue
            record = self.events.take()
            assert record is not None
            if q.chain.write_len < len(record):
                lib.hr_vq_push(q.vq, q.chain.head, 0)
                self.events.put_back(record)
                continue
            lib.hr_relay_complete(q.vq, q.chain, record, len(record))
            done += 1
        return done
