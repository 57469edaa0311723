"""Firmware tables a guest needs to find a virtio-iommu, sans-IO.

:mod:`~hostrelay.firmware.viot` builds and parses the ACPI Virtual I/O
Translation Table (VIOT): which PCI function is the virtio-iommu and which
endpoints it manages, for QEMU's ``-acpitable file=`` when QEMU itself does
not generate one (a virtio-iommu served over vhost-user).

May import: the standard library only.  No I/O, no cffi, no other hostrelay
layer (the import-linter contracts in ``pyproject.toml`` check it).
"""
