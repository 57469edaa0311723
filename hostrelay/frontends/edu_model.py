"""QEMU's ``edu`` device (PCI 1234:11e8) as a sans-IO model.

The register interface is that of QEMU's ``hw/misc/edu.c`` (checked against
QEMU 7.2 and the 10.x/11.x tree; the two differ only in how a bad DMA range
is treated): what ``hostrelay.drivers.edu`` drives through VFIO works
unchanged on this model.  The model knows nothing of sockets or of the IOMMU:
its DMA goes through a :class:`DmaPort` (the vfio-user front end's, which
translates through the relay), its interrupt through a callback.

Differences from QEMU's edu, all on paths a correct driver never takes:

- a DMA outside the 4 KiB buffer (QEMU 7.2 aborts the VM with ``hw_error``,
  later QEMU logs and goes on to copy out of bounds) or whose RAM address has
  bits above ``dma_mask`` (QEMU silently clamps it) is refused: no memory is
  touched, the command completes, :attr:`Edu.refusals` says why;
- the DMA runs when the command is written instead of on a 100 ms virtual
  timer, so a driver polling bit 0 of 0x98 sees it clear at its first read;
- the factorial is computed at once (QEMU uses a thread; the COMPUTING bit of
  0x20 is never seen set).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Protocol

__all__ = [
    "BAR0_SIZE",
    "CONFIG_SIZE",
    "DMA_BUFFER",
    "DMA_BUFFER_SIZE",
    "DmaPort",
    "Edu",
    "EduConfig",
]

VENDOR_ID = 0x1234
DEVICE_ID = 0x11E8
REVISION = 0x10  # edu_class_init: k->revision
# PCI_CLASS_OTHERS (0x00ff) written as the 16-bit class word: lspci shows
# "Unclassified device [00ff]".
CLASS_WORD = 0x00FF
# QEMU's default subsystem IDs for its own devices (hw/pci/pci.c:
# PCI_SUBVENDOR_ID_REDHAT_QUMRANET / PCI_SUBDEVICE_ID_QEMU).
SUBSYSTEM_VENDOR_ID = 0x1AF4
SUBSYSTEM_ID = 0x1100
CONFIG_SIZE = 256  # conventional PCI: no extended config space
BAR0_SIZE = 1 << 20  # memory_region_init_io(..., "edu-mmio", 1 * MiB)
DMA_BUFFER = 0x40000  # DMA_START
DMA_BUFFER_SIZE = 4096  # DMA_SIZE
DEFAULT_DMA_MASK = (1 << 28) - 1  # edu_instance_init

# Config space offsets (PCI Local Bus 3.0, ch. 6).
_COMMAND, _STATUS, _BAR0, _CAP_PTR, _INT_LINE, _INT_PIN = 0x04, 0x06, 0x10, 0x34, 0x3C, 0x3D
COMMAND_IO, COMMAND_MEMORY, COMMAND_MASTER = 0x1, 0x2, 0x4
COMMAND_SERR, COMMAND_INTX_DISABLE = 0x100, 0x400
_STATUS_INTERRUPT, _STATUS_CAP_LIST = 0x08, 0x10
# msi_init(pdev, 0, 1, true, false): QEMU puts the capability at the first
# free offset after the 64-byte header; one vector, 64-bit, no per-vector mask.
MSI_CAP = 0x40
_MSI_CAP_ID = 0x05
_MSI_FLAGS_64BIT = 0x0080
MSI_ENABLE = 0x0001

# BAR0 registers.
_ID, _LIVENESS, _FACTORIAL, _STATUS_REG, _IRQ_STATUS, _IRQ_RAISE, _IRQ_ACK = 0x00, 0x04, 0x08, 0x20, 0x24, 0x60, 0x64
_DMA_SRC, _DMA_DST, _DMA_COUNT, _DMA_CMD = 0x80, 0x88, 0x90, 0x98
ID_VALUE = 0x010000ED  # major 1, minor 0, 0xed
FACT_IRQ = 0x00000001
DMA_IRQ = 0x00000100
STATUS_COMPUTING = 0x01
STATUS_IRQFACT = 0x80
DMA_RUN = 0x1
DMA_TO_RAM = 0x2  # EDU_DMA_DIR: 1 = EDU_DMA_TO_PCI, device buffer -> RAM
DMA_RAISE_IRQ = 0x4


class DmaPort(Protocol):
    """Where the device's bus-master accesses go (addresses are the device's, IOVAs)."""

    def read(self, address: int, size: int) -> bytes | None:
        """``size`` bytes of memory at ``address``, or None when the access is refused."""
        ...

    def write(self, address: int, data: bytes) -> bool:
        """Store ``data`` at ``address``; False when the access is refused."""
        ...


class EduConfig:
    """The function's 256-byte configuration space, with per-bit write masks."""

    def __init__(self) -> None:
        self.data = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.reset()

    def reset(self) -> None:
        """Power-on values (a function reset clears command, BAR and MSI state)."""
        d = self.data
        d[:] = bytes(CONFIG_SIZE)
        struct.pack_into("<HH", d, 0x00, VENDOR_ID, DEVICE_ID)
        struct.pack_into("<H", d, _STATUS, _STATUS_CAP_LIST)
        d[0x08] = REVISION
        struct.pack_into("<H", d, 0x0A, CLASS_WORD)
        struct.pack_into("<HH", d, 0x2C, SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID)
        d[_CAP_PTR] = MSI_CAP
        d[_INT_PIN] = 1  # pci_config_set_interrupt_pin(pci_conf, 1): INTA#
        d[MSI_CAP] = _MSI_CAP_ID
        struct.pack_into("<H", d, MSI_CAP + 2, _MSI_FLAGS_64BIT)
        w = self.wmask
        w[:] = bytes(CONFIG_SIZE)
        command_mask = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_SERR | COMMAND_INTX_DISABLE
        struct.pack_into("<H", w, _COMMAND, command_mask)
        # BAR0: 32-bit non-prefetchable memory; the low 20 address bits are
        # the size and read as zero.
        struct.pack_into("<I", w, _BAR0, ~(BAR0_SIZE - 1) & 0xFFFFFFFF)
        w[_INT_LINE] = 0xFF
        struct.pack_into("<H", w, MSI_CAP + 2, MSI_ENABLE | 0x0070)  # enable, multiple message enable
        struct.pack_into("<IIH", w, MSI_CAP + 4, 0xFFFFFFFC, 0xFFFFFFFF, 0xFFFF)

    def read(self, offset: int, size: int, *, interrupt: bool = False) -> bytes:
        """Bytes at ``offset``; ``interrupt`` is the INTx level status bit 3 reports."""
        out = bytearray(self.data[offset:offset + size])
        if interrupt and offset <= _STATUS < offset + size:
            out[_STATUS - offset] |= _STATUS_INTERRUPT
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` through the write masks (read-only bits keep their value)."""
        for i, byte in enumerate(data):
            at = offset + i
            mask = self.wmask[at]
            self.data[at] = (self.data[at] & ~mask & 0xFF) | (byte & mask)

    @property
    def command(self) -> int:
        """The command register."""
        return int(struct.unpack_from("<H", self.data, _COMMAND)[0])

    @property
    def msi_enabled(self) -> bool:
        """MSI Enable in the capability's message control."""
        return bool(struct.unpack_from("<H", self.data, MSI_CAP + 2)[0] & MSI_ENABLE)


class Edu:
    """The edu function: config space, BAR0 registers, DMA engine, interrupt status.

    ``dma`` carries bus-master accesses; ``interrupt`` is called each time the
    device raises an interrupt (edu_raise_irq with a non-zero status: an MSI
    message, or INTx asserted); :attr:`interrupt_level` is the INTx level.
    """

    def __init__(self, dma: DmaPort, interrupt: Callable[[], None] | None = None, *,
                 dma_mask: int = DEFAULT_DMA_MASK) -> None:  # fmt: skip
        self.dma = dma
        self.interrupt = interrupt
        self.dma_mask = dma_mask
        self.config = EduConfig()
        self.buffer = bytearray(DMA_BUFFER_SIZE)
        #: Why each refused DMA was refused (oldest first); bounded.
        self.refusals: list[str] = []
        self.transfers = 0
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.liveness = 0
        self.fact = 0
        self.status = 0
        self.irq_status = 0
        self.dma_src = self.dma_dst = self.dma_count = self.dma_cmd = 0

    def reset(self) -> None:
        """A function reset: config space and registers to power-on values (the buffer is kept)."""
        self.config.reset()
        self._reset_registers()

    # --- config space -------------------------------------------------------------

    def config_read(self, offset: int, size: int) -> bytes:
        """Config read; the caller checked ``offset + size <= CONFIG_SIZE``."""
        return self.config.read(offset, size, interrupt=self.interrupt_level)

    def config_write(self, offset: int, data: bytes) -> None:
        """Config write; the caller checked the bounds."""
        self.config.write(offset, data)

    @property
    def bus_master(self) -> bool:
        """Command register Bus Master Enable: without it the device issues no DMA."""
        return bool(self.config.command & COMMAND_MASTER)

    @property
    def interrupt_level(self) -> bool:
        """INTx asserted: some interrupt status bit is set (and INTx is not disabled)."""
        return bool(self.irq_status) and not self.config.command & COMMAND_INTX_DISABLE

    # --- BAR0 ---------------------------------------------------------------------

    def mmio_read(self, offset: int, size: int) -> bytes:
        """A BAR0 load: all-ones for sizes and offsets edu_mmio_read does not serve."""
        value = (1 << 64) - 1
        if (offset < 0x80 and size == 4) or (offset >= 0x80 and size in (4, 8)):
            value = {
                _ID: ID_VALUE,
                _LIVENESS: self.liveness,
                _FACTORIAL: self.fact,
                _STATUS_REG: self.status,
                _IRQ_STATUS: self.irq_status,
                _DMA_SRC: self.dma_src,
                _DMA_DST: self.dma_dst,
                _DMA_COUNT: self.dma_count,
                _DMA_CMD: self.dma_cmd,
            }.get(offset, value)
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little") if size <= 8 else b"\xff" * size

    def mmio_write(self, offset: int, data: bytes) -> None:
        """A BAR0 store; sizes edu_mmio_write ignores are ignored."""
        size = len(data)
        if not ((offset < 0x80 and size == 4) or (offset >= 0x80 and size in (4, 8))):
            return
        value = int.from_bytes(data, "little")
        if offset == _LIVENESS:
            self.liveness = ~value & 0xFFFFFFFF
        elif offset == _FACTORIAL:
            if not self.status & STATUS_COMPUTING:
                result = 1
                for n in range(value & 0xFFFFFFFF, 0, -1):
                    result = (result * n) & 0xFFFFFFFF  # uint32_t arithmetic
                    if result == 0:
                        break  # the product stays 0 (and 0xffffffff! is a long loop)
                self.fact = result
                if self.status & STATUS_IRQFACT:
                    self._raise(FACT_IRQ)
        elif offset == _STATUS_REG:
            self.status = (self.status | STATUS_IRQFACT) if value & STATUS_IRQFACT else (self.status & ~STATUS_IRQFACT)
        elif offset == _IRQ_RAISE:
            self._raise(value & 0xFFFFFFFF)
        elif offset == _IRQ_ACK:
            self.irq_status &= ~value & 0xFFFFFFFF
        elif offset in (_DMA_SRC, _DMA_DST, _DMA_COUNT):
            if self.dma_cmd & DMA_RUN:
                return  # dma_rw: registers are frozen while a transfer runs
            setattr(self, {_DMA_SRC: "dma_src", _DMA_DST: "dma_dst", _DMA_COUNT: "dma_count"}[offset], value)
        elif offset == _DMA_CMD:
            if value & DMA_RUN and not self.dma_cmd & DMA_RUN:
                self.dma_cmd = value
                self._run_dma()

    # --- interrupts and DMA -------------------------------------------------------

    def _raise(self, bits: int) -> None:
        self.irq_status |= bits
        if self.irq_status and self.interrupt is not None:
            self.interrupt()

    def _refuse(self, why: str) -> None:
        self.refusals.append(why)
        del self.refusals[:-64]

    def _run_dma(self) -> None:
        count = self.dma_count
        to_ram = bool(self.dma_cmd & DMA_TO_RAM)
        device_side, ram_side = (self.dma_src, self.dma_dst) if to_ram else (self.dma_dst, self.dma_src)
        # edu_check_range, except that a bad range is refused here.
        if not (DMA_BUFFER <= device_side and device_side + count <= DMA_BUFFER + DMA_BUFFER_SIZE):
            self._refuse(f"transfer {device_side:#x}+{count:#x} leaves the buffer "
                         f"{DMA_BUFFER:#x}+{DMA_BUFFER_SIZE:#x}")  # fmt: skip
        elif ram_side & ~self.dma_mask:
            self._refuse(f"address {ram_side:#x} is beyond dma_mask {self.dma_mask:#x}")
        elif not self.bus_master:
            # PCI: a function with Bus Master Enable clear issues no request
            # (QEMU's pci_dma_* then hit a disabled bus-master address space).
            self._refuse("bus mastering is disabled")
        elif count:
            at = device_side - DMA_BUFFER
            if to_ram:
                if not self.dma.write(ram_side, bytes(self.buffer[at:at + count])):
                    self._refuse(f"write of {count:#x} bytes to {ram_side:#x} refused")
                else:
                    self.transfers += 1
            else:
                data = self.dma.read(ram_side, count)
                if data is None:
                    self._refuse(f"read of {count:#x} bytes at {ram_side:#x} refused")
                else:
                    self.buffer[at:at + count] = data
                    self.transfers += 1
        # Completion, as edu_dma_timer's, whatever the bus said: edu ignores
        # the result of pci_dma_read/pci_dma_write.
        self.dma_cmd &= ~DMA_RUN
        if self.dma_cmd & DMA_RAISE_IRQ:
            self._raise(DMA_IRQ)
