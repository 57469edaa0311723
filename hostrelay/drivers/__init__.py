"""The guest's side, played by the host: drivers for tests, examples and the demo.

Userspace drivers for the DMA engines hostrelay can test with through VFIO
(QEMU's ``edu`` in :mod:`~hostrelay.drivers.edu`, NVMe admin commands in
:mod:`~hostrelay.drivers.nvme`) and a driver-side split virtqueue in guest
memory (:mod:`~hostrelay.drivers.virtqueue`) to feed the relay's rings.

May import: the kernel seam (VFIO device regions) and the backends' guest
memory.
"""
