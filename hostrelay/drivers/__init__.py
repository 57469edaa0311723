"""Userspace drivers for the DMA engines hostrelay can test with (through VFIO)."""
