"""Host tooling: finding, binding and readying PCI functions for passthrough.

sysfs behind one injectable interface (:mod:`~hostrelay.host.sysfs`), device
and group discovery (:mod:`~hostrelay.host.devices`), bind/unbind
(:mod:`~hostrelay.host.binding`), udev events and rules
(:mod:`~hostrelay.host.udev`) and the readiness check
(:mod:`~hostrelay.host.check`).  Within the layer, imports go one way:
``sysfs`` ← ``devices`` ← ``udev`` ← ``binding``, ``check``.

May import: itself, pyudev and the standard library; nothing of the device
model, the data plane or the kernel seam.
"""
