"""A minimal userspace NVMe admin-queue driver over VFIO (NVMe 1.4 base spec).

Enough to prove that a protocol-realistic DMA engine works through IOMMU
mappings: reset the controller, place the admin submission/completion queues
and a data buffer at IOVAs the caller mapped, and run Identify Controller.
The controller DMAs the queues and the 4 KiB result itself, so every byte
crosses the IOMMU.  Polling only (no interrupts).

Queue memory is described by IOVA (what the controller is told) and by a
callable that reads/writes it (what the driver itself sees), so the same
driver works with host buffers mapped through a ``Container`` and with guest
memory mapped through the relay.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from hostrelay.kernel.vfio import Device

__all__ = ["AdminQueues", "IdentifyController", "Nvme", "NvmeError", "CLASS_NVME"]

CLASS_NVME = 0x010802  # mass storage / NVM / NVMe

# Controller registers (NVMe 1.4 §3.1).
_CAP, _CC, _CSTS, _AQA, _ASQ, _ACQ = 0x00, 0x14, 0x1C, 0x24, 0x28, 0x30
_DOORBELLS = 0x1000
_OPC_IDENTIFY = 0x06
_CNS_CONTROLLER = 0x01


class NvmeError(RuntimeError):
    """The controller did not become ready, timed out, or failed a command."""


@dataclass(frozen=True)
class AdminQueues:
    """Where the admin queues and the data buffer live (IOVAs, page aligned)."""

    sq_iova: int
    cq_iova: int
    data_iova: int
    entries: int = 16


@dataclass(frozen=True)
class IdentifyController:
    """The fields of Identify Controller (CNS 01h) worth showing."""

    vid: int
    serial: str
    model: str
    firmware: str

    @classmethod
    def parse(cls, data: bytes) -> IdentifyController:
        return cls(
            vid=int.from_bytes(data[0:2], "little"),
            serial=data[4:24].decode("ascii", "replace").strip(),
            model=data[24:64].decode("ascii", "replace").strip(),
            firmware=data[64:72].decode("ascii", "replace").strip(),
        )


class Nvme:
    """Drive an NVMe function opened through VFIO (BAR0 = controller registers)."""

    def __init__(self, device: Device, read: Callable[[int, int], bytes], write: Callable[[int, bytes], None]) -> None:
        """``read(iova, n)``/``write(iova, data)`` access the memory behind the caller's IOVAs."""
        self.device = device
        self.read = read
        self.write = write
        cap = device.read64(0, _CAP)
        self.stride = 4 << ((cap >> 32) & 0xF)
        self.timeout = max(((cap >> 24) & 0xFF) * 0.5, 1.0)
        self.mqes = (cap & 0xFFFF) + 1
        device.enable_bus_master()
        self._cid = 0

    def _wait_ready(self, ready: bool) -> None:
        deadline = time.monotonic() + self.timeout + 5
        while bool(self.device.read32(0, _CSTS) & 1) != ready:
            if self.device.read32(0, _CSTS) & 2:
                raise NvmeError("controller fatal status (CSTS.CFS)")
            if time.monotonic() > deadline:
                raise NvmeError(f"CSTS.RDY did not become {int(ready)} within {self.timeout + 5:.1f} s")
            time.sleep(0.001)

    def enable(self, q: AdminQueues) -> None:
        """Reset the controller and bring it up with the admin queues at ``q``."""
        if q.entries > self.mqes:
            raise ValueError(f"controller supports {self.mqes} queue entries")
        self.q = q
        dev = self.device
        dev.write32(0, _CC, 0)  # disable (reset) first: CC.EN 1 -> 0
        self._wait_ready(False)
        self.write(q.sq_iova, bytes(64 * q.entries))
        self.write(q.cq_iova, bytes(16 * q.entries))
        dev.write32(0, _AQA, (q.entries - 1) | ((q.entries - 1) << 16))
        dev.write64(0, _ASQ, q.sq_iova)
        dev.write64(0, _ACQ, q.cq_iova)
        # EN, NVM command set, 4 KiB pages (MPS 0), 64-byte SQEs (2^6), 16-byte CQEs (2^4).
        dev.write32(0, _CC, 1 | (6 << 16) | (4 << 20))
        self._wait_ready(True)
        self.sq_tail = 0
        self.cq_head = 0
        self.phase = 1

    def _submit(self, opcode: int, nsid: int, prp1: int, cdw10: int, timeout: float) -> int:
        q = self.q
        self._cid = (self._cid + 1) & 0xFFFF
        sqe = bytearray(64)
        struct.pack_into("<IIQQQQI", sqe, 0, opcode | (self._cid << 16), nsid, 0, 0, prp1, 0, cdw10)
        self.write(q.sq_iova + 64 * self.sq_tail, bytes(sqe))
        self.sq_tail = (self.sq_tail + 1) % q.entries
        self.device.write32(0, _DOORBELLS, self.sq_tail)
        deadline = time.monotonic() + timeout
        while True:
            cqe = self.read(q.cq_iova + 16 * self.cq_head, 16)
            status = int.from_bytes(cqe[14:16], "little")
            if status & 1 == self.phase:
                break
            if time.monotonic() > deadline:
                raise NvmeError(f"no completion for command {self._cid:#x} within {timeout} s")
            time.sleep(0.001)
        self.cq_head = (self.cq_head + 1) % q.entries
        if self.cq_head == 0:
            self.phase ^= 1
        self.device.write32(0, _DOORBELLS + self.stride, self.cq_head)
        code = status >> 1
        if code:
            raise NvmeError(f"command {opcode:#x} failed: status {code:#x}")
        return int.from_bytes(cqe[12:14], "little")  # command id

    def identify_controller(self, *, timeout: float = 10.0) -> IdentifyController:
        """Identify Controller into the data buffer; the controller DMAs 4 KiB there."""
        self.write(self.q.data_iova, bytes(4096))
        self._submit(_OPC_IDENTIFY, 0, self.q.data_iova, _CNS_CONTROLLER, timeout)
        return IdentifyController.parse(self.read(self.q.data_iova, 4096))
