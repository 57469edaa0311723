"""QEMU's ``edu`` educational device (PCI 1234:11e8) as a DMA engine.

BAR0 registers (QEMU ``hw/misc/edu.c``): 0x00 identification (0x010000ed),
0x80 DMA source, 0x88 DMA destination, 0x90 count, 0x98 command (bit 0 start,
bit 1 direction: 1 = device buffer → RAM, 0 = RAM → device buffer).  The
device buffer lives at device address 0x40000 and is 4 KiB.

QEMU 7.2's ``edu`` aborts the whole VM on a transfer it thinks leaves its
buffer, and a 4096-byte transfer at 0x40000 already trips it, so transfers are
limited to :data:`MAX_TRANSFER` bytes.  Its DMA mask is 28 bits by default:
IOVAs must stay below 256 MiB.
"""

from __future__ import annotations

import time

from hostrelay.kernel.vfio import Device

__all__ = ["Edu", "EduTimeout", "VENDOR_ID", "DEVICE_ID", "MAX_TRANSFER", "DMA_LIMIT"]

VENDOR_ID = 0x1234
DEVICE_ID = 0x11E8
BUFFER = 0x40000
MAX_TRANSFER = 2048
DMA_LIMIT = 1 << 28  # default dma_mask of edu

_ID, _SRC, _DST, _COUNT, _CMD = 0x00, 0x80, 0x88, 0x90, 0x98
_START, _TO_RAM = 0x1, 0x2


class EduTimeout(TimeoutError):
    """The device did not finish a DMA in time."""


class Edu:
    """Drive an ``edu`` function opened through VFIO."""

    def __init__(self, device: Device) -> None:
        self.device = device
        ident = device.read32(0, _ID)
        if ident & 0xFF != 0xED:
            raise ValueError(f"{device.name} is not an edu device (id register {ident:#x})")
        device.enable_bus_master()

    def _dma(self, src: int, dst: int, count: int, to_ram: bool, timeout: float) -> float:
        if not 0 < count <= MAX_TRANSFER:
            raise ValueError(f"edu transfers are 1..{MAX_TRANSFER} bytes, not {count}")
        dev = self.device
        dev.write64(0, _SRC, src)
        dev.write64(0, _DST, dst)
        dev.write64(0, _COUNT, count)
        start = time.monotonic()
        dev.write64(0, _CMD, _START | (_TO_RAM if to_ram else 0))
        # The transfer completes on a QEMU timer (~100 ms of virtual time).
        while dev.read64(0, _CMD) & _START:
            if time.monotonic() - start > timeout:
                raise EduTimeout(f"edu {dev.name}: DMA did not complete within {timeout} s")
            time.sleep(0.005)
        return time.monotonic() - start

    def to_device(self, iova: int, count: int, *, offset: int = 0, timeout: float = 10.0) -> float:
        """DMA ``count`` bytes from ``iova`` into the device buffer; return seconds taken."""
        return self._dma(iova, BUFFER + offset, count, False, timeout)

    def from_device(self, iova: int, count: int, *, offset: int = 0, timeout: float = 10.0) -> float:
        """DMA ``count`` bytes from the device buffer to ``iova``; return seconds taken."""
        return self._dma(BUFFER + offset, iova, count, True, timeout)
