"""The built-in VFIO testbed: a QEMU VM with an emulated IOMMU and DMA devices.

``run(cmd, TestbedConfig(...))`` boots it, runs ``cmd`` as root over the
host's own root filesystem and returns a :class:`TestbedResult`.
"""

from hostrelay.testbed.kernel import TestbedSetupError, find_kernel
from hostrelay.testbed.vm import TIMEOUT_STATUS, TestbedBootError, TestbedConfig, TestbedResult, qemu_binary, run

__all__ = ["TIMEOUT_STATUS", "TestbedBootError", "TestbedConfig", "TestbedResult", "TestbedSetupError", "find_kernel", "qemu_binary", "run"]
