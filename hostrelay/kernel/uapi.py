"""``<linux/vfio.h>`` as data: constants and struct layouts that other layers reuse.

The vfio-user protocol (QEMU's ``docs/interop/vfio-user.rst``) carries
VFIO's own structs (``vfio_device_info``, ``vfio_region_info``,
``vfio_irq_info``, ``vfio_irq_set``, the DMA map/unmap flags) over a socket.
Its sans-IO codec takes their values from here, and so from the headers the
extension was compiled against, never typed by hand; :func:`check_layout`
lets it prove at import that its :mod:`struct` formats lay the fields out as
the C compiler does.
"""

from __future__ import annotations

import struct

from hostrelay._native import ffi, lib

__all__ = [
    "VFIO_DEVICE_FLAGS_PCI",
    "VFIO_DEVICE_FLAGS_RESET",
    "VFIO_DMA_UNMAP_FLAG_ALL",
    "VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP",
    "VFIO_IRQ_INFO_AUTOMASKED",
    "VFIO_IRQ_INFO_EVENTFD",
    "VFIO_IRQ_INFO_MASKABLE",
    "VFIO_IRQ_INFO_NORESIZE",
    "VFIO_IRQ_SET_ACTION_MASK",
    "VFIO_IRQ_SET_ACTION_TRIGGER",
    "VFIO_IRQ_SET_ACTION_UNMASK",
    "VFIO_IRQ_SET_DATA_BOOL",
    "VFIO_IRQ_SET_DATA_EVENTFD",
    "VFIO_IRQ_SET_DATA_NONE",
    "VFIO_PCI_BAR0_REGION_INDEX",
    "VFIO_PCI_CONFIG_REGION_INDEX",
    "VFIO_PCI_ERR_IRQ_INDEX",
    "VFIO_PCI_INTX_IRQ_INDEX",
    "VFIO_PCI_MSIX_IRQ_INDEX",
    "VFIO_PCI_MSI_IRQ_INDEX",
    "VFIO_PCI_NUM_IRQS",
    "VFIO_PCI_NUM_REGIONS",
    "VFIO_PCI_REQ_IRQ_INDEX",
    "VFIO_REGION_INFO_FLAG_READ",
    "VFIO_REGION_INFO_FLAG_WRITE",
    "check_layout",
]

VFIO_DEVICE_FLAGS_RESET: int = lib.VFIO_DEVICE_FLAGS_RESET
VFIO_DEVICE_FLAGS_PCI: int = lib.VFIO_DEVICE_FLAGS_PCI
VFIO_REGION_INFO_FLAG_READ: int = lib.VFIO_REGION_INFO_FLAG_READ
VFIO_REGION_INFO_FLAG_WRITE: int = lib.VFIO_REGION_INFO_FLAG_WRITE
VFIO_PCI_BAR0_REGION_INDEX: int = lib.VFIO_PCI_BAR0_REGION_INDEX
VFIO_PCI_CONFIG_REGION_INDEX: int = lib.VFIO_PCI_CONFIG_REGION_INDEX
VFIO_PCI_NUM_REGIONS: int = lib.VFIO_PCI_NUM_REGIONS
VFIO_PCI_INTX_IRQ_INDEX: int = lib.VFIO_PCI_INTX_IRQ_INDEX
VFIO_PCI_MSI_IRQ_INDEX: int = lib.VFIO_PCI_MSI_IRQ_INDEX
VFIO_PCI_MSIX_IRQ_INDEX: int = lib.VFIO_PCI_MSIX_IRQ_INDEX
VFIO_PCI_ERR_IRQ_INDEX: int = lib.VFIO_PCI_ERR_IRQ_INDEX
VFIO_PCI_REQ_IRQ_INDEX: int = lib.VFIO_PCI_REQ_IRQ_INDEX
VFIO_PCI_NUM_IRQS: int = lib.VFIO_PCI_NUM_IRQS
VFIO_IRQ_INFO_EVENTFD: int = lib.VFIO_IRQ_INFO_EVENTFD
VFIO_IRQ_INFO_MASKABLE: int = lib.VFIO_IRQ_INFO_MASKABLE
VFIO_IRQ_INFO_AUTOMASKED: int = lib.VFIO_IRQ_INFO_AUTOMASKED
VFIO_IRQ_INFO_NORESIZE: int = lib.VFIO_IRQ_INFO_NORESIZE
VFIO_IRQ_SET_DATA_NONE: int = lib.VFIO_IRQ_SET_DATA_NONE
VFIO_IRQ_SET_DATA_BOOL: int = lib.VFIO_IRQ_SET_DATA_BOOL
VFIO_IRQ_SET_DATA_EVENTFD: int = lib.VFIO_IRQ_SET_DATA_EVENTFD
VFIO_IRQ_SET_ACTION_MASK: int = lib.VFIO_IRQ_SET_ACTION_MASK
VFIO_IRQ_SET_ACTION_UNMASK: int = lib.VFIO_IRQ_SET_ACTION_UNMASK
VFIO_IRQ_SET_ACTION_TRIGGER: int = lib.VFIO_IRQ_SET_ACTION_TRIGGER
VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: int = lib.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP
VFIO_DMA_UNMAP_FLAG_ALL: int = lib.VFIO_DMA_UNMAP_FLAG_ALL


def check_layout(fmt: struct.Struct, cstruct: str, fields: tuple[str, ...], *, prefix: bool = False) -> None:
    """Raise :class:`RuntimeError` unless ``fmt`` packs ``fields`` as C lays out ``cstruct``.

    ``fmt`` is a little-endian wire format of one letter per field, in
    order; each item's offset and size must be those of the field, and its
    size ``sizeof(cstruct)`` unless ``prefix`` (a wire format that carries
    only the struct's first fields; a flexible array member is not a field).
    """
    ctype = ffi.typeof(cstruct)
    cfields = dict(ctype.fields)
    codes = fmt.format.lstrip("<")
    if len(codes) != len(fields):
        raise RuntimeError(f"{cstruct}: format {fmt.format!r} has {len(codes)} items for {len(fields)} fields")
    offset = 0
    for code, name in zip(codes, fields):
        field = cfields.get(name)
        if field is None:
            raise RuntimeError(f"{cstruct} has no field {name!r}")
        size = struct.calcsize("<" + code)
        if (offset, size) != (field.offset, ffi.sizeof(field.type)):
            raise RuntimeError(f"{cstruct}.{name}: the codec has {size} bytes at {offset}, "
                               f"<linux/vfio.h> {ffi.sizeof(field.type)} at {field.offset}")  # fmt: skip
        offset += size
    if not prefix and offset != ffi.sizeof(ctype):
        raise RuntimeError(f"{cstruct}: the codec packs {offset} bytes, sizeof is {ffi.sizeof(ctype)}")
